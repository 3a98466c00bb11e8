"""Chapter 4, "Try it in the sandbox": event sourcing with two projected read models, one
made to fall behind and catch up, step by step through the platform's services, asserting
what the lab shows against the chapter's text; then the pattern's two experiments."""

from __future__ import annotations

import time

import pytest
from celery import Celery

from apps.accounts.models import User
from tests.walkthroughs.lab import Lab

pytestmark = pytest.mark.django_db(transaction=True)
HISTORY, BALANCES = "projector-history", "projector-balances"


def test_chapter_4_walkthrough_and_experiments(
    walk_engine: str, learner: User, embedded_celery: Celery
) -> None:
    with Lab(learner, "event-sourcing-cqrs") as lab:
        walk(lab)
        experiments(lab)


def walk(lab: Lab) -> None:
    # 1. Commands flow to the store, both projectors poll it and are a few events behind.
    calm = lab.watch(4)
    assert calm.link("client", "commands").n > 40 and calm.link("client", "commands").errors == 0
    for projector in (HISTORY, BALANCES):
        assert max(calm.gauge(projector, "lag")) <= 25, (projector, calm.gauge(projector, "lag"))
        assert calm.link(projector, "event-store").n > 0

    # 2. History stops consuming: commands unaffected, balances current, history's lag
    # climbs steadily (by the append rate); once resumed its reads jump and it catches up.
    lab.control("consuming_history", False)
    stopped = lab.watch(6, settle=0.5)
    assert stopped.link("client", "commands").errors == 0
    assert max(stopped.gauge(BALANCES, "lag")) <= 25
    lags = stopped.gauge(HISTORY, "lag")
    rise = (lags[-1] - lags[0]) / (len(lags) - 1)
    assert 14 <= rise <= 26, lags  # 20 commands a second, each one event
    resumed_at = time.time()
    lab.control("consuming_history", True)
    caught = lab.wait_event("caught_up", resumed_at, timeout=15, node=HISTORY)["data"]
    assert caught["seconds"] <= caught["behind"] / 40, caught  # consumes >= 2x the appends
    burst = lab.watch(1, settle=0)
    assert max(burst.gauge(HISTORY, "lag")) <= 25

    # 3. Read-your-writes waits for the position, history stopped: statements wait out the
    # 1 s limit and fail; balances are unaffected.
    lab.control("read_your_writes", "wait-for-position")
    lab.control("consuming_history", False)
    waiting = lab.watch(4, settle=1.5)
    statements = waiting.link("client", HISTORY)
    assert statements.error_pct >= 80 and 900 <= (statements.p99_ms or 0) <= 1400, statements
    assert waiting.link("client", BALANCES).error_pct <= 5, waiting.link("client", BALANCES)
    lab.control("consuming_history", True)
    lab.control("read_your_writes", "off")

    # 4. Pause the balances projector: balance queries time out, commands and statements
    # carry on; resumed, it catches up from its checkpoint.
    pause = lab.fault(BALANCES, "pause")
    frozen = lab.watch(4)
    assert frozen.link("client", BALANCES).error_pct >= 90, frozen.link("client", BALANCES)
    assert frozen.link("client", "commands").errors == 0
    assert frozen.link("client", HISTORY).error_pct <= 5
    resumed_at = time.time()
    lab.revert(pause)
    caught = lab.wait_event("caught_up", resumed_at, timeout=15, node=BALANCES)["data"]
    assert caught["from_position"] > 1, caught  # from its checkpoint, not from scratch

    # 5. Kill history: its read model is gone; restarted, it replays from position 1.
    killed_at = time.time()
    kill = lab.fault(HISTORY, "kill")
    lab.wait_event("down", killed_at, node=HISTORY)
    lab.revert(kill)
    rebuilt = lab.wait_event("caught_up", killed_at, timeout=60, node=HISTORY)["data"]
    assert rebuilt["from_position"] == 1 and rebuilt["was"] == "rebuilding", rebuilt

    # 6. Commands cut off: they fail, while every query is answered from the read models,
    # which stop changing. Latency on the store slows commands, not queries.
    cut = lab.fault("commands", "partition")
    parted = lab.watch(4)
    assert parted.link("client", "commands").error_pct >= 90, parted.link("client", "commands")
    for projector in (HISTORY, BALANCES):
        assert parted.link("client", projector).error_pct <= 5, parted.link("client", projector)
        assert max(parted.gauge(projector, "lag")) <= 25
    lab.revert(cut)
    lab.wait_until_up("commands")
    slow = lab.fault("event-store", "latency", ms=200)
    slowed = lab.watch(4)
    assert (slowed.link("client", "commands").p50_ms or 0) >= 200, slowed.link("client", "commands")
    assert (slowed.link("client", BALANCES).p99_ms or 0) < 200, slowed.link("client", BALANCES)
    lab.revert(slow)
    lab.watch(2)


def experiments(lab: Lab) -> None:
    run = lab.experiment("catch-up-time", "about-20s")
    assert 1.5 <= run.measured["first"] <= 12, run.measured
    verdicts = lab.verdicts(run)
    assert verdicts["about-5s"].correct and not verdicts["about-20s"].correct
    assert run.correct is False and f"It caught up in {run.measured['first']:.1f} s" in (
        run.explanation
    )

    run = lab.experiment("concurrent-writers", "conflicts")
    assert run.correct is True and run.measured["mean"] >= 2, run.measured
    assert not lab.verdicts(run)["none"].correct
