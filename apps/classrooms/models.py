from __future__ import annotations

from django.conf import settings
from django.db import models
from django.urls import reverse
from django.utils import timezone


class Classroom(models.Model):
    """A cohort: its owner and co-instructors see its learners' progress and sandboxes.

    Services: ``classrooms.services``; every read an instructor asks for goes through
    ``classrooms.selectors.classroom_get_for_instructor``.
    """

    name = models.CharField(max_length=120)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="classrooms_owned"
    )
    co_instructors = models.ManyToManyField(
        settings.AUTH_USER_MODEL, blank=True, related_name="classrooms_co_taught"
    )
    # How many sandboxes each of its learners may run at once (None: the server's default).
    sandbox_quota = models.PositiveSmallIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name", "pk"]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("classrooms:dashboard", kwargs={"classroom_id": self.pk})


class ScheduleEntry(models.Model):
    """A chapter on a classroom's schedule, optionally with a due date."""

    classroom = models.ForeignKey(Classroom, on_delete=models.CASCADE, related_name="schedule")
    chapter = models.ForeignKey("courses.Chapter", on_delete=models.CASCADE, related_name="+")
    due_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["chapter__number"]
        constraints = [
            models.UniqueConstraint(fields=["classroom", "chapter"], name="one_entry_per_chapter")
        ]

    def __str__(self) -> str:
        return f"{self.classroom}: {self.chapter.slug}"


class Membership(models.Model):
    """A learner in a classroom. Leaving or being removed sets ``left_at`` (the row and
    the learner's own progress stay); joining again clears it."""

    classroom = models.ForeignKey(Classroom, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    joined_at = models.DateTimeField(default=timezone.now)
    left_at = models.DateTimeField(null=True, blank=True)
    # The learner's consent: the classroom's instructors may also inject faults into,
    # change and stop the learner's sandboxes (not only watch them). On by default.
    instructors_may_act = models.BooleanField(default=True)

    class Meta:
        ordering = ["user__username"]
        constraints = [
            models.UniqueConstraint(fields=["classroom", "user"], name="one_membership_per_user")
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.classroom}"

    @property
    def is_active(self) -> bool:
        return self.left_at is None


class JoinCode(models.Model):
    """A short code (and the join link made from it) that lets a learner join; it may
    expire and may be revoked."""

    classroom = models.ForeignKey(Classroom, on_delete=models.CASCADE, related_name="codes")
    code = models.CharField(max_length=16, unique=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]

    def __str__(self) -> str:
        return f"{self.code} ({self.classroom})"

    def get_absolute_url(self) -> str:
        return reverse("classrooms:join_link", kwargs={"code": self.code})

    @property
    def is_usable(self) -> bool:
        return self.revoked_at is None and (
            self.expires_at is None or self.expires_at > timezone.now()
        )


class Drill(models.Model):
    """A class-wide chaos drill: one fault, injected by an instructor into every selected
    running sandbox of one pattern among a classroom's learners, reverting on its own.
    Services: ``classrooms.drills``."""

    classroom = models.ForeignKey(Classroom, on_delete=models.CASCADE, related_name="drills")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    pattern = models.CharField(max_length=64)
    node = models.CharField(max_length=64)
    kind = models.CharField(max_length=16)
    params = models.JSONField(default=dict, blank=True)
    duration = models.PositiveIntegerField()
    created_at = models.DateTimeField(default=timezone.now)
    injected_at = models.DateTimeField(null=True, blank=True)  # every target tried
    measured_at = models.DateTimeField(null=True, blank=True)  # every target measured

    class Meta:
        ordering = ["-created_at", "-pk"]

    def __str__(self) -> str:
        return f"{self.kind} on {self.node} ({self.pattern}) in {self.classroom}"


class DrillTarget(models.Model):
    """One learner's sandbox in a drill: its fault (or why it could not be injected) and
    what its own telemetry measured while the fault held."""

    drill = models.ForeignKey(Drill, on_delete=models.CASCADE, related_name="targets")
    learner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+"
    )
    sandbox = models.ForeignKey(
        "labs.Sandbox", null=True, on_delete=models.SET_NULL, related_name="+"
    )
    fault = models.ForeignKey(
        "labs.Fault", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    injected_at = models.DateTimeField(null=True, blank=True)
    error = models.CharField(max_length=300, blank=True)
    # errors_s (first to last failed request), errors, calls, error_pct; empty until measured
    measured = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["learner__username"]

    def __str__(self) -> str:
        return f"{self.drill} → {self.learner}"


class ClassExperiment(models.Model):
    """A guided experiment for the whole class: an instructor asks every learner of a
    classroom to run one of a pattern's experiments on their own sandbox. Each learner
    predicts first (the experiment's own form, marked as asked by the class) and their run
    measures their own system; the instructor sees the predictions against what the
    sandboxes measured. Open until ``closes_at``. Services: ``classrooms.guided``."""

    classroom = models.ForeignKey(
        Classroom, on_delete=models.CASCADE, related_name="class_experiments"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    pattern = models.CharField(max_length=64)
    experiment = models.SlugField(max_length=80)
    created_at = models.DateTimeField(default=timezone.now)
    closes_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at", "-pk"]

    def __str__(self) -> str:
        return f"{self.pattern}/{self.experiment} in {self.classroom}"

    @property
    def is_open(self) -> bool:
        return timezone.now() < self.closes_at
