from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


class Sandbox(models.Model):
    """One running instance of a pattern for one learner.

    States move only along ``TRANSITIONS`` (enforced by ``services.sandbox_transition``):
    requested → starting → running → stopping → stopped, with failed and expired as the
    other ends. Expired sandboxes pass through stopping too, while their nodes are removed.
    """

    class State(models.TextChoices):
        REQUESTED = "requested", "Requested"
        STARTING = "starting", "Starting"
        RUNNING = "running", "Running"
        STOPPING = "stopping", "Stopping"
        STOPPED = "stopped", "Stopped"
        FAILED = "failed", "Failed"
        EXPIRED = "expired", "Expired"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="sandboxes"
    )
    pattern = models.SlugField(max_length=80)
    engine = models.CharField(max_length=16, blank=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.REQUESTED)
    # Where a stop leads: stopped, or expired when housekeeping ended it.
    stop_reason = models.CharField(max_length=16, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    # When a stop was asked for: housekeeping finishes a stop whose task was lost.
    stop_requested_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField()
    last_seen_at = models.DateTimeField()
    launch_seconds = models.FloatField(null=True, blank=True)
    # What a launch is doing now (shown while it starts): see services.sandbox_start.
    stage = models.CharField(max_length=80, blank=True)
    # The live controls' current values (control id → value), re-applied after a restart.
    controls = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["state"]), models.Index(fields=["owner", "state"])]
        permissions = [("control_any_sandbox", "Can inject faults into and change any sandbox")]

    def __str__(self) -> str:
        return f"{self.pattern} {self.hex[:8]} ({self.state})"

    @property
    def hex(self) -> str:
        return self.id.hex

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def is_changing(self) -> bool:
        """On its way up or down: the panel polls until it settles."""
        return self.state in {self.State.REQUESTED, self.State.STARTING, self.State.STOPPING}


ACTIVE_STATES = frozenset(
    {
        Sandbox.State.REQUESTED,
        Sandbox.State.STARTING,
        Sandbox.State.RUNNING,
        Sandbox.State.STOPPING,
    }
)
TERMINAL_STATES = frozenset({Sandbox.State.STOPPED, Sandbox.State.FAILED, Sandbox.State.EXPIRED})
_S = Sandbox.State
TRANSITIONS: dict[str, frozenset[str]] = {
    _S.REQUESTED: frozenset({_S.STARTING, _S.STOPPING, _S.FAILED}),
    _S.STARTING: frozenset({_S.RUNNING, _S.STOPPING, _S.FAILED}),
    _S.RUNNING: frozenset({_S.STOPPING, _S.FAILED}),
    _S.STOPPING: frozenset({_S.STOPPED, _S.EXPIRED, _S.FAILED}),
    _S.STOPPED: frozenset(),
    _S.FAILED: frozenset(),
    _S.EXPIRED: frozenset(),
}


class Node(models.Model):
    """One node of a sandbox, as the platform last saw it."""

    sandbox = models.ForeignKey(Sandbox, on_delete=models.CASCADE, related_name="nodes")
    name = models.CharField(max_length=40)
    role = models.CharField(max_length=40)
    program = models.CharField(max_length=80)
    address = models.CharField(max_length=80, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "name"]
        constraints = [
            models.UniqueConstraint(fields=["sandbox", "name"], name="one_node_name_per_sandbox")
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.role})"


class Fault(models.Model):
    """A failure injected into a node, reverted automatically at ``expires_at``."""

    class Kind(models.TextChoices):
        KILL = "kill", "Kill"
        PAUSE = "pause", "Pause"
        RESTART = "restart", "Restart"
        PARTITION = "partition", "Partition"
        LATENCY = "latency", "Add latency"
        ERRORS = "errors", "Return errors"
        DROP = "drop", "Drop requests"

    sandbox = models.ForeignKey(Sandbox, on_delete=models.CASCADE, related_name="faults")
    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="faults")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    params = models.JSONField(default=dict, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    reverted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.kind} on {self.node.name}"

    @property
    def is_active(self) -> bool:
        return self.reverted_at is None and self.expires_at is not None


class ExperimentRun(models.Model):
    """One learner's run of one of a pattern's experiments on their sandbox.

    ``running`` from the start until the check (``checked``: ``measured``, ``correct`` and
    ``explanation`` are set), or until it ``failed`` (``error`` says why, for the learner)
    or was ``cancelled``. At most one run per sandbox is running. ``timeline`` holds when
    each step actually started (Unix seconds), ``saved_controls`` the live controls' values
    when the run started (for actions that put them back), ``faults`` the pks of the faults
    its steps injected (reverted at once if the learner cancels). Services:
    ``labs.experiments``.
    """

    class State(models.TextChoices):
        RUNNING = "running", "Running"
        CHECKED = "checked", "Checked"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="experiment_runs"
    )
    sandbox = models.ForeignKey(
        Sandbox, null=True, blank=True, on_delete=models.SET_NULL, related_name="experiment_runs"
    )
    pattern = models.SlugField(max_length=80)
    experiment = models.SlugField(max_length=80)
    prediction = models.JSONField(help_text="an option id, or a number")
    state = models.CharField(max_length=16, choices=State.choices, default=State.RUNNING)
    step_index = models.PositiveIntegerField(default=0)
    timeline = models.JSONField(default=list, blank=True)
    saved_controls = models.JSONField(default=dict, blank=True)
    faults = models.JSONField(default=list, blank=True)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    measured = models.JSONField(default=dict, blank=True)
    correct = models.BooleanField(null=True, blank=True)
    explanation = models.TextField(blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-started_at", "-pk"]
        indexes = [models.Index(fields=["user", "pattern", "experiment"])]
        constraints = [
            models.UniqueConstraint(
                fields=["sandbox"],
                condition=models.Q(state="running"),
                name="one_running_experiment_per_sandbox",
            )
        ]

    def __str__(self) -> str:
        return f"{self.pattern}/{self.experiment} by {self.user_id} ({self.state})"

    @property
    def is_running(self) -> bool:
        return self.state == self.State.RUNNING
