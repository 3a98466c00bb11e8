from __future__ import annotations

from typing import Any

from django import forms
from django.db import models

from apps.lti.models import Platform


def _formfield(field: models.Field, **kwargs: Any) -> forms.Field | None:
    if isinstance(field, models.URLField):
        kwargs["assume_scheme"] = "https"
    return field.formfield(**kwargs)


class PlatformForm(forms.ModelForm[Platform]):
    class Meta:
        model = Platform
        formfield_callback = _formfield
        fields = [
            "name",
            "issuer",
            "client_id",
            "deployment_ids",
            "auth_login_url",
            "auth_token_url",
            "auth_audience",
            "key_set_url",
            "active",
        ]
        widgets = {"deployment_ids": forms.Textarea(attrs={"rows": 2})}
        labels = {
            "client_id": "Client id",
            "deployment_ids": "Deployment ids",
            "auth_login_url": "Authentication (login) URL",
            "auth_token_url": "Access token URL",
            "auth_audience": "Token audience",
            "key_set_url": "Keyset URL",
        }

    def clean_deployment_ids(self) -> str:
        ids = [line.strip() for line in self.cleaned_data["deployment_ids"].splitlines()]
        ids = [i for i in ids if i]
        if not ids:
            raise forms.ValidationError("At least one deployment id (the LMS shows it).")
        if any(len(i) > 255 for i in ids):
            raise forms.ValidationError("A deployment id is at most 255 characters.")
        return "\n".join(ids)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        for name in ("issuer", "auth_login_url", "auth_token_url", "key_set_url"):
            value = data.get(name) or ""
            if value and not value.startswith(("https://", "http://")):
                self.add_error(name, "An http(s) URL.")
        return data
