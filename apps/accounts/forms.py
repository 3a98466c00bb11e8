from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib.auth.forms import UserCreationForm
from django.utils.crypto import constant_time_compare

from apps.accounts.models import User

EMAIL_TAKEN = "An account with this email address already exists."
BAD_INVITE = "That invitation code is not right: ask your instructor for this server's code."


class SignupForm(UserCreationForm[User]):
    email = forms.EmailField(
        required=True, help_text="Used only to reset your password.", max_length=254
    )

    class Meta:
        model = User
        fields = ("username", "email")

    def clean_email(self) -> str:
        email = self.cleaned_data["email"].strip().lower()
        if User.objects.filter(email__iexact=email).exists():
            raise forms.ValidationError(EMAIL_TAKEN)
        return email


class InvitedSignupForm(SignupForm):
    """Sign-up on a server that lets in only people with its invitation code."""

    invite_code = forms.CharField(
        label="Invitation code", max_length=200, help_text="From your instructor."
    )

    def clean_invite_code(self) -> str:
        code = self.cleaned_data["invite_code"].strip()
        if not constant_time_compare(code, settings.SIGNUP_INVITE_CODE):
            raise forms.ValidationError(BAD_INVITE)
        return code
