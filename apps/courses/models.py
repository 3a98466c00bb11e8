from __future__ import annotations

from django.conf import settings
from django.db import models
from django.urls import reverse


class Chapter(models.Model):
    """One chapter, indexed from a file in ``content/`` by ``content_sync``.

    A chapter whose file disappears is retired (``retired_at`` set), never deleted, so
    learners' progress and quiz attempts survive; it comes back if the file returns.
    """

    slug = models.SlugField(max_length=80, unique=True)
    number = models.PositiveIntegerField()
    title = models.CharField(max_length=120)
    summary = models.TextField()
    sandbox = models.SlugField(max_length=80, help_text="Pattern id of the chapter's sandbox")
    minutes = models.PositiveIntegerField()
    objectives = models.JSONField(default=list)
    quiz = models.JSONField(default=list)
    body = models.TextField()
    source_path = models.CharField(max_length=255, help_text="File name inside content/")
    source_hash = models.CharField(max_length=64)
    # Set when the file currently has a fatal problem: the row keeps its last good content.
    problem = models.TextField(blank=True)
    retired_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["number"]

    def __str__(self) -> str:
        return f"{self.number}. {self.title}"

    def get_absolute_url(self) -> str:
        return reverse("courses:chapter", kwargs={"slug": self.slug})

    @property
    def quiz_points(self) -> int:
        return len(self.quiz)


class ContentProblem(models.Model):
    """A problem found in content by the last sync, shown to instructors."""

    path = models.CharField(max_length=255)
    line = models.PositiveIntegerField()
    message = models.TextField()
    fatal = models.BooleanField(default=True)
    found_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["path", "line"]

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class ChapterProgress(models.Model):
    """A learner marked a chapter as read."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    chapter = models.ForeignKey(Chapter, on_delete=models.CASCADE, related_name="progress")
    read_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "chapter"], name="one_progress_per_chapter")
        ]

    def __str__(self) -> str:
        return f"{self.user} read {self.chapter.slug}"


class QuizAttempt(models.Model):
    """One submission of a chapter's quiz; every attempt is kept."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    chapter = models.ForeignKey(Chapter, on_delete=models.CASCADE, related_name="attempts")
    answers = models.JSONField(help_text="question id → list of chosen option ids")
    score = models.PositiveIntegerField()
    max_score = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["user", "chapter"])]

    def __str__(self) -> str:
        return f"{self.user} {self.chapter.slug} {self.score}/{self.max_score}"
