from __future__ import annotations

from django.contrib import admin

from apps.lti.models import Context, Identity, Platform, ScoreLink, ToolKey


@admin.register(Platform)
class PlatformAdmin(admin.ModelAdmin[Platform]):
    list_display = ["name", "issuer", "client_id", "active"]


@admin.register(Identity)
class IdentityAdmin(admin.ModelAdmin[Identity]):
    list_display = ["user", "platform", "sub", "last_launch_at"]
    search_fields = ["user__username", "sub"]


@admin.register(Context)
class ContextAdmin(admin.ModelAdmin[Context]):
    list_display = ["title", "platform", "context_id", "classroom"]


@admin.register(ScoreLink)
class ScoreLinkAdmin(admin.ModelAdmin[ScoreLink]):
    list_display = ["user", "chapter", "platform", "sent_given", "sent_maximum", "sent_at", "error"]


@admin.register(ToolKey)
class ToolKeyAdmin(admin.ModelAdmin[ToolKey]):
    """Keys are made by Distlab; the admin may only retire one (the private half stays hidden)."""

    list_display = ["kid", "active", "created_at"]
    fields = ["kid", "public_key", "active", "created_at"]
    readonly_fields = ["kid", "public_key", "created_at"]

    def has_add_permission(self, request: object) -> bool:
        return False
