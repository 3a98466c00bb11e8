from __future__ import annotations

from django import forms

from apps.classrooms.services import MAX_CODE_DAYS, MAX_QUOTA
from apps.courses.models import Chapter


class ClassroomForm(forms.Form):
    name = forms.CharField(max_length=120, label="Name")
    sandbox_quota = forms.IntegerField(
        required=False,
        min_value=0,
        max_value=MAX_QUOTA,
        label="Sandboxes per learner",
        help_text="How many sandboxes each learner may run at once. Empty: the server's default.",
    )


class JoinForm(forms.Form):
    code = forms.CharField(max_length=40, label="Class code")


class JoinCodeForm(forms.Form):
    expires_in_days = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_CODE_DAYS,
        label="Expires after (days)",
        help_text="Empty: the code works until you revoke it.",
    )


class InstructorForm(forms.Form):
    username = forms.CharField(max_length=150, label="Instructor's username")


class ScheduleForm(forms.Form):
    chapter = forms.ModelChoiceField(
        queryset=Chapter.objects.filter(retired_at__isnull=True), to_field_name="slug"
    )
    scheduled = forms.BooleanField(required=False)
    due_at = forms.DateTimeField(
        required=False,
        label="Due",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
        input_formats=["%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%Y-%m-%d"],
    )


MAX_INVITES = 200  # addresses in one invitation


class InviteForm(forms.Form):
    emails = forms.CharField(
        label="Invite by email",
        widget=forms.Textarea(
            attrs={"rows": 3, "placeholder": "ada@example.org, grace@example.org"}
        ),
        help_text=(
            f"Up to {MAX_INVITES} addresses, separated by commas, spaces or new lines. Each "
            "gets the class's join link (the newest live code; a new one if none is live)."
        ),
    )

    def clean_emails(self) -> list[str]:
        import re

        from django.core.exceptions import ValidationError
        from django.core.validators import validate_email

        raw = [e.strip() for e in re.split(r"[\s,;]+", self.cleaned_data["emails"]) if e.strip()]
        unique = list(dict.fromkeys(e.lower() for e in raw))
        if not unique:
            raise ValidationError("Enter at least one email address.")
        if len(unique) > MAX_INVITES:
            raise ValidationError(f"At most {MAX_INVITES} addresses at once (got {len(unique)}).")
        bad = []
        for address in unique:
            try:
                validate_email(address)
            except ValidationError:
                bad.append(address)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise ValidationError(f"Not email addresses: {shown}. Nothing was sent.")
        return unique
