"""Reads for sandboxes. Every fetch of a sandbox a user asks for goes through
``sandbox_get_for_user``, which checks permission."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import Http404

from apps.accounts.models import User
from apps.labs.models import ACTIVE_STATES, ExperimentRun, Sandbox

SANDBOX_NOT_FOUND = "No such sandbox."
NOT_YOURS_TO_CONTROL = (
    "You may watch this sandbox, but only its owner (or, with their consent, their "
    "instructors) may change it."
)
log = logging.getLogger(__name__)


def sandbox_can_view(*, user: User, sandbox: Sandbox) -> bool:
    """The owner; staff; an instructor of a classroom the owner is in (to watch, not act:
    see ``sandbox_can_control``)."""
    if not user.is_authenticated:
        return False
    if sandbox.owner_id == user.pk or user.is_staff:
        return True
    from apps.classrooms.selectors import learner_is_taught_by

    return learner_is_taught_by(learner_id=sandbox.owner_id, instructor=user)


def sandbox_get_for_user(*, user: User, sandbox_id: str | uuid.UUID) -> Sandbox:
    """The sandbox, if ``user`` may see it. Another learner's sandbox is a 404 (its
    existence is not revealed); an anonymous user gets PermissionDenied."""
    if not user.is_authenticated:
        raise PermissionDenied
    try:
        sandbox = Sandbox.objects.select_related("owner").get(pk=uuid.UUID(str(sandbox_id)))
    except (ValueError, Sandbox.DoesNotExist):
        raise Http404(SANDBOX_NOT_FOUND) from None
    if not sandbox_can_view(user=user, sandbox=sandbox):
        raise Http404(SANDBOX_NOT_FOUND)
    return sandbox


def sandbox_can_control(*, user: User, sandbox: Sandbox) -> bool:
    """Faults, controls, stop and extend: the owner; someone given the permission to
    control any sandbox (``labs.control_any_sandbox``; superusers have it); an instructor
    of a classroom in which the owner lets instructors act (``Membership``'s
    ``instructors_may_act``, on by default). Staff may watch without these, not act."""
    if not user.is_authenticated:
        return False
    if sandbox.owner_id == user.pk or user.has_perm("labs.control_any_sandbox"):
        return True
    from apps.classrooms.selectors import learner_is_taught_by

    return learner_is_taught_by(learner_id=sandbox.owner_id, instructor=user, to_act=True)


def sandbox_get_for_control(*, user: User, sandbox_id: str | uuid.UUID) -> Sandbox:
    """The sandbox, if ``user`` may act on it: 404 like ``sandbox_get_for_user`` for
    whoever may not see it, PermissionDenied for who may watch but not act. An action by
    someone other than the owner is logged."""
    sandbox = sandbox_get_for_user(user=user, sandbox_id=sandbox_id)
    if not sandbox_can_control(user=user, sandbox=sandbox):
        raise PermissionDenied(NOT_YOURS_TO_CONTROL)
    if sandbox.owner_id != user.pk:
        log.warning(
            "sandbox %s of %s: acted on by %s", sandbox.hex, sandbox.owner.username, user.username
        )
    return sandbox


def sandbox_find(*, sandbox_id: str) -> Sandbox:
    """For operators' commands: a sandbox by full id or unique id prefix."""
    text = sandbox_id.replace("-", "").lower()
    if len(text) < 4 or any(c not in "0123456789abcdef" for c in text):
        raise Sandbox.DoesNotExist(SANDBOX_NOT_FOUND)
    if len(text) == 32:
        return Sandbox.objects.get(pk=uuid.UUID(text))
    matches = [s for s in Sandbox.objects.all() if s.hex.startswith(text)]
    if len(matches) != 1:
        raise Sandbox.DoesNotExist(SANDBOX_NOT_FOUND)
    return matches[0]


def sandbox_list_active() -> QuerySet[Sandbox]:
    return Sandbox.objects.filter(state__in=ACTIVE_STATES)


def sandbox_list_for_user(*, user: User) -> QuerySet[Sandbox]:
    return Sandbox.objects.filter(owner=user)


def sandbox_active_for_user(*, user: User, pattern: str | None = None) -> Sandbox | None:
    qs = Sandbox.objects.filter(owner=user, state__in=ACTIVE_STATES)
    if pattern is not None:
        qs = qs.filter(pattern=pattern)
    return qs.order_by("-created_at").first()


# --- experiments --------------------------------------------------------------------------


def experiment_run_running(*, sandbox: Sandbox) -> ExperimentRun | None:
    """The experiment running on a sandbox, if any (at most one)."""
    return ExperimentRun.objects.filter(sandbox=sandbox, state=ExperimentRun.State.RUNNING).first()


def experiment_last_runs(*, user: User, pattern: str) -> dict[str, ExperimentRun]:
    """The user's latest run of each of a pattern's experiments (on any of their sandboxes),
    by experiment id."""
    latest: dict[str, ExperimentRun] = {}
    for run in ExperimentRun.objects.filter(user=user, pattern=pattern).order_by(
        "-started_at", "-pk"
    ):
        latest.setdefault(run.experiment, run)
    return latest


def experiment_progress_for_user(
    *, user: User, patterns: Iterable[str]
) -> dict[str, tuple[int, int]]:
    """Per pattern: how many of its experiments the user has a checked result for, out
    of how many it has (patterns that do not load have none)."""
    results = experiment_results_for_users(user_ids=[user.pk], patterns=patterns)
    return {p: (len(r.checked), r.available) for p, r in results.get(user.pk, {}).items()}


@dataclass(frozen=True)
class ExperimentResults:
    """One user's results for one pattern's experiments: the ids they ran to a checked
    result, the ids they predicted right at least once, and how many the pattern has."""

    checked: frozenset[str]
    right: frozenset[str]
    available: int


def experiment_results_for_users(
    *, user_ids: Iterable[int], patterns: Iterable[str]
) -> dict[int, dict[str, ExperimentResults]]:
    """For many users at once (a classroom): user id → pattern → results, in one query.
    Experiments a pattern no longer has are not counted."""
    from apps.labs.patterns import PatternError, load_pattern

    wanted = set(patterns)
    users = list(user_ids)
    ids: dict[str, set[str]] = {}
    for pattern in wanted:
        try:
            ids[pattern] = {e.id for e in load_pattern(pattern).experiments}
        except PatternError:
            ids[pattern] = set()
    checked: dict[tuple[int, str], set[str]] = {}
    right: dict[tuple[int, str], set[str]] = {}
    for user_id, pattern, experiment, correct in (
        ExperimentRun.objects.filter(
            user_id__in=users, pattern__in=wanted, state=ExperimentRun.State.CHECKED
        )
        .values_list("user_id", "pattern", "experiment", "correct")
        .distinct()
    ):
        checked.setdefault((user_id, pattern), set()).add(experiment)
        if correct:
            right.setdefault((user_id, pattern), set()).add(experiment)
    return {
        user_id: {
            pattern: ExperimentResults(
                checked=frozenset(ids[pattern] & checked.get((user_id, pattern), set())),
                right=frozenset(ids[pattern] & right.get((user_id, pattern), set())),
                available=len(ids[pattern]),
            )
            for pattern in wanted
        }
        for user_id in users
    }
