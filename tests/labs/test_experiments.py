"""Experiments: the format in pattern.yaml, the measures on synthetic histories, judging and
explanations, the services (permission, state, one at a time, predictions, steps, the
check), the fragment's views, the course home's progress, and one run end to end on a
real sandbox with the supervisor and the worker running."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from celery import Celery
from channels.layers import InMemoryChannelLayer
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.db import OperationalError
from django.http import Http404
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from apps.accounts.models import User
from apps.courses.models import Chapter
from apps.labs import experiments, measures, selectors, services
from apps.labs.engine.base import Engine
from apps.labs.measures import MeasureError, TelemetryMissing, Timeline, safe_format
from apps.labs.models import ExperimentRun, Fault, Sandbox
from apps.labs.patterns import (
    FAULT_PARAM_NAMES,
    Condition,
    Judge,
    PatternError,
    Prediction,
    Rule,
    load_pattern,
)
from apps.labs.supervisor import Supervisor, snapshot_cache_key
from tests.conftest import client_for, make_user, queued
from tests.labs.engine.test_contract import wait_for
from tests.sandboxes.test_patterns import SPEC

T = TypeVar("T")
KILL = "kill-replica"
POLICY = "slow-replica-policy"

# ---- the format ------------------------------------------------------------------------

# Appended to the loader tests' SPEC (18 lines): these lines are numbered from 19.
EXPERIMENTS = """\
experiments:
  - id: slow
    title: Kill a worker
    intro: Kill worker-2 and time the errors.
    prediction:
      question: How many seconds do errors last?
      kind: number
      unit: s
      min: 0
      max: 60
    steps:
      - id: calm
        text: Baseline.
        duration_s: 2
      - id: break
        text: worker-2 is killed.
        action: {fault: {node: worker-2, kind: kill, duration_s: 5}}
        duration_s: 5
      - id: back
        text: Mode back.
        action: [{control: {id: mode, value: b}}, {control: {id: mode, restore: true}}]
        duration_s: 0
    check:
      measure: error_duration
      params: {from_step: break}
      judge: {value: error_s, tolerance: 0.5, tolerance_pct: 20}
      explanation: "Errors lasted {error_s:.1f} s (checks every {params.interval_s:g} s)."
  - id: pick
    title: Pick one
    intro: Compare two phases.
    prediction:
      question: Which phase sends less to worker-2?
      kind: choice
      options: [{id: first, label: The first}, {id: second, label: The second}]
    steps:
      - {id: one, text: Phase one., duration_s: 5, action: {control: {id: mode, value: a}}}
      - {id: two, text: Phase two., duration_s: 5}
    check:
      measure: share_by_node
      params: {node: worker-2, phases: {p1: one, p2: two}}
      judge:
        rules:
          - {answer: second, when: {p2_share_pct: {lt: 0.8 * p1_share_pct}}}
          - {answer: first}
      explanation:
        second: "Its share fell from {p1_share_pct:.0f}% to {p2_share_pct:.0f}%."
        default: "Shares: {p1_share_pct:.0f}% then {p2_share_pct:.0f}% ({answer})."
"""


def write_spec(root: Path, changes: dict[int, str]) -> Path:
    lines = (SPEC + EXPERIMENTS).splitlines()
    for number, text in changes.items():
        lines[number - 1] = text
    folder = root / "test"
    folder.mkdir()
    (folder / "pattern.yaml").write_text("\n".join(lines) + "\n")
    for program in ("worker.py", "front.py"):
        (folder / program).write_text("def setup(node):\n    pass\n")
    return folder / "pattern.yaml"


def test_the_test_experiments_load(tmp_path: Path) -> None:
    write_spec(tmp_path, {})
    slow, pick = load_pattern("test", root=tmp_path).experiments
    assert (slow.id, slow.title, slow.duration_s) == ("slow", "Kill a worker", 7.0)
    assert slow.prediction.kind == "number" and slow.prediction.unit == "s"
    assert (slow.prediction.min, slow.prediction.max) == (0.0, 60.0)
    kill = slow.steps[1].actions[0]
    assert (kill.kind, kill.node, kill.fault, kill.duration_s) == ("fault", "worker-2", "kill", 5)
    back = slow.steps[2].actions
    assert [(a.control, a.value, a.restore) for a in back] == [
        ("mode", "b", False),
        ("mode", None, True),
    ]
    assert slow.check.measure == "error_duration" and dict(slow.check.params) == {
        "from_step": "break"
    }
    assert slow.check.judge == Judge(value="error_s", tolerance=0.5, tolerance_pct=20.0)
    assert slow.check.show[0] == "error_s"
    assert [o.id for o in pick.prediction.options] == ["first", "second"]
    assert pick.check.judge.rules[0] == Rule(
        "second", (Condition("p2_share_pct", "lt", "p1_share_pct", 0.8),)
    )
    assert pick.check.params["skip_s"] == 1.0  # the measure's default
    assert set(pick.check.explanation) == {"second", "default"}
    assert slow.step_offsets() == [0.0, 2.0, 7.0, 7.0]


FORMAT_ERRORS = [
    (
        {19: "experiments: 5", **{n: "#" for n in range(20, 19 + EXPERIMENTS.count("\n"))}},
        19,
        "experiments: must be a list",
    ),
    ({20: "  - id: Slow!"}, 20, "experiments[0].id: 'Slow!' is not a valid name here"),
    ({46: "  - id: slow"}, 46, "experiments[1].id: the id 'slow' is used twice"),
    ({21: "    title: T\n    colour: red"}, 22, "experiments[0]: unknown key 'colour'"),
    ({22: "    # no intro"}, 20, "experiments[0]: missing key 'intro'"),
    ({25: "      kind: guess"}, 25, "prediction.kind: must be one of choice, number, got 'guess'"),
    ({26: "      options: []"}, 26, "experiments[0].prediction: unknown key 'options'"),
    ({28: "      max: -1"}, 28, "experiments[0].prediction.max: must be from 0 to"),
    (
        {52: "      options: [{id: first, label: The first}]"},
        52,
        "prediction.options: a choice needs two or more options",
    ),
    (
        {52: "      options: [{id: first, label: A}, {id: first, label: B}]"},
        52,
        "prediction.options[1].id: the id 'first' is used twice",
    ),
    (
        {29: "    steps: []", **{n: "#" for n in range(30, 41)}},
        29,
        "experiments[0].steps: an experiment needs at least one step",
    ),
    ({33: "      - id: calm"}, 33, "experiments[0].steps[1].id: the id 'calm' is used twice"),
    ({32: "        duration_s: 500"}, 32, "steps[0].duration_s: must be from 0 to 120, got 500"),
    (
        {
            32: "        duration_s: 100",
            36: "        duration_s: 100",
            40: "        duration_s: 100",
        },
        29,
        "experiments[0].steps: they last 300 s in all, more than 240 s",
    ),
    (
        {35: "        action: {fault: {node: worker-9, kind: kill, duration_s: 5}}"},
        35,
        "steps[1].action.fault.node: unknown node 'worker-9'",
    ),
    (
        {35: "        action: {fault: {node: worker, kind: kill, duration_s: 5}}"},
        35,
        "steps[1].action.fault.node: unknown node 'worker'",
    ),
    (
        {35: "        action: {fault: {node: worker-2, kind: pause, duration_s: 5}}"},
        35,
        "fault.kind: 'pause' is not one of the pattern's faults (kill, latency)",
    ),
    (
        {35: "        action: {fault: {node: worker-2, kind: kill}}"},
        35,
        "steps[1].action.fault: missing key 'duration_s'",
    ),
    (
        {35: "        action: {fault: {node: worker-2, kind: kill, duration_s: 0}}"},
        35,
        "fault.duration_s: must be from 1 to 600, got 0",
    ),
    (
        {
            35: "        action: {fault: {node: worker-2, kind: latency, duration_s: 5,"
            " params: {hue: 1}}}"
        },
        35,
        "the fault 'latency' takes no parameter 'hue' (it takes: ms, jitter_ms)",
    ),
    (
        {
            35: "        action: {fault: {node: worker-2, kind: kill, duration_s: 5},"
            " control: {id: mode, value: a}}"
        },
        35,
        "steps[1].action: must be exactly one of: fault, control",
    ),
    ({35: "        action: 5"}, 35, "steps[1].action: must be an action"),
    (
        {35: "        action: {reboot: {node: worker-2}}"},
        35,
        "steps[1].action: unknown key 'reboot'",
    ),
    (
        {39: "        action: {control: {id: speed, value: 1}}"},
        39,
        "control.id: the pattern has no control 'speed' (it has: workers, mode)",
    ),
    (
        {39: "        action: {control: {id: mode, value: c}}"},
        39,
        "steps[2].action.control.value: must be one of a, b, got 'c'",
    ),
    (
        {39: "        action: {control: {id: mode, restore: false}}"},
        39,
        "steps[2].action.control.restore: must be true",
    ),
    (
        {39: "        action: [{control: {id: mode}}]"},
        39,
        "steps[2].action[0].control: needs either a value or restore: true",
    ),
    (
        {42: "      measure: vibes"},
        42,
        "check.measure: unknown measure 'vibes' (expected one of: error_duration, share_by_node",
    ),
    ({43: "      params: {}"}, 43, "experiments[0].check.params: missing key 'from_step'"),
    ({43: "      params: {from_step: break, hue: 1}"}, 43, "check.params: unknown key 'hue'"),
    (
        {43: "      params: {from_step: nowhere}"},
        43,
        "check.params.from_step: 'nowhere' is not a step of this experiment "
        "(steps: calm, break, back)",
    ),
    (
        {43: "      params: {from_step: break, to_step: calm}"},
        43,
        "check.params.to_step: comes before from_step",
    ),
    (
        {44: "      judge: {value: hue, tolerance: 1}"},
        44,
        "check.judge.value: 'hue' is not a value the measure gives (it gives: error_s,",
    ),
    ({44: "      judge: {value: error_s}"}, 44, "needs a tolerance, a tolerance_pct or buckets"),
    ({44: "      judge: {value: error_s, buckets: [5, 1]}"}, 44, "judge.buckets: must go up"),
    (
        {44: "      judge: {value: error_s, buckets: [1], tolerance: 1}"},
        44,
        "give buckets or a tolerance, not both",
    ),
    ({44: "      judge: {rules: []}"}, 44, "check.judge: unknown key 'rules'"),
    ({45: '      explanation: "Lasted {hue} s"'}, 45, "check.explanation: unknown value {hue}"),
    (
        {45: '      explanation: "{error_s.__class__}"'},
        45,
        "unknown value {error_s.__class__}",
    ),
    ({45: '      explanation: "{error_s:.1q}"'}, 45, "Unknown format code 'q'"),
    ({45: '      explanation: "{error_s!r}"'}, 45, "conversions are not supported"),
    ({45: '      explanation: "{} s"'}, 45, "every {…} must name a value"),
    ({45: '      explanation: "{error_s s"'}, 45, "malformed template"),
    (
        {45: '      explanation: "{prediction:.1f}"'},
        45,
        "Unknown format code 'f' for object of type 'str'",
    ),
    ({45: '      explanation: "{error_s:{hue}}"'}, 45, "nested fields are not supported"),
    ({45: "      explanation: {default: x}"}, 45, "a number prediction takes one template"),
    ({45: "      explanation: 3"}, 45, "must be a template, or a mapping of answer → template"),
    (
        {62: "          - {answer: third}"},
        62,
        "rules[1].answer: 'third' is not one of the options (first, second)",
    ),
    (
        {62: "          - {answer: first, when: {p1_share_pct: {gt: 0}}}"},
        62,
        "judge.rules: the last rule must have no `when`",
    ),
    ({61: "          - {answer: first}"}, 62, "rules[1]: comes after a rule without `when`"),
    (
        {61: "          - {answer: second, when: {speed: {lt: 1}}}"},
        61,
        "rules[0].when: 'speed' is not a value the measure gives",
    ),
    (
        {61: "          - {answer: second, when: {p2_share_pct: {below: 1}}}"},
        61,
        "unknown comparison 'below' (expected one of: lt, le, gt, ge, eq, ne)",
    ),
    (
        {61: "          - {answer: second, when: {p2_share_pct: {lt: lots}}}"},
        61,
        "p2_share_pct.lt: must be a number, a measured value or N * a measured value",
    ),
    ({64: "        third: x"}, 64, "check.explanation: 'third' is neither one of the options"),
    ({65: "#"}, 63, "check.explanation: no template for the answer 'first' (add it, or a default)"),
    (
        {65: '        default: "{p3_share_pct}"'},
        65,
        "check.explanation.default: unknown value {p3_share_pct}",
    ),
    (
        {58: "      params: {node: front, phases: {p1: one, p2: two}}"},
        58,
        "check.params.node: 'front' is a single node: name the role",
    ),
    ({58: "      params: {node: worker-2, phases: {}}"}, 58, "phases: needs at least one phase"),
    (
        {58: "      params: {node: worker-2, phases: {Phase-1: one}}"},
        58,
        "'Phase-1' is not a valid phase name",
    ),
    (
        {58: "      params: {node: worker-2, phases: {p1: one, p2: two}, skip_s: 100}"},
        58,
        "check.params.skip_s: must be from 0 to 60, got 100",
    ),
    (
        {58: "      params: {node: worker-2, role: front, phases: {p1: one, p2: two}}"},
        58,
        "check.params.role: 'front' is not a replicated role",
    ),
    (
        {57: "      measure: phase_stats", 58: "      params: {phases: {p1: one}, series: ghost}"},
        58,
        "check.params.series: 'ghost' is not a declared series (series: none)",
    ),
    (
        {
            14: "params: {interval_s: 1.0}\nseries: [{id: calls, node: front, route: /}]",
            57: "      measure: phase_stats",
            58: "      params: {phases: {p1: one}, series: calls, link: front>worker-1}",
        },
        59,
        "check.params: give link or series, not both",
    ),
    (
        {57: "      measure: share_by_node\n      show: [hue]"},
        58,
        "check.show[0]: 'hue' is not a value the measure gives",
    ),
]


@pytest.mark.parametrize(("changes", "line", "message"), FORMAT_ERRORS, ids=lambda v: str(v)[:40])
def test_format_errors_name_the_file_and_line(
    tmp_path: Path, changes: dict[int, str], line: int, message: str
) -> None:
    path = write_spec(tmp_path, changes)
    with pytest.raises(PatternError) as caught:
        load_pattern("test", root=tmp_path)
    assert str(caught.value).startswith(f"{path}:{line}: "), caught.value
    assert message in str(caught.value)


def test_chapter_5_ships_the_two_experiments() -> None:
    pattern = load_pattern("replicated-lb")
    kill, policy = pattern.experiments
    assert (kill.id, policy.id) == (KILL, POLICY)
    for experiment in (kill, policy):
        assert experiment.duration_s <= 30  # short enough for a browser test
        assert experiment.prediction.kind == "choice"
    assert [o.id for o in kill.prediction.options] == ["none", "under-3s", "3-8s", "longer"]
    assert kill.check.measure == "error_duration"
    assert dict(kill.check.params) == {"from_step": "kill"}
    killing = kill.steps[1].actions[0]
    assert (killing.fault, killing.node) == ("kill", "replica-2")
    assert policy.check.params["node"] == "replica-3"
    assert dict(policy.check.params["phases"]) == {"rr": "round-robin", "lc": "least-connections"}
    # Both put the learner's settings back at the end.
    assert all(a.restore for a in kill.steps[-1].actions + policy.steps[-1].actions)
    assert {a.control for a in policy.steps[-1].actions} == {"policy", "rps"}
    assert pattern.spec_values()["params.health_interval_s"] == 1.0
    assert pattern.spec_values()["params.unhealthy_threshold"] == 1


def test_every_fault_action_passes_the_platforms_own_checks() -> None:
    """The loader checks parameter names; services.fault_inject checks their values."""
    for kind, names in FAULT_PARAM_NAMES.items():
        assert set(names) == set(services.FAULT_PARAMS[kind]), kind
    for experiment in load_pattern("replicated-lb").experiments:
        for step in experiment.steps:
            for action in step.actions:
                if action.kind == "fault":
                    services.fault_params(action.fault, dict(action.params))
                    assert 1 <= action.duration_s <= services.MAX_FAULT_SECONDS


# ---- predictions, judging, templates -----------------------------------------------------

NUMBER = Prediction("How long?", "number", unit="s", min=0, max=60)
CHOICE = load_pattern("replicated-lb").experiment(KILL).prediction  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("prediction", "raw", "expected"),
    [(NUMBER, "2.5", 2.5), (NUMBER, " 2,5 ", 2.5), (NUMBER, 3, 3.0), (CHOICE, "3-8s", "3-8s")],
)
def test_good_predictions_are_normalised(prediction: Prediction, raw: Any, expected: Any) -> None:
    assert prediction.validate(raw) == expected


@pytest.mark.parametrize(
    ("prediction", "raw", "message"),
    [
        (NUMBER, "", "Enter your prediction as a number (in s)."),
        (NUMBER, "soon", "Enter your prediction as a number (in s)."),
        (NUMBER, "nan", "Enter your prediction as a number (in s)."),
        (NUMBER, True, "Enter your prediction as a number (in s)."),
        (NUMBER, "-1", "Your prediction must be from 0 to 60 s."),
        (NUMBER, "61", "Your prediction must be from 0 to 60 s."),
        (CHOICE, None, "Choose an answer before you start."),
        (CHOICE, "", "Choose an answer before you start."),
        (CHOICE, "forever", "'forever' is not one of the answers: choose one of the options."),
    ],
)
def test_bad_predictions_get_a_sentence_for_the_learner(
    prediction: Prediction, raw: Any, message: str
) -> None:
    with pytest.raises(ValueError) as caught:
        prediction.validate(raw)
    assert str(caught.value) == message


def test_number_judges_use_a_tolerance_or_buckets() -> None:
    measured = {"error_s": 3.0}
    both = Judge(value="error_s", tolerance=0.5, tolerance_pct=20)
    assert both.answer(measured) == 3.0
    assert both.correct(3.4, measured) and both.correct(2.4, measured)  # 20 % of 3 s
    assert not both.correct(3.7, measured) and not both.correct(2.2, measured)
    absolute = Judge(value="error_s", tolerance=0.5)
    assert absolute.correct(3.5, measured) and not absolute.correct(3.6, measured)
    assert Judge(value="error_s", tolerance_pct=10).correct(0.0, {"error_s": 0.0})
    buckets = Judge(value="error_s", buckets=(1.0, 5.0))  # [.., 1) [1, 5) [5, ..)
    assert buckets.correct(1.0, measured) and buckets.correct(4.9, measured)
    assert not buckets.correct(0.9, measured) and not buckets.correct(5.0, measured)


def test_choice_judges_take_the_first_rule_that_holds() -> None:
    judge = load_pattern("replicated-lb").experiment(KILL).check.judge  # type: ignore[union-attr]
    base = {"error_s": 0.0, "errors": 0.0, "calls": 500.0, "error_pct": 0.0, "ongoing": 0.0}
    assert judge.answer(base) == "none"
    assert judge.answer(base | {"errors": 1.0}) == "under-3s"  # one error: a span of 0 s
    assert judge.answer(base | {"errors": 9.0, "error_s": 2.62}) == "under-3s"
    assert judge.answer(base | {"errors": 30.0, "error_s": 3.0}) == "3-8s"
    assert judge.answer(base | {"errors": 90.0, "error_s": 8.0}) == "longer"
    assert judge.answer(base | {"errors": 9.0, "error_s": 0.5, "ongoing": 1.0}) == "longer"
    assert judge.correct("under-3s", base | {"errors": 9.0, "error_s": 0.62})
    assert not judge.correct("none", base | {"errors": 9.0, "error_s": 0.62})

    policy = load_pattern("replicated-lb").experiment(POLICY).check.judge  # type: ignore[union-attr]
    assert policy.answer({"rr_share_pct": 33.0, "lc_share_pct": 8.0}) == "least-connections"
    assert policy.answer({"rr_share_pct": 8.0, "lc_share_pct": 33.0}) == "round-robin"
    assert policy.answer({"rr_share_pct": 33.0, "lc_share_pct": 30.0}) == "same"


def test_templates_only_see_the_values_they_are_given() -> None:
    values = {"error_s": 0.4242, "params.health_interval_s": 1.0}
    assert safe_format("{error_s:.2f} s / {params.health_interval_s:g} s", values) == "0.42 s / 1 s"
    for bad in ("{error_s.__class__}", "{error_s[0]}", "{0}", "{secret}", "{error_s!r}"):
        with pytest.raises(measures.TemplateError):
            safe_format(bad, values)


def test_the_explanation_uses_the_measured_figures_and_the_spec() -> None:
    experiment = load_pattern("replicated-lb").experiment(KILL)
    assert experiment is not None
    measured = {"error_s": 0.437, "errors": 7.0, "calls": 500.0, "error_pct": 1.4, "ongoing": 0.0}
    verdict = experiments.judge(
        experiment, "3-8s", measured, load_pattern("replicated-lb").spec_values()
    )
    assert verdict.answer == "under-3s" and verdict.correct is False
    assert verdict.explanation.startswith("Errors lasted 0.44 s, from the first failed request")
    assert "(7 of 500 requests, 1.4%)" in verdict.explanation
    assert "checks every 1 s, and a check of a killed process fails at once" in verdict.explanation
    assert "ejects a replica after 1 failed check(s) in a row" in verdict.explanation
    none = experiments.judge(
        experiment,
        "none",
        measured | {"errors": 0.0, "error_s": 0.0},
        {"params.health_interval_s": 1.0},
    )
    assert none.correct and none.explanation.startswith("No request failed (500 sent)")


# ---- measures on synthetic histories -----------------------------------------------------

S0 = 1_800_000_000  # a whole second


def point(
    ts: int,
    *,
    calls: int = 50,
    errors: int = 0,
    first: float | None = None,
    last: float | None = None,
    hist: list[list[float]] | None = None,
    nodes: dict[str, int] | None = None,
) -> dict[str, Any]:
    return {
        "ts": ts,
        "totals": {
            "rps": float(calls),
            "error_pct": 100.0 * errors / calls if calls else 0.0,
            "p50_ms": None,
            "p99_ms": None,
            "n": calls,
            "errors": errors,
            "first_error_ts": first,
            "last_error_ts": last,
            "ms_hist": hist if hist is not None else [[4.87, calls]],
        },
        "nodes": {
            name: {
                "rps": float(n),
                "error_pct": 0.0,
                "p50_ms": None,
                "p99_ms": None,
                "n": n,
                "errors": 0,
            }
            for name, n in (nodes or {}).items()
        },
    }


def calm(first: int, last: int, **fields: Any) -> list[dict[str, Any]]:
    return [point(ts, **fields) for ts in range(first, last + 1)]


KILL_PARAMS = {"from_step": "kill"}
KILL_TIMELINE = Timeline({"baseline": (S0 + 0.3, S0 + 4.3), "kill": (S0 + 4.3, S0 + 14.3)})


def error_duration(
    history: list[dict[str, Any]], timeline: Timeline = KILL_TIMELINE
) -> dict[str, float]:
    return measures.MEASURES["error_duration"].compute(history, timeline, KILL_PARAMS)


def test_error_duration_spans_the_first_to_the_last_failed_call() -> None:
    history = calm(S0 - 5, S0 + 17)
    history[S0 + 5 - (S0 - 5)] = point(S0 + 5, errors=6, first=S0 + 4.412, last=S0 + 4.98)
    history[S0 + 6 - (S0 - 5)] = point(S0 + 6, errors=2, first=S0 + 5.02, last=S0 + 5.2567)
    measured = error_duration(history)
    assert measured == {
        "error_s": 0.845,
        "errors": 8.0,
        "calls": 50.0 * 11,  # the seconds the window touches: S0+5 … S0+15
        "error_pct": round(800 / 550, 2),
        "ongoing": 0.0,
        "window_s": 10.0,
    }


def test_error_duration_without_errors_is_zero() -> None:
    measured = error_duration(calm(S0 - 5, S0 + 17))
    assert (measured["error_s"], measured["errors"], measured["ongoing"]) == (0.0, 0.0, 0.0)
    assert measured["error_pct"] == 0.0


def test_a_single_error_lasts_zero_seconds() -> None:
    history = calm(S0, S0 + 16)
    history[6] = point(S0 + 6, errors=1, first=S0 + 5.5, last=S0 + 5.5)
    measured = error_duration(history)
    assert (measured["error_s"], measured["errors"]) == (0.0, 1.0)


def test_errors_still_going_on_at_the_end_are_flagged() -> None:
    history = [
        point(ts, errors=17, first=ts - 0.97, last=ts - 0.03) if ts > S0 + 4 else point(ts)
        for ts in range(S0, S0 + 17)
    ]
    measured = error_duration(history)
    assert measured["ongoing"] == 1.0
    assert measured["error_s"] == round((S0 + 15 - 0.03) - (S0 + 5 - 0.97), 3)
    assert load_pattern("replicated-lb").experiment(KILL).check.judge.answer(measured) == "longer"  # type: ignore[union-attr]


def test_missing_telemetry_is_its_own_error() -> None:
    with pytest.raises(TelemetryMissing, match="it is empty"):
        error_duration([])
    with pytest.raises(TelemetryMissing, match="the history reaches"):
        error_duration(calm(S0, S0 + 12))  # ends before the window does
    gappy = [p for p in calm(S0, S0 + 16) if p["ts"] not in (S0 + 8, S0 + 9)]
    with pytest.raises(TelemetryMissing, match="2 s of it are missing"):
        error_duration(gappy)
    one_gap = [p for p in calm(S0, S0 + 16) if p["ts"] != S0 + 8]
    assert error_duration(one_gap)["calls"] == 500.0  # one missing second is tolerated
    junk = [{"ts": "soon"}, "junk", *calm(S0, S0 + 16)]
    assert error_duration(junk)["calls"] == 550.0  # type: ignore[arg-type]


def test_no_traffic_is_a_measure_error_not_missing_telemetry() -> None:
    with pytest.raises(MeasureError) as caught:
        error_duration(calm(S0, S0 + 16, calls=0))
    assert not isinstance(caught.value, TelemetryMissing)
    assert "Requests per second above 0" in str(caught.value)


def test_points_from_before_the_counts_existed_use_their_rate() -> None:
    history = calm(S0, S0 + 16)
    for p in history:
        del p["totals"]["n"], p["totals"]["first_error_ts"], p["totals"]["last_error_ts"]
    assert error_duration(history)["calls"] == 550.0


POLICY_PARAMS = {
    "node": "replica-3",
    "phases": {"rr": "round-robin", "lc": "least-connections"},
    "skip_s": 1.0,
}
POLICY_TIMELINE = Timeline(
    {"round-robin": (S0 + 0.4, S0 + 10.4), "least-connections": (S0 + 10.4, S0 + 20.4)}
)


def test_share_by_node_per_phase_skips_the_settling_second_and_partial_seconds() -> None:
    history = []
    for ts in range(S0 - 2, S0 + 23):
        if ts <= S0 + 11:  # round robin (S0+11 is the settling second of the next phase)
            nodes = {"replica-1": 17, "replica-2": 17, "replica-3": 16, "lb": 50, "traffic": 50}
            hist = [[4.87, 34], [307.0, 16]]
        else:
            nodes = {"replica-1": 24, "replica-2": 23, "replica-3": 3, "lb": 50, "traffic": 50}
            hist = [[4.87, 47], [307.0, 3]]
        history.append(point(ts, hist=hist, nodes=nodes))
    measured = measures.MEASURES["share_by_node"].compute(history, POLICY_TIMELINE, POLICY_PARAMS)
    # Whole seconds after the first: rr S0+3 … S0+10 (8 s), lc S0+13 … S0+20 (8 s).
    assert measured["rr_node_requests"] == 16 * 8 and measured["rr_requests"] == 50 * 8
    assert measured["rr_share_pct"] == 32.0
    assert measured["lc_node_requests"] == 3 * 8 and measured["lc_share_pct"] == 6.0
    assert (measured["rr_p50_ms"], measured["rr_p99_ms"]) == (4.87, 307.0)
    assert (measured["lc_p50_ms"], measured["lc_p99_ms"]) == (4.87, 307.0)  # 6 % are slow
    assert measured["rr_error_pct"] == 0.0
    judge = load_pattern("replicated-lb").experiment(POLICY).check.judge  # type: ignore[union-attr]
    assert judge.answer(measured) == "least-connections"


def test_share_by_node_refuses_what_it_cannot_measure() -> None:
    share = measures.MEASURES["share_by_node"].compute
    nodes = {"replica-1": 10, "replica-3": 5}
    short = Timeline(
        {"round-robin": (S0 + 0.4, S0 + 2.2), "least-connections": (S0 + 2.2, S0 + 9.0)}
    )
    with pytest.raises(MeasureError, match="too short a time"):
        share(calm(S0, S0 + 10, nodes=nodes), short, POLICY_PARAMS)
    with pytest.raises(MeasureError, match="No replica served any request"):
        share(calm(S0, S0 + 21, nodes={"lb": 50}), POLICY_TIMELINE, POLICY_PARAMS)
    with pytest.raises(TelemetryMissing):
        share(calm(S0, S0 + 15, nodes=nodes), POLICY_TIMELINE, POLICY_PARAMS)


def test_histogram_percentiles() -> None:
    assert measures.histogram_percentile([], 0.5) is None
    histogram = [(1.0, 50), (10.0, 49), (100.0, 1)]
    assert measures.histogram_percentile(histogram, 0.5) == 1.0
    assert measures.histogram_percentile(histogram, 0.99) == 10.0
    assert measures.histogram_percentile(histogram, 1.0) == 100.0


# ---- services ----------------------------------------------------------------------------


def running_sandbox(user: User, state: str = Sandbox.State.RUNNING) -> Sandbox:
    """A sandbox row in a given state (no engine: enough for what the services check)."""
    now = timezone.now()
    return Sandbox.objects.create(
        owner=user,
        pattern="replicated-lb",
        state=state,
        engine="local",
        expires_at=now + timedelta(hours=1),
        last_seen_at=now,
        started_at=now,
    )


@pytest.fixture
def sandbox(learner: User) -> Sandbox:
    return running_sandbox(learner)


def start(
    user: User, sandbox: Sandbox, experiment: str = KILL, prediction: Any = "under-3s"
) -> ExperimentRun:
    return experiments.experiment_start(
        user=user,
        sandbox_id=sandbox.hex,
        experiment_id=experiment,
        prediction=prediction,
        enqueue=False,
    )


@pytest.mark.django_db
def test_it_starts_a_run_and_queues_its_first_step_and_a_watchdog(
    learner: User, sandbox: Sandbox, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    Sandbox.objects.filter(pk=sandbox.pk).update(controls={"rps": 35})
    with django_capture_on_commit_callbacks() as callbacks:
        run = experiments.experiment_start(
            user=learner, sandbox_id=sandbox.hex, experiment_id=KILL, prediction="3-8s"
        )
    assert len(queued(callbacks)) == 2  # the first step, and the watchdog check
    run.refresh_from_db()
    assert (run.user, run.sandbox, run.pattern, run.experiment) == (
        learner,
        sandbox,
        "replicated-lb",
        KILL,
    )
    assert run.prediction == "3-8s" and run.state == ExperimentRun.State.RUNNING
    assert run.timeline == [] and run.correct is None
    assert run.saved_controls["rps"] == 35 and run.saved_controls["policy"] == "round-robin"


@pytest.mark.django_db
def test_another_learner_gets_404_and_a_watcher_permission_denied(
    sandbox: Sandbox, other_learner: User
) -> None:
    with pytest.raises(Http404):
        start(other_learner, sandbox)
    staff = make_user("dora")
    staff.is_staff = True
    staff.save()
    with pytest.raises(PermissionDenied):  # may watch the sandbox, may not act on it
        start(staff, sandbox)
    with pytest.raises(Http404):
        experiments.experiment_cancel(user=other_learner, sandbox_id=sandbox.hex)
    assert not ExperimentRun.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("state", [Sandbox.State.STARTING, Sandbox.State.STOPPED])
def test_the_sandbox_must_be_running(learner: User, state: str) -> None:
    sandbox = running_sandbox(learner, state)
    with pytest.raises(experiments.SandboxNotRunning, match=f"The sandbox is {state}"):
        start(learner, sandbox)
    assert not ExperimentRun.objects.exists()


@pytest.mark.django_db
def test_one_run_at_a_time_per_sandbox(
    learner: User, sandbox: Sandbox, other_learner: User
) -> None:
    first = start(learner, sandbox)
    with pytest.raises(
        experiments.ExperimentBusy,
        match=re.escape("“Kill a replica: how long do errors last?” is still running"),
    ):
        start(learner, sandbox, POLICY, "same")
    start(other_learner, running_sandbox(other_learner), POLICY, "same")  # theirs: fine
    ExperimentRun.objects.filter(pk=first.pk).update(state=ExperimentRun.State.CHECKED)
    assert start(learner, sandbox, POLICY, "same").experiment == POLICY


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("experiment", "prediction", "error", "message"),
    [
        (KILL, "", experiments.PredictionInvalid, "Choose an answer before you start."),
        (KILL, "forever", experiments.PredictionInvalid, "'forever' is not one of the answers"),
        ("no-such", "none", experiments.ExperimentNotFound, "has no experiment 'no-such'"),
    ],
)
def test_bad_predictions_and_experiments_are_refused(
    learner: User, sandbox: Sandbox, experiment: str, prediction: str, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        start(learner, sandbox, experiment, prediction)
    assert not ExperimentRun.objects.exists()


def finished_run(
    learner: User, sandbox: Sandbox, *, ago: float = 30.0, prediction: str = "under-3s"
) -> ExperimentRun:
    """A kill-replica run whose steps all ran, the last ending ``ago`` seconds ago."""
    run = start(learner, sandbox, KILL, prediction)
    end = time.time() - ago
    run.timeline = [end - 14, end - 10, end]  # baseline 4 s, kill 10 s, restore 0 s
    run.step_index = 2
    run.started_at = timezone.now() - timedelta(seconds=ago + 14)
    run.save()
    return run


def store_history(sandbox: Sandbox, run: ExperimentRun, errors: tuple[float, ...] = ()) -> None:
    """The supervisor's snapshot, with a history covering the run: failed calls at
    ``errors`` (Unix times), 50 calls a second."""
    start_s, end_s = int(run.timeline[0]) - 3, int(run.timeline[-1]) + 3
    history = []
    for ts in range(start_s, end_s + 1):
        mine = [e for e in errors if ts - 1 < e <= ts]
        history.append(
            point(ts, errors=len(mine), first=min(mine, default=None), last=max(mine, default=None))
        )
    cache.set(snapshot_cache_key(sandbox.hex), {"type": "snapshot", "history": history})


@pytest.mark.django_db
def test_the_check_measures_judges_and_explains(learner: User, sandbox: Sandbox) -> None:
    run = finished_run(learner, sandbox)
    kill_at = run.timeline[1]
    store_history(sandbox, run, errors=(kill_at + 0.1, kill_at + 0.35, kill_at + 0.52))
    run = experiments.experiment_check(run_id=run.pk)
    assert run is not None
    run.refresh_from_db()
    assert run.state == ExperimentRun.State.CHECKED and run.finished_at is not None
    assert run.measured["errors"] == 3.0 and abs(run.measured["error_s"] - 0.42) < 0.001
    assert run.correct is True
    assert run.explanation.startswith("Errors lasted 0.42 s")
    assert experiments.experiment_check(run_id=run.pk) == run  # again: nothing changes


@pytest.mark.django_db
def test_the_check_waits_for_telemetry_then_gives_up_with_a_clear_message(
    learner: User, sandbox: Sandbox
) -> None:
    run = finished_run(learner, sandbox, ago=3.0)
    with pytest.raises(experiments.CheckNotReady):  # the snapshot may still be catching up
        experiments.experiment_check(run_id=run.pk)
    run = finished_run(learner, running_sandbox(learner), ago=1.0)
    with pytest.raises(experiments.CheckNotReady):  # too early even to look
        experiments.experiment_check(run_id=run.pk)
    run.refresh_from_db()
    assert run.is_running

    late = finished_run(learner, running_sandbox(learner), ago=experiments.CHECK_TIMEOUT_S + 1)
    experiments.experiment_check(run_id=late.pk)
    late.refresh_from_db()
    assert late.state == ExperimentRun.State.FAILED and late.correct is None
    assert late.error.startswith("The sandbox's live telemetry did not reach the platform")
    assert "it is empty" in late.error


@pytest.mark.django_db
def test_a_sandbox_that_ended_mid_run_fails_the_run(learner: User, sandbox: Sandbox) -> None:
    run = finished_run(learner, sandbox)
    Sandbox.objects.filter(pk=sandbox.pk).update(state=Sandbox.State.FAILED)
    experiments.experiment_check(run_id=run.pk)
    run.refresh_from_db()
    assert run.state == ExperimentRun.State.FAILED
    assert run.error.startswith("The sandbox was failed before the experiment finished")

    other = running_sandbox(learner)
    step_run = start(learner, other)
    Sandbox.objects.filter(pk=other.pk).update(state=Sandbox.State.EXPIRED)
    experiments.experiment_step(run_id=step_run.pk, index=0)
    step_run.refresh_from_db()
    assert step_run.state == ExperimentRun.State.FAILED and "was expired" in step_run.error
    assert step_run.timeline == []


@pytest.mark.django_db
def test_stopping_the_sandbox_cancels_its_run(learner: User, sandbox: Sandbox) -> None:
    run = start(learner, sandbox)
    services.sandbox_stop(sandbox=sandbox, enqueue=False)
    run.refresh_from_db()
    assert run.state == ExperimentRun.State.CANCELLED
    assert run.error == experiments.CANCELLED_BY_STOP and run.finished_at is not None
    experiments.experiment_step(run_id=run.pk, index=0)  # a step queued before: nothing
    run.refresh_from_db()
    assert run.timeline == [] and run.state == ExperimentRun.State.CANCELLED


@pytest.mark.django_db
def test_the_owner_can_cancel(learner: User, sandbox: Sandbox) -> None:
    with pytest.raises(experiments.ExperimentError, match="No experiment is running"):
        experiments.experiment_cancel(user=learner, sandbox_id=sandbox.hex)
    run = start(learner, sandbox)
    experiments.experiment_cancel(user=learner, sandbox_id=sandbox.hex)  # no step ran yet
    run.refresh_from_db()
    assert (
        run.state == ExperimentRun.State.CANCELLED and run.error == experiments.CANCELLED_BY_LEARNER
    )


@pytest.mark.django_db
def test_runs_whose_tasks_were_lost_are_failed(learner: User, sandbox: Sandbox) -> None:
    run = start(learner, sandbox)
    ExperimentRun.objects.filter(pk=run.pk).update(
        started_at=timezone.now() - timedelta(minutes=5), timeline=[time.time() - 290]
    )
    # The watchdog finds the steps stopped half-way.
    experiments.experiment_check(run_id=run.pk)
    run.refresh_from_db()
    assert run.state == ExperimentRun.State.FAILED and run.error == experiments.INTERRUPTED

    # Someone looking at the experiments settles a run nobody else will.
    stale = start(learner, sandbox, POLICY, "same")
    ExperimentRun.objects.filter(pk=stale.pk).update(
        started_at=timezone.now() - timedelta(minutes=5)
    )
    assert experiments.experiment_resolve_stale(sandbox=sandbox) == [stale.pk]
    fresh = start(learner, sandbox, POLICY, "same")  # and a new one may start
    assert experiments.experiment_resolve_stale(sandbox=sandbox) == []
    with pytest.raises(experiments.CheckNotReady):  # the watchdog, while steps go on
        experiments.experiment_check(run_id=fresh.pk)


@pytest.mark.django_db
def test_steps_act_on_a_real_sandbox_once_each(learner: User, local_engine: Engine) -> None:
    created = services.sandbox_launch(user=learner, pattern_id="replicated-lb", enqueue=False)
    sandbox = services.sandbox_start(sandbox_id=created.hex)
    services.sandbox_control(sandbox=sandbox, control_id="rps", value=15)
    run = start(learner, sandbox)

    def config(node: str) -> dict[str, Any]:
        return local_engine.control(sandbox.hex, node, {"op": "state"})["config"]

    experiments.experiment_step(run_id=run.pk, index=0)
    assert config("traffic")["rps"] == 50 and config("lb")["health_checks"] is True
    experiments.experiment_step(run_id=run.pk, index=0)  # redelivered: done already
    experiments.experiment_step(run_id=run.pk, index=2)  # out of order: not yet
    run.refresh_from_db()
    assert len(run.timeline) == 1 and run.step_index == 0

    experiments.experiment_step(run_id=run.pk, index=1)
    experiments.experiment_step(run_id=run.pk, index=1)
    fault = Fault.objects.get()
    assert (fault.node.name, fault.kind, fault.params["duration"]) == ("replica-2", "kill", 8)
    assert fault.created_by == learner
    states = {s.name: s.state for s in local_engine.status(sandbox.hex)}
    assert states["replica-2"] == "exited"

    experiments.experiment_step(run_id=run.pk, index=2)
    assert config("traffic")["rps"] == 15  # the learner's own rate, put back
    run.refresh_from_db()
    assert len(run.timeline) == 3 and run.step_index == 2 and run.is_running
    assert run.timeline == sorted(run.timeline)


@pytest.mark.django_db
def test_a_step_that_cannot_be_done_fails_the_run_with_its_reason(
    learner: User, local_engine: Engine
) -> None:
    created = services.sandbox_launch(user=learner, pattern_id="replicated-lb", enqueue=False)
    sandbox = services.sandbox_start(sandbox_id=created.hex)
    services.sandbox_control(sandbox=sandbox, control_id="replicas", value=2)  # no replica-3
    run = start(learner, sandbox, POLICY, "least-connections")
    experiments.experiment_step(run_id=run.pk, index=0)
    run.refresh_from_db()
    assert run.state == ExperimentRun.State.FAILED
    assert run.error.startswith("Step 1 (“replica-3 now answers 300 ms late")
    assert "no node named 'replica-3'" in run.error


# ---- views -------------------------------------------------------------------------------


def fragment(client: Client, sandbox: Sandbox, **headers: str) -> Any:
    return client.get(reverse("labs:experiments", args=[sandbox.hex]), **headers)


def post_start(
    client: Client, sandbox: Sandbox, experiment: str, data: dict[str, str], htmx: bool = True
) -> Any:
    headers = {"HTTP_HX_REQUEST": "true"} if htmx else {}
    url = reverse("labs:experiment_start", args=[sandbox.hex, experiment])
    return client.post(url, data, **headers)


@pytest.mark.django_db
def test_the_fragment_lists_the_experiments_with_a_form_each(
    learner: User, sandbox: Sandbox
) -> None:
    response = fragment(client_for(learner), sandbox, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith('<div class="experiments" id="experiments-box"')
    assert "<html" not in html  # a fragment, not a page
    for experiment in (KILL, POLICY):
        assert f'data-testid="experiment-{experiment}"' in html
        assert f'data-testid="start-{experiment}"' in html
    assert 'data-testid="prediction-kill-replica-under-3s"' in html
    assert 'hx-trigger="every 1s"' not in html  # nothing runs: no polling
    page = fragment(client_for(learner), sandbox)  # without htmx: a page of its own
    assert page.status_code == 200 and "<html" in page.content.decode()


@pytest.mark.django_db
def test_starting_from_the_form_shows_the_run_and_polls(learner: User, sandbox: Sandbox) -> None:
    client = client_for(learner)
    response = post_start(client, sandbox, KILL, {"prediction": "under-3s"})
    assert response.status_code == 200
    html = response.content.decode()
    assert 'data-testid="run-status" data-state="running"' in html
    assert 'hx-trigger="every 1s"' in html
    assert "Less than 3 seconds" in html  # the prediction, recalled
    assert "Another experiment is running." in html
    run = ExperimentRun.objects.get()
    assert (run.user, run.experiment, run.prediction) == (learner, KILL, "under-3s")

    # A step ran: the fragment shows it and counts down.
    ExperimentRun.objects.filter(pk=run.pk).update(timeline=[time.time() - 1.0])
    html = fragment(client, sandbox, HTTP_HX_REQUEST="true").content.decode()
    assert "Step 1 of 3" in html and "Baseline: health checks on" in html
    assert 'data-testid="run-countdown">Next step in 3 s · result in about 13 s' in html

    # Cancelled from the fragment.
    url = reverse("labs:experiment_cancel", args=[sandbox.hex])
    html = client.post(url, HTTP_HX_REQUEST="true").content.decode()
    assert 'data-state="cancelled"' in html and 'hx-trigger="every 1s"' not in html


@pytest.mark.django_db
def test_a_run_checked_while_the_fragment_is_built_never_vanishes(
    learner: User, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The check lands between the fragment's reads: after it read the learner's latest
    # runs (the run still running), before anything else. Once, under load, the card then
    # showed no run at all and the fragment stopped polling, so the result never appeared.
    run = start(learner, sandbox, KILL, "under-3s")
    read = selectors.experiment_last_runs

    def read_then_check(**kwargs: Any) -> dict[str, ExperimentRun]:
        latest = read(**kwargs)
        ExperimentRun.objects.filter(pk=run.pk).update(state=ExperimentRun.State.CHECKED)
        return latest

    monkeypatch.setattr(selectors, "experiment_last_runs", read_then_check)
    html = fragment(client_for(learner), sandbox, HTTP_HX_REQUEST="true").content.decode()
    assert 'data-testid="run-status" data-state="running"' in html
    assert 'hx-trigger="every 1s"' in html  # so the next poll shows the result
    monkeypatch.setattr(selectors, "experiment_last_runs", read)
    html = fragment(client_for(learner), sandbox, HTTP_HX_REQUEST="true").content.decode()
    assert 'data-testid="run-result"' in html and 'hx-trigger="every 1s"' not in html


@pytest.mark.django_db
def test_a_checked_result_shows_prediction_outcome_figures_and_explanation(
    learner: User, sandbox: Sandbox
) -> None:
    run = finished_run(learner, sandbox, prediction="3-8s")
    kill_at = run.timeline[1]
    store_history(sandbox, run, errors=(kill_at + 0.2, kill_at + 0.6))
    experiments.experiment_check(run_id=run.pk)
    html = fragment(client_for(learner), sandbox, HTTP_HX_REQUEST="true").content.decode()
    assert 'data-testid="run-result" data-correct="false"' in html
    assert 'data-testid="run-prediction">From 3 to 8 seconds<' in html
    assert 'data-testid="run-answer">Less than 3 seconds<' in html
    assert (
        '<th scope="row">Errors lasted (first to last failed request)</th><td>0.40 s</td>' in html
    )
    assert "Errors lasted 0.40 s, from the first failed request to the last" in html
    assert "Run it again" in html


@pytest.mark.django_db
def test_bad_form_data_keeps_the_input_and_says_why(learner: User, sandbox: Sandbox) -> None:
    client = client_for(learner)
    response = post_start(client, sandbox, KILL, {})
    assert response.status_code == 200
    html = response.content.decode()
    assert 'data-testid="prediction-error-kill-replica">Choose an answer before you start.' in html
    response = post_start(client, sandbox, KILL, {"prediction": "forever"})
    assert "&#x27;forever&#x27; is not one of the answers" in response.content.decode()

    # Busy: the learner's choice stays checked in the form that was refused.
    start(learner, sandbox, POLICY, "same")
    ExperimentRun.objects.update(state=ExperimentRun.State.CHECKED)
    start(learner, sandbox, POLICY, "same")
    response = post_start(client, sandbox, KILL, {"prediction": "3-8s"}, htmx=False)
    assert response.status_code == 422  # without JavaScript: the page, with the error
    html = response.content.decode()
    assert "is still running on this sandbox" in html
    assert 'value="3-8s" checked' in html
    assert ExperimentRun.objects.filter(experiment=KILL).count() == 0


@pytest.mark.django_db
def test_start_without_htmx_redirects_to_the_page(learner: User, sandbox: Sandbox) -> None:
    response = post_start(client_for(learner), sandbox, KILL, {"prediction": "none"}, htmx=False)
    assert response.status_code == 302
    assert response["Location"] == reverse("labs:experiments", args=[sandbox.hex])


@pytest.mark.django_db
def test_every_permission_level(
    learner: User, other_learner: User, sandbox: Sandbox, client: Client
) -> None:
    # Another learner: 404 everywhere, nothing started.
    other = client_for(other_learner)
    assert fragment(other, sandbox).status_code == 404
    assert post_start(other, sandbox, KILL, {"prediction": "none"}).status_code == 404
    assert other.post(reverse("labs:experiment_cancel", args=[sandbox.hex])).status_code == 404
    # Anonymous: sent to sign in.
    response = fragment(client, sandbox)
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]
    assert post_start(client, sandbox, KILL, {"prediction": "none"}).status_code == 302
    # Staff may watch (read-only) but not start.
    staff = make_user("dora")
    staff.is_staff = True
    staff.save()
    watcher = client_for(staff)
    html = fragment(watcher, sandbox, HTTP_HX_REQUEST="true").content.decode()
    assert (
        "Only the learner who launched this sandbox" in html and 'data-testid="start-' not in html
    )
    assert post_start(watcher, sandbox, KILL, {"prediction": "none"}).status_code == 403
    # An unknown experiment, a malformed id, the wrong method.
    owner = client_for(learner)
    assert post_start(owner, sandbox, "no-such", {"prediction": "none"}).status_code == 404
    assert owner.get(reverse("labs:experiments", args=["nope"])).status_code == 404
    url = reverse("labs:experiment_start", args=[sandbox.hex, KILL])
    assert owner.get(url).status_code == 405
    assert not ExperimentRun.objects.exists()


@pytest.mark.django_db
def test_a_stopped_sandbox_shows_results_but_no_forms(learner: User) -> None:
    sandbox = running_sandbox(learner, Sandbox.State.STOPPED)
    html = fragment(client_for(learner), sandbox, HTTP_HX_REQUEST="true").content.decode()
    assert "Experiments need a running sandbox" in html and 'data-testid="start-' not in html


@pytest.mark.django_db
def test_the_course_home_shows_experiment_progress(
    learner: User, sandbox: Sandbox, course: list[Chapter]
) -> None:
    client = client_for(learner)
    html = client.get(reverse("courses:home")).content.decode()
    assert 'data-testid="experiments-progress">Experiments 0/2<' in html
    run = finished_run(learner, sandbox)
    store_history(sandbox, run)
    experiments.experiment_check(run_id=run.pk)
    run.refresh_from_db()
    assert run.state == ExperimentRun.State.CHECKED and run.correct is False  # "none" happened
    html = client.get(reverse("courses:home")).content.decode()
    assert html.count('data-testid="experiments-progress">Experiments 1/2<') == sum(
        1 for c in course if c.sandbox == "replicated-lb"
    )
    ExperimentRun.objects.create(
        user=learner, pattern="replicated-lb", experiment=POLICY, prediction="same",
        state=ExperimentRun.State.CHECKED, started_at=timezone.now(), correct=True,
    )  # fmt: skip
    html = client.get(reverse("courses:home")).content.decode()
    assert "Experiments 2/2 ✓" in html
    other = client_for(make_user("erin")).get(reverse("courses:home")).content.decode()
    assert "Experiments 0/2" in other  # progress is each learner's own


# ---- end to end ----------------------------------------------------------------------------


@pytest.fixture
def supervised(local_engine: Engine) -> Iterator[Supervisor]:
    """The telemetry supervisor, running as in production (its own publishing loop)."""
    supervisor = Supervisor(local_engine, InMemoryChannelLayer(capacity=1000), interval=0.25)
    stop = threading.Event()
    thread = threading.Thread(target=supervisor.run, args=(stop,), daemon=True)
    thread.start()
    yield supervisor
    stop.set()
    thread.join(timeout=15)
    assert not thread.is_alive()


def unlocked(read: Callable[[], T]) -> Callable[[], T | None]:
    """A read polled while worker threads write: SQLite's shared in-memory test database
    refuses it at once ("database table is locked") instead of waiting; try again."""

    def attempt() -> T | None:
        try:
            return read()
        except OperationalError as exc:
            if "locked" not in str(exc):
                raise
            return None

    return attempt


def history_points(sandbox: Sandbox) -> list[dict[str, Any]]:
    snapshot = cache.get(snapshot_cache_key(sandbox.hex))
    return snapshot["history"] if isinstance(snapshot, dict) else []


@pytest.mark.django_db(transaction=True)
def test_the_kill_replica_experiment_end_to_end(
    learner: User, local_engine: Engine, embedded_celery: Celery, supervised: Supervisor
) -> None:
    created = services.sandbox_launch(user=learner, pattern_id="replicated-lb", enqueue=False)
    sandbox = services.sandbox_start(sandbox_id=created.hex)
    wait_for(
        lambda: sum(p["totals"].get("n", 0) for p in history_points(sandbox)[-3:]) > 20,
        timeout=20,
        what="traffic in the stored telemetry history",
    )
    # Whether the kill lands just before a health check is luck: the span is then 0 s (one
    # failed request, or none). Run again, as the explanation suggests, up to three times.
    runs = []
    for _ in range(3):
        started = experiments.experiment_start(
            user=learner, sandbox_id=sandbox.hex, experiment_id=KILL, prediction="under-3s"
        )

        def finished(run_id: int = started.pk) -> ExperimentRun | None:
            run = ExperimentRun.objects.get(pk=run_id)
            return None if run.is_running else run

        run = wait_for(unlocked(finished), timeout=60, what="the experiment's check")
        assert run.state == ExperimentRun.State.CHECKED, run.error
        runs.append(run)
        assert len(run.timeline) == 3
        assert run.measured["calls"] > 300  # 50 requests/s over the 10 s kill step
        assert run.measured["ongoing"] == 0.0
        assert 0 <= run.measured["error_s"] < 3.0, run.measured  # ejected within ~1 interval
        if run.measured["errors"] >= 2:
            break
        wait_for(  # replica-2 back in rotation before the next try
            lambda: all(s.state == "running" for s in local_engine.status(sandbox.hex)),
            timeout=20,
            what="replica-2 restarted",
        )
    run = runs[-1]
    error_s = run.measured["error_s"]
    assert 0 < error_s < 3.0, [r.measured for r in runs]
    assert run.measured["error_pct"] < 20
    assert f"Errors lasted {error_s:.2f} s" in run.explanation
    assert run.correct == (error_s < 3.0)
    # What the steps did: one kill fault per run, and the learner's settings put back.
    kills = wait_for(unlocked(lambda: Fault.objects.filter(kind="kill").count()), timeout=5)
    assert kills == len(runs)
    traffic = local_engine.control(sandbox.hex, "traffic", {"op": "state"})["config"]
    assert traffic["rps"] == 20
    wait_for(
        unlocked(lambda: not Fault.objects.filter(reverted_at__isnull=True).exists()),
        timeout=20,
        what="the kill reverted",
    )


@pytest.mark.django_db(transaction=True)
def test_cancelling_reverts_the_faults_the_run_injected_and_only_those(
    learner: User, local_engine: Engine, embedded_celery: Celery
) -> None:
    created = services.sandbox_launch(user=learner, pattern_id="replicated-lb", enqueue=False)
    sandbox = services.sandbox_start(sandbox_id=created.hex)
    own = services.fault_inject(  # the learner's own fault, not the run's
        sandbox=sandbox, node_name="replica-3", kind="latency", duration=120, enqueue=False
    )
    started = experiments.experiment_start(
        user=learner, sandbox_id=sandbox.hex, experiment_id=KILL, prediction="under-3s"
    )

    def states() -> dict[str, str]:
        return {node.name: node.state for node in local_engine.status(sandbox.hex)}

    wait_for(
        unlocked(lambda: len(ExperimentRun.objects.get(pk=started.pk).timeline) == 2),
        timeout=15,
        what="the kill step",
    )
    kill = Fault.objects.get(kind="kill")
    assert ExperimentRun.objects.get(pk=started.pk).faults == [kill.pk]
    assert states()["replica-2"] != "running"

    run = experiments.experiment_cancel(user=learner, sandbox_id=sandbox.hex)

    assert run.state == ExperimentRun.State.CANCELLED
    kill.refresh_from_db()
    own.refresh_from_db()
    assert kill.reverted_at is not None  # at once, not in 8 s
    assert own.reverted_at is None
    wait_for(lambda: states()["replica-2"] == "running", timeout=10, what="replica-2 back")
    traffic = local_engine.control(sandbox.hex, "traffic", {"op": "state"})["config"]
    assert traffic["rps"] == 20  # the learner's setting, put back


# ---- a scenario: the pattern's experiments in a scripted order ------------------------------


def write_scenario(root: Path, scenario: str) -> None:
    path = write_spec(root, {})
    path.write_text(path.read_text() + scenario)


def test_a_scenario_names_its_experiments_in_order(tmp_path: Path) -> None:
    write_scenario(
        tmp_path,
        "scenario:\n  title: Break it twice\n  intro: >\n    Predict, then watch.\n"
        "  experiments: [pick, slow]\n",
    )
    scenario = load_pattern("test", root=tmp_path).scenario
    assert scenario is not None
    assert (scenario.title, scenario.intro, scenario.experiments) == (
        "Break it twice",
        "Predict, then watch.",
        ("pick", "slow"),
    )


@pytest.mark.parametrize(
    ("experiments_line", "message"),
    [
        ("[pick, nope]", "no experiment 'nope' (there are: pick, slow)"),
        ("[pick]", "two or more experiments, each once"),
        ("[pick, pick]", "two or more experiments, each once"),
    ],
)
def test_a_scenario_of_unknown_or_too_few_experiments_is_refused(
    tmp_path: Path, experiments_line: str, message: str
) -> None:
    write_scenario(tmp_path, f"scenario:\n  title: T\n  experiments: {experiments_line}\n")
    with pytest.raises(PatternError, match=re.escape(message)):
        load_pattern("test", root=tmp_path)


@pytest.mark.django_db
def test_a_scenario_goes_stage_by_stage_and_scores_the_confirmed_predictions(
    tmp_path: Path, learner: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_scenario(tmp_path, "scenario:\n  title: Break it twice\n  experiments: [pick, slow]\n")

    def from_tmp(pattern_id: str, root: Path | None = None) -> Any:
        return load_pattern(pattern_id, root=tmp_path)

    from apps.labs import experiment_views

    for module in (experiments, experiment_views, services):
        monkeypatch.setattr(module, "load_pattern", from_tmp)
    sandbox = running_sandbox(learner)
    Sandbox.objects.filter(pk=sandbox.pk).update(pattern="test")
    sandbox.refresh_from_db()

    with pytest.raises(experiments.ScenarioOrder, match="stage 1, “Pick one”, comes first"):
        start(learner, sandbox, "slow", 3)
    context = experiment_views.experiments_context(user=learner, sandbox=sandbox)
    scenario = context["scenario"]
    assert (scenario["done"], scenario["score"], scenario["next"]) == (0, 0, "pick")
    assert context["locked"] == {"slow"}

    run = start(learner, sandbox, "pick", "second")
    ExperimentRun.objects.filter(pk=run.pk).update(state=ExperimentRun.State.CHECKED, correct=True)
    context = experiment_views.experiments_context(user=learner, sandbox=sandbox)
    scenario = context["scenario"]
    assert (scenario["done"], scenario["score"], scenario["next"]) == (1, 1, "slow")
    assert context["locked"] == set() and not scenario["finished"]
    assert [c.experiment.id for c in context["cards"]] == ["pick", "slow"]

    run = start(learner, sandbox, "slow", 3)  # its turn now
    ExperimentRun.objects.filter(pk=run.pk).update(state=ExperimentRun.State.CHECKED, correct=False)
    html = client_for(learner).get(reverse("labs:experiments", args=[sandbox.hex])).content.decode()
    assert "Scenario complete: you predicted 1 of 2 stages right." in html
    assert 'data-testid="stage-2"' in html and "✗ missed" in html
