from __future__ import annotations

from django import forms
from django.contrib.auth.forms import UserCreationForm

from apps.accounts.models import User

EMAIL_TAKEN = "An account with this email address already exists."


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
