"""A learner's walk through a chapter's "Try it in the sandbox", as a test.

``Lab`` launches the chapter's pattern through the platform's own services, runs the real
telemetry supervisor beside it, and reads what the live lab shows from the snapshot the
supervisor stores (the per-second history behind its charts, and its event log). A
walkthrough test then does what each numbered step says (faults, controls) and asserts
what the text says the learner will see, within tolerances it states.

The engine is Docker where one answers (required in CI: ``CI=true``), else the local
processes engine, so the fast suite on a laptop without Docker still walks every chapter.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from channels.layers import InMemoryChannelLayer
from django.core.cache import cache

from apps.accounts.models import User
from apps.labs import experiments, services
from apps.labs.engine import get_engine
from apps.labs.engine.base import Engine
from apps.labs.measures import histogram_percentile
from apps.labs.models import ExperimentRun, Fault, Sandbox
from apps.labs.patterns import load_pattern
from apps.labs.supervisor import Supervisor, inspect_cache_key, snapshot_cache_key
from tests.conftest import require

SETTLE_S = 1.5  # after a change, before a window is measured: the system settles


def walkthrough_engine() -> str:
    """``docker`` in CI (it must answer there) or where it answers; else ``local``.
    ``WALKTHROUGH_ENGINE=local`` (or ``docker``) picks one, to check a chapter on both."""
    from apps.labs.engine.docker import DockerEngine

    chosen = os.environ.get("WALKTHROUGH_ENGINE", "")
    if chosen == "local":
        return "local"

    try:
        DockerEngine().ping()
    except Exception as exc:  # any failure means: no Docker here
        require(os.environ.get("CI") != "true", f"a Docker engine ({exc})")
        return "local"
    return "docker"


@dataclass
class Figures:
    """What the lab shows for one series over a window: users, a node, a link or one of
    the pattern's series."""

    n: int
    errors: int
    seconds: int
    p50_ms: float | None
    p99_ms: float | None
    in_flight: float | None = None

    @property
    def rps(self) -> float:
        return self.n / self.seconds if self.seconds else 0.0

    @property
    def error_pct(self) -> float:
        return 100.0 * self.errors / self.n if self.n else 0.0


class Window:
    """The history points of whole seconds between two instants, and the events."""

    def __init__(self, points: list[Mapping[str, Any]], events: list[Mapping[str, Any]]):
        self.points = points
        self.events = events

    def _merge(self, entries: list[Mapping[str, Any]]) -> Figures:
        histogram: dict[float, int] = {}
        for entry in entries:
            for ms, count in entry.get("ms_hist") or []:
                histogram[float(ms)] = histogram.get(float(ms), 0) + int(count)
        merged = sorted(histogram.items())
        p50 = histogram_percentile(merged, 0.5) if merged else None
        p99 = histogram_percentile(merged, 0.99) if merged else None
        if not merged:  # no histogram (a node): the median of the per-second figures
            p50s = sorted(e["p50_ms"] for e in entries if e.get("p50_ms") is not None)
            p99s = sorted(e["p99_ms"] for e in entries if e.get("p99_ms") is not None)
            p50 = p50s[len(p50s) // 2] if p50s else None
            p99 = p99s[len(p99s) // 2] if p99s else None
        flights = [e["in_flight"] for e in entries if isinstance(e.get("in_flight"), int | float)]
        return Figures(
            n=sum(int(e.get("n") or 0) for e in entries),
            errors=sum(int(e.get("errors") or 0) for e in entries),
            seconds=len(self.points),
            p50_ms=p50,
            p99_ms=p99,
            in_flight=sum(flights) / len(flights) if flights else None,
        )

    def users(self) -> Figures:
        return self._merge([p.get("totals") or {} for p in self.points])

    def node(self, name: str) -> Figures:
        return self._merge([(p.get("nodes") or {}).get(name) or {} for p in self.points])

    def link(self, src: str, dst: str) -> Figures:
        return self._merge([(p.get("links") or {}).get(f"{src}>{dst}") or {} for p in self.points])

    def series(self, series_id: str) -> Figures:
        """One of the pattern's ``series`` (calls one node makes on one route)."""
        return self._merge([(p.get("series") or {}).get(series_id) or {} for p in self.points])

    def gauge(self, node: str, gauge: str) -> list[float]:
        out = []
        for p in self.points:
            value = (((p.get("nodes") or {}).get(node) or {}).get("gauges") or {}).get(gauge)
            if isinstance(value, int | float):
                out.append(float(value))
        return out

    def node_states(self, node: str) -> list[str]:
        return [((p.get("nodes") or {}).get(node) or {}).get("state", "?") for p in self.points]

    def texts(self, kind: str | None = None) -> list[str]:
        return [e["text"] for e in self.events if kind is None or e.get("kind") == kind]


class Lab:
    """One launched sandbox of a pattern, watched by a real supervisor."""

    def __init__(self, user: User, pattern_id: str) -> None:
        self.engine: Engine = get_engine()
        created = services.sandbox_launch(user=user, pattern_id=pattern_id, enqueue=False)
        self.sandbox: Sandbox = services.sandbox_start(sandbox_id=created.hex)
        assert self.sandbox.state == Sandbox.State.RUNNING, self.sandbox.message
        self._stop = threading.Event()
        self._supervisor = Supervisor(self.engine, InMemoryChannelLayer(capacity=10_000))
        self._thread = threading.Thread(target=self._supervisor.run, args=(self._stop,))
        self._thread.start()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        self.engine.destroy(self.sandbox.hex)

    # ---- what the learner does ------------------------------------------------------------

    def fault(self, node: str, kind: str, duration: int = 120, **params: Any) -> Fault:
        return services.fault_inject(
            sandbox=self.sandbox, node_name=node, kind=kind, duration=duration, params=params
        )

    def revert(self, fault: Fault) -> None:
        services.fault_revert(fault_id=fault.pk)

    def revert_all(self) -> None:
        for fault in Fault.objects.filter(sandbox=self.sandbox, reverted_at__isnull=True):
            services.fault_revert(fault_id=fault.pk)

    def control(self, control_id: str, value: Any) -> None:
        services.sandbox_control(sandbox=self.sandbox, control_id=control_id, value=value)

    # ---- what the learner sees ------------------------------------------------------------

    def snapshot(self) -> Mapping[str, Any]:
        stored = cache.get(snapshot_cache_key(self.sandbox.hex))
        return stored if isinstance(stored, dict) else {}

    def collected(self) -> Mapping[str, Any]:
        """What the lab's Traces and Logs cards read: the collector's traces and log lines."""
        stored = cache.get(inspect_cache_key(self.sandbox.hex))
        return stored if isinstance(stored, dict) else {}

    def watch(self, seconds: float, settle: float = SETTLE_S) -> Window:
        """Wait ``settle`` seconds, then watch for ``seconds``: the whole seconds of that
        span as the lab's history has them (waits until the history covers them)."""
        time.sleep(settle)  # the system settles after a change: not a wait for a condition
        start = time.time()
        time.sleep(seconds)  # a window of traffic to measure
        while math.floor(time.time()) < math.ceil(start) + 1:  # at least one whole second
            time.sleep(0.05)
        return self.between(start, time.time())

    def between(self, start: float, end: float) -> Window:
        """What the lab's history holds of the whole seconds from ``start`` to ``end``
        (already past: waits until the history covers them)."""
        first, last = math.ceil(start) + 1, math.floor(end)
        deadline = time.monotonic() + 10
        while True:
            snapshot = self.snapshot()
            history = snapshot.get("history") or []
            if history and history[-1]["ts"] >= last:
                break
            assert time.monotonic() < deadline, "the lab's history did not reach the window"
            time.sleep(0.2)
        points = [p for p in history if first <= p["ts"] <= last]
        events = [e for e in snapshot.get("events") or [] if start <= e["ts"] <= end + 1]
        return Window(points, events)

    def experiment(self, experiment_id: str, prediction: Any) -> ExperimentRun:
        """Run one of the pattern's experiments with a prediction, as the learner does
        (its steps and check run as background tasks: the test needs a Celery worker),
        and return the checked run."""
        started = experiments.experiment_start(
            user=self.sandbox.owner,
            sandbox_id=self.sandbox.hex,
            experiment_id=experiment_id,
            prediction=prediction,
        )
        deadline = time.monotonic() + 300
        while True:
            run = ExperimentRun.objects.get(pk=started.pk)
            if not run.is_running:
                assert run.state == ExperimentRun.State.CHECKED, run.error
                return run
            assert time.monotonic() < deadline, f"{experiment_id} did not finish"
            time.sleep(0.5)

    def steps(self, run: ExperimentRun, skip_s: float = 0.0) -> dict[str, Window]:
        """What the lab's history holds of each step of a checked run, from ``skip_s``
        seconds after the step began (as a check's ``skip_s``) to its end."""
        experiment = load_pattern(run.pattern).experiment(run.experiment)
        assert experiment is not None
        timeline = experiments.run_timeline(run, experiment)
        return {
            step: self.between(start + skip_s, end) for step, (start, end) in timeline.steps.items()
        }

    def verdicts(self, run: ExperimentRun) -> dict[Any, experiments.Verdict]:
        """How the run's measurement judges every option of its (choice) prediction."""
        experiment = load_pattern(run.pattern).experiment(run.experiment)
        assert experiment is not None
        values = experiments.pattern_values(run.pattern)
        return {
            option.id: experiments.judge(experiment, option.id, run.measured, values)
            for option in experiment.prediction.options
        }

    def wait_event(
        self,
        kind: str,
        since: float,
        timeout: float = 10.0,
        node: str | None = None,
        **data: Any,
    ) -> Mapping[str, Any]:
        """The first event of this kind (of this node, with these ``data`` fields) in the
        lab's log since ``since``."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.snapshot().get("events") or []:
                mine = node is None or event.get("node") == node
                fields = event.get("data") or {}
                matches = all(fields.get(k) == v for k, v in data.items())
                if event.get("kind") == kind and event["ts"] >= since and mine and matches:
                    return event
            assert time.monotonic() < deadline, f"no {kind} event within {timeout:g} s"
            time.sleep(0.2)

    def snapshot_texts(self, kind: str, since: float) -> list[str]:
        """The texts of the lab log's events of this kind since ``since``, as shown now."""
        events = self.snapshot().get("events") or []
        return [e["text"] for e in events if e.get("kind") == kind and e["ts"] >= since]

    def table_rows(self, table: str) -> list[Mapping[str, Any]]:
        """The rows the lab's state panel shows now for a declared table."""
        for entry in (self.snapshot().get("frame") or {}).get("tables") or []:
            if entry.get("id") == table:
                return list(entry.get("rows") or [])
        return []

    def wait_until_up(self, node: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            frame = self.snapshot().get("frame") or {}
            if ((frame.get("nodes") or {}).get(node) or {}).get("state") == "up":
                return
            assert time.monotonic() < deadline, f"{node} not up within {timeout:g} s"
            time.sleep(0.2)
