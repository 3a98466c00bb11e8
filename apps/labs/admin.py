from __future__ import annotations

from django.contrib import admin

from apps.labs.models import Fault, Node, Sandbox


class NodeInline(admin.TabularInline[Node, Sandbox]):
    model = Node
    extra = 0
    readonly_fields = ("name", "role", "program", "address", "created_at")


@admin.register(Sandbox)
class SandboxAdmin(admin.ModelAdmin[Sandbox]):
    list_display = ("id", "pattern", "owner", "state", "engine", "created_at", "expires_at")
    list_filter = ("state", "pattern", "engine")
    search_fields = ("owner__username", "pattern")
    readonly_fields = [f.name for f in Sandbox._meta.fields]
    inlines = [NodeInline]


@admin.register(Fault)
class FaultAdmin(admin.ModelAdmin[Fault]):
    list_display = ("kind", "node", "sandbox", "created_at", "expires_at", "reverted_at")
    list_filter = ("kind",)
