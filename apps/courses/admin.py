from __future__ import annotations

from django.contrib import admin

from apps.courses.models import Chapter, ChapterProgress, ContentProblem, QuizAttempt


@admin.register(Chapter)
class ChapterAdmin(admin.ModelAdmin[Chapter]):
    """Read-mostly: chapters are edited as files in content/, not here."""

    list_display = ("number", "title", "slug", "sandbox", "retired_at", "updated_at")
    readonly_fields = [f.name for f in Chapter._meta.fields]


admin.site.register(ContentProblem)
admin.site.register(ChapterProgress)
admin.site.register(QuizAttempt)
