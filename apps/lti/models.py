"""What Distlab keeps to be an LTI 1.3 tool: its own signing key, the platforms (LMSs) a
school registered, who each platform's users are here, which LMS course is which
classroom, and where each learner's scores go back.

Services: ``lti.launches`` (a launch, from the platform's form post to a signed-in user on
a chapter) and ``lti.scores`` (sending scores back).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models


class ToolKey(models.Model):
    """An RSA key pair Distlab signs with (deep-linking answers, service-token requests).
    The newest active one signs; every active one is published at ``/lti/jwks/``, so a
    new key can be added before the old one is retired."""

    kid = models.CharField(max_length=64, unique=True)
    private_key = models.TextField()  # PEM, PKCS#8
    public_key = models.TextField()  # PEM
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-pk"]

    def __str__(self) -> str:
        return self.kid


class Platform(models.Model):
    """A school's LMS registered with this Distlab (Moodle, Canvas, Open edX...): the
    values the LMS shows when the tool is added to it."""

    name = models.CharField(max_length=120)
    issuer = models.URLField(max_length=500, help_text="The platform's issuer (iss), a URL.")
    client_id = models.CharField(max_length=200, help_text="The client id the LMS gave Distlab.")
    deployment_ids = models.TextField(
        help_text="The deployment ids the LMS shows, one per line.",
    )
    auth_login_url = models.URLField(
        max_length=500, help_text="The platform's OIDC authentication (login) URL."
    )
    auth_token_url = models.URLField(
        max_length=500, help_text="The platform's OAuth 2 access token URL (for sending grades)."
    )
    auth_audience = models.CharField(
        max_length=500,
        blank=True,
        help_text="Only if the LMS names one: the audience of token requests.",
    )
    key_set_url = models.URLField(
        max_length=500, help_text="The platform's public keyset URL (JWKS)."
    )
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name", "pk"]
        constraints = [
            models.UniqueConstraint(fields=["issuer", "client_id"], name="one_registration")
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def deployments(self) -> list[str]:
        return [line.strip() for line in self.deployment_ids.splitlines() if line.strip()]


class Identity(models.Model):
    """A platform's user (its ``sub``) is this Distlab account."""

    platform = models.ForeignKey(Platform, on_delete=models.CASCADE, related_name="identities")
    sub = models.CharField(max_length=255)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="lti_identities"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_launch_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["platform", "sub"], name="one_account_per_sub")
        ]

    def __str__(self) -> str:
        return f"{self.sub}@{self.platform} = {self.user}"


class Context(models.Model):
    """An LMS course (its ``context``) and the classroom it is here. The classroom is made
    at the first launch of one of its instructors."""

    platform = models.ForeignKey(Platform, on_delete=models.CASCADE, related_name="contexts")
    context_id = models.CharField(max_length=255)
    title = models.CharField(max_length=255, blank=True)
    classroom = models.OneToOneField(
        "classrooms.Classroom",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="lti_context",
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["platform", "context_id"], name="one_row_per_context")
        ]

    def __str__(self) -> str:
        return self.title or self.context_id


class ScoreLink(models.Model):
    """Where a learner's score for a chapter goes back: the line item of the LMS
    assignment (resource link) they launched, from the launch's Assignment and Grade
    Services claim. ``sent_*`` is the last score the LMS accepted; ``error`` the last
    refusal, for the admin."""

    platform = models.ForeignKey(Platform, on_delete=models.CASCADE, related_name="score_links")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="lti_score_links"
    )
    sub = models.CharField(max_length=255)
    chapter = models.ForeignKey("courses.Chapter", on_delete=models.CASCADE, related_name="+")
    resource_link_id = models.CharField(max_length=255)
    lineitem = models.URLField(max_length=1000)
    scopes = models.JSONField(default=list)
    sent_given = models.FloatField(null=True, blank=True)
    sent_maximum = models.FloatField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["platform", "user", "resource_link_id"], name="one_link_per_resource"
            )
        ]

    def __str__(self) -> str:
        return f"{self.user} {self.chapter_id} → {self.lineitem}"
