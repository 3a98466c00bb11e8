from __future__ import annotations

import logging
import re
from html import unescape

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from apps.accounts.models import User
from apps.courses.models import Chapter
from apps.labs import services
from apps.labs.engine import EngineError
from apps.labs.engine.base import Engine
from apps.labs.models import Fault, Sandbox
from apps.labs.patterns import pattern_ids
from tests.conftest import client_for, queued

pytestmark = pytest.mark.django_db


@pytest.fixture
def sandbox(learner: User, local_engine: Engine) -> Sandbox:
    created = services.sandbox_launch(user=learner, pattern_id="replicated-lb", enqueue=False)
    return services.sandbox_start(sandbox_id=created.hex)


def test_launch_from_the_panel(
    learner: User, local_engine: Engine, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    with django_capture_on_commit_callbacks() as callbacks:
        response = client_for(learner).post(
            reverse("labs:launch", args=["replicated-lb"]), HTTP_HX_REQUEST="true"
        )
    assert response.status_code == 200
    html = response.content.decode()
    assert 'data-testid="sandbox-state">Requested' in html
    assert 'hx-trigger="every 1s"' in html  # the panel polls until the sandbox runs
    assert len(queued(callbacks)) == 1
    assert Sandbox.objects.get().owner == learner


def test_the_panel_says_what_a_launch_is_doing(learner: User, local_engine: Engine) -> None:
    sandbox = services.sandbox_launch(user=learner, pattern_id="replicated-lb", enqueue=False)
    url = reverse("labs:sandbox", args=[sandbox.hex])
    html = client_for(learner).get(url, HTTP_HX_REQUEST="true").content.decode()
    assert "Waiting for a worker to pick up the launch" in html
    # Each step of the launch task names itself; the panel (polled every second) shows it.
    services.sandbox_transition(sandbox=sandbox, to=Sandbox.State.STARTING)
    services._stage(sandbox, "Waiting for the nodes to answer: 3 of 5 ready")
    html = client_for(learner).get(url, HTTP_HX_REQUEST="true").content.decode()
    assert 'data-testid="sandbox-stage">Waiting for the nodes to answer: 3 of 5 ready…' in html
    started = services.sandbox_start(sandbox_id=sandbox.hex)
    assert started.state == Sandbox.State.RUNNING and started.stage == ""


def test_over_quota_gets_a_message_not_an_error_page(sandbox: Sandbox, learner: User) -> None:
    response = client_for(learner).post(
        reverse("labs:launch", args=["replicated-lb"]), HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 200
    assert "Stop one to launch another" in response.content.decode()
    assert Sandbox.objects.count() == 1


def test_the_local_engine_says_it_has_no_isolation(sandbox: Sandbox, learner: User) -> None:
    html = client_for(learner).get(reverse("labs:sandbox", args=[sandbox.hex])).content.decode()
    assert 'data-testid="no-isolation"' in html
    assert html.count('class="node node-running"') == 5


def test_the_chapter_page_shows_the_panel(sandbox: Sandbox, learner: User, chapter5) -> None:  # type: ignore[no-untyped-def]
    html = client_for(learner).get(chapter5.get_absolute_url()).content.decode()
    assert 'data-testid="sandbox-state">Running' in html
    assert 'data-testid="stop-sandbox"' in html


def test_every_chapter_has_its_sandbox_and_a_missing_one_is_an_error_not_a_launch(
    learner: User, course, local_engine: Engine
) -> None:  # type: ignore[no-untyped-def]
    assert {c.sandbox for c in course} <= set(pattern_ids())
    # Content that names a pattern the server lacks (`content check` refuses it).
    chapter = course[-1]
    Chapter.objects.filter(pk=chapter.pk).update(sandbox="not-built-yet")
    assert "not-built-yet" not in pattern_ids()
    html = client_for(learner).get(chapter.get_absolute_url()).content.decode()
    assert 'data-testid="sandbox-unavailable"' in html and "not-built-yet" in html
    assert 'data-testid="launch-sandbox"' not in html


def test_another_learner_gets_404_for_every_action(sandbox: Sandbox, other_learner: User) -> None:
    client = client_for(other_learner)
    assert client.get(reverse("labs:sandbox", args=[sandbox.hex])).status_code == 404
    for name in ("labs:stop", "labs:extend", "labs:faults", "labs:controls"):
        assert client.post(reverse(name, args=[sandbox.hex])).status_code == 404
    for name in ("labs:faults", "labs:controls"):
        assert client.get(reverse(name, args=[sandbox.hex])).status_code == 404
    fault = services.fault_inject(
        sandbox=sandbox, node_name="replica-1", kind="latency", enqueue=False
    )
    revert = reverse("labs:fault_revert", args=[sandbox.hex, fault.pk])
    assert client.post(revert).status_code == 404
    fault.refresh_from_db()
    assert fault.reverted_at is None
    sandbox.refresh_from_db()
    assert sandbox.state == Sandbox.State.RUNNING


def test_anonymous_visitors_are_sent_to_sign_in(sandbox: Sandbox, client: Client) -> None:
    response = client.get(reverse("labs:sandbox", args=[sandbox.hex]))
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]
    assert client.post(reverse("labs:stop", args=[sandbox.hex])).status_code == 302
    faults = reverse("labs:faults", args=[sandbox.hex])
    assert client.post(faults, {"node": "lb", "kind": "kill", "duration": "10"}).status_code == 302
    assert not Fault.objects.exists()
    sandbox.refresh_from_db()
    assert sandbox.state == Sandbox.State.RUNNING


def test_staff_may_look_but_a_bad_id_is_404(sandbox: Sandbox, instructor: User) -> None:
    instructor.is_staff = True
    instructor.save()
    client = client_for(instructor)
    assert client.get(reverse("labs:sandbox", args=[sandbox.hex])).status_code == 200
    assert client.get(reverse("labs:sandbox", args=["not-a-uuid"])).status_code == 404


def test_staff_may_watch_but_only_a_permitted_user_may_act_and_is_logged(
    sandbox: Sandbox, instructor: User, caplog: pytest.LogCaptureFixture
) -> None:
    """Staff once controlled any sandbox: watching and acting are separate now."""
    instructor.is_staff = True
    instructor.save()
    client = client_for(instructor)
    assert client.get(reverse("labs:sandbox", args=[sandbox.hex])).status_code == 200
    kill = {"node": "lb", "kind": "kill", "duration": "10"}
    assert client.post(reverse("labs:faults", args=[sandbox.hex]), kill).status_code == 403
    for name in ("labs:stop", "labs:extend", "labs:controls"):
        assert client.post(reverse(name, args=[sandbox.hex])).status_code == 403
    assert not Fault.objects.exists()
    sandbox.refresh_from_db()
    assert sandbox.state == Sandbox.State.RUNNING

    instructor.user_permissions.add(Permission.objects.get(codename="control_any_sandbox"))
    client = client_for(User.objects.get(pk=instructor.pk))  # permissions are cached per user
    latency = {"node": "lb", "kind": "latency", "duration": "10", "ms": "100"}
    with caplog.at_level(logging.WARNING, logger="apps.labs.selectors"):
        response = client.post(reverse("labs:faults", args=[sandbox.hex]), latency)
    assert response.status_code == 200 and Fault.objects.count() == 1
    assert f"acted on by {instructor.username}" in caplog.text


def test_the_owner_stops_and_extends(
    sandbox: Sandbox, learner: User, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    client = client_for(learner)
    before = sandbox.expires_at
    client.post(reverse("labs:extend", args=[sandbox.hex]), HTTP_HX_REQUEST="true")
    sandbox.refresh_from_db()
    assert sandbox.expires_at > before
    with django_capture_on_commit_callbacks() as callbacks:
        html = client.post(
            reverse("labs:stop", args=[sandbox.hex]), HTTP_HX_REQUEST="true"
        ).content.decode()
    assert "Removing the nodes" in html
    assert len(queued(callbacks)) == 1
    sandbox.refresh_from_db()
    assert sandbox.state == Sandbox.State.STOPPING


def test_watching_the_panel_keeps_the_sandbox_from_idling(
    sandbox: Sandbox, learner: User, other_learner: User
) -> None:
    from datetime import timedelta

    from django.utils import timezone

    long_ago = timezone.now() - timedelta(hours=1)
    Sandbox.objects.filter(pk=sandbox.pk).update(last_seen_at=long_ago)
    html = (
        client_for(learner)
        .get(reverse("labs:sandbox", args=[sandbox.hex]), HTTP_HX_REQUEST="true")
        .content.decode()
    )
    # A running panel watches over its WebSocket, which keeps the sandbox alive from then
    # on (tests/labs/test_consumers.py); rendering the panel counts as watching too.
    assert f'ws-connect="/ws/sandboxes/{sandbox.hex}/"' in html
    sandbox.refresh_from_db()
    assert sandbox.last_seen_at > long_ago


# --- the live lab: faults and controls ----------------------------------------------------


def _post(user: User, name: str, sandbox: Sandbox, data: dict[str, str]) -> tuple[int, str]:
    response = client_for(user).post(
        reverse(name, args=[sandbox.hex]), data, HTTP_HX_REQUEST="true"
    )
    return response.status_code, response.content.decode()


def test_the_running_panel_is_the_live_lab(sandbox: Sandbox, learner: User) -> None:
    html = client_for(learner).get(reverse("labs:sandbox", args=[sandbox.hex])).content.decode()
    assert 'data-testid="lab-graph"' in html
    assert 'id="lab-topology"' in html  # nodes, layout and links for the graph
    assert 'id="event-log"' in html
    assert "replica-3</option>" in html  # every node can be picked for a fault
    assert 'data-testid="control-policy"' in html
    # What the pattern observes: its mark in the legend (the pattern's label), a panel for
    # its state and a chart for its gauges (the page fills them from the stream).
    mark = '<span class="legend-mark" aria-hidden="true">⚑</span> ejected</li>'
    assert f'data-testid="legend-mark-ejected">{mark}' in html
    assert 'data-testid="pattern-state"' in html
    assert 'data-testid="chart-gauge"' in html
    # Each program the nodes run is one click away, with the nodes that run it.
    code = reverse("labs:program", args=["replicated-lb", "balancer.py"])
    assert f'<a href="{code}" target="_blank" rel="noopener"><code>balancer.py</code></a>' in html
    assert "(replica)" in html and "(lb)" in html


def test_the_owner_injects_a_fault_and_sees_its_countdown(
    sandbox: Sandbox, learner: User, django_capture_on_commit_callbacks
) -> None:  # type: ignore[no-untyped-def]
    with django_capture_on_commit_callbacks() as callbacks:
        status, html = _post(
            learner, "labs:faults", sandbox,
            {"node": "replica-2", "kind": "latency", "duration": "20", "ms": "250"},
        )  # fmt: skip
    assert status == 200
    fault = Fault.objects.get()
    assert (fault.node.name, fault.kind, fault.params["ms"]) == ("replica-2", "latency", 250)
    assert len(queued(callbacks)) == 1  # the automatic revert is scheduled
    assert 'data-testid="active-fault" data-node="replica-2"' in html
    assert f'data-expires="{int(fault.expires_at.timestamp())}"' in html
    # The form keeps the learner's choices for the next fault.
    assert '<option value="replica-2" selected>' in html
    assert '<option value="20" selected>' in html
    state = services.get_engine().control(sandbox.hex, "replica-2", {"op": "state"})
    assert "latency" in str(state)

    status, html = _post(learner, "labs:faults", sandbox, {})  # nothing chosen
    assert status == 400 and 'data-testid="fault-message"' in html
    # The engine refuses the revert: the learner is told, and the fault stays listed.
    engine = services.get_engine()
    control = engine.control

    def refusing(sandbox_id: str, name: str, message: dict) -> dict:  # type: ignore[type-arg]
        if message.get("op") == "clear":
            raise EngineError("Node replica-2 does not answer its control channel.")
        return control(sandbox_id, name, message)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "control", refusing)
        refused = client_for(learner).post(
            reverse("labs:fault_revert", args=[sandbox.hex, fault.pk]), HTTP_HX_REQUEST="true"
        )
    assert refused.status_code == 503
    assert "could not be ended just now" in refused.content.decode()
    assert 'data-testid="active-fault" data-node="replica-2"' in refused.content.decode()
    fault.refresh_from_db()
    assert fault.reverted_at is None

    revert = client_for(learner).post(
        reverse("labs:fault_revert", args=[sandbox.hex, fault.pk]), HTTP_HX_REQUEST="true"
    )
    assert revert.status_code == 200
    fault.refresh_from_db()
    assert fault.reverted_at is not None
    assert 'data-testid="active-fault"' not in revert.content.decode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"node": "replica-9", "kind": "kill", "duration": "10"}, "no node named"),
        ({"node": "lb", "kind": "meltdown", "duration": "10"}, "does not support"),
        ({"node": "lb", "kind": "kill", "duration": "ten"}, "must be a number"),
        ({"node": "lb", "kind": "kill", "duration": "2.5"}, "whole number"),
        ({"node": "lb", "kind": "kill", "duration": "100000"}, "from 1 to"),
        ({"node": "lb", "kind": "latency", "duration": "10", "ms": "-4"}, "ms must be"),
        ({"node": "lb", "kind": "errors", "duration": "10", "rate_pct": "nan"}, "must be a number"),
    ],
)
def test_bad_fault_requests_get_a_clear_message_and_change_nothing(
    sandbox: Sandbox, learner: User, data: dict[str, str], message: str
) -> None:
    status, html = _post(learner, "labs:faults", sandbox, data)
    assert status == 400
    assert 'data-testid="fault-message"' in html
    assert message in html
    assert not Fault.objects.exists()


def test_the_owner_changes_live_controls(sandbox: Sandbox, learner: User) -> None:
    status, html = _post(
        learner, "labs:controls", sandbox, {"control": "policy", "value": "least-connections"}
    )
    assert status == 200
    assert "<option selected>least-connections</option>" in html
    engine = services.get_engine()
    assert engine.control(sandbox.hex, "lb", {"op": "state"})["config"]["policy"] == (
        "least-connections"
    )
    # A checkbox sends "off" (hidden field) and "on" when ticked: unticked means off.
    status, html = _post(
        learner, "labs:controls", sandbox, {"control": "health_checks", "value": "off"}
    )
    assert status == 200
    assert engine.control(sandbox.hex, "lb", {"op": "state"})["config"]["health_checks"] is False
    sandbox.refresh_from_db()
    assert sandbox.controls == {"policy": "least-connections", "health_checks": False}

    # A killed balancer comes back with the learner's settings, not its defaults.
    fault = services.fault_inject(sandbox=sandbox, node_name="lb", kind="kill", enqueue=False)
    services.fault_revert(fault_id=fault.pk)
    config = engine.control(sandbox.hex, "lb", {"op": "state"})["config"]
    assert (config["policy"], config["health_checks"]) == ("least-connections", False)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"control": "policy", "value": "fastest"}, "Control &#x27;policy&#x27;"),
        ({"control": "rps", "value": "lots"}, "must be a number"),
        ({"control": "rps", "value": "5000"}, "Control &#x27;rps&#x27;"),
        ({"control": "warp", "value": "9"}, "no live control"),
    ],
)
def test_bad_control_values_get_a_clear_message_and_change_nothing(
    sandbox: Sandbox, learner: User, data: dict[str, str], message: str
) -> None:
    status, html = _post(learner, "labs:controls", sandbox, data)
    assert status == 400
    assert 'data-testid="control-message"' in html
    assert message in html
    sandbox.refresh_from_db()
    assert sandbox.controls == {}


def test_a_stopped_sandbox_answers_with_the_whole_panel(sandbox: Sandbox, learner: User) -> None:
    services.sandbox_stop(sandbox=sandbox, enqueue=False)
    response = client_for(learner).post(
        reverse("labs:faults", args=[sandbox.hex]), {"node": "lb", "kind": "kill"},
        HTTP_HX_REQUEST="true",
    )  # fmt: skip
    assert response.status_code == 200
    # It replaces the whole panel, not the fault form it was posted from.
    assert (response["HX-Retarget"], response["HX-Reswap"]) == ("#sandbox-box", "outerHTML")
    html = response.content.decode()
    assert 'id="sandbox-box"' in html and "Stopping" in html
    assert not Fault.objects.exists()


# ---- the code a sandbox runs ------------------------------------------------------------


def test_it_shows_a_patterns_program_read_only_and_highlighted(learner: User) -> None:
    response = client_for(learner).get(
        reverse("labs:program", args=["replicated-lb", "balancer.py"])
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert 'data-testid="program-code"' in html and 'class="highlight"' in html
    text = unescape(re.sub(r"<[^>]+>", "", html))
    assert "def setup(node: Node) -> None:" in text  # the program, as the node runs it
    assert "node <code>lb</code> runs" in html
    replicas = client_for(learner).get(
        reverse("labs:program", args=["replicated-lb", "replica.py"])
    )
    assert "the nodes <code>replica-1 … replica-6</code> run" in replicas.content.decode()
    shared = client_for(learner).get(reverse("labs:program", args=["replicated-lb", "traffic.py"]))
    assert shared.status_code == 200 and "Several patterns share it." in shared.content.decode()


@pytest.mark.parametrize(
    ("pattern", "program"),
    [
        ("replicated-lb", "settings.py"),  # not a program of the pattern
        ("replicated-lb", "..%2F..%2Fmanage.py"),
        ("nothing-here", "balancer.py"),
    ],
)
def test_only_the_patterns_own_programs_are_shown(
    learner: User, pattern: str, program: str
) -> None:
    url = f"/sandboxes/patterns/{pattern}/code/{program}/"
    assert client_for(learner).get(url).status_code == 404


def test_reading_code_needs_a_sign_in() -> None:
    response = Client().get(reverse("labs:program", args=["replicated-lb", "replica.py"]))
    assert response.status_code == 302


def test_launches_and_faults_are_rate_limited_per_user_with_a_reason(
    sandbox: Sandbox, learner: User, other_learner: User, settings
) -> None:  # type: ignore[no-untyped-def]
    settings.FAULTS_PER_MINUTE = 2
    settings.LAUNCHES_PER_MINUTE = 2
    fault = {"node": "replica-2", "kind": "latency", "duration": "20", "ms": "50"}
    for _ in range(2):
        status, _html = _post(learner, "labs:faults", sandbox, fault)
        assert status == 200
    status, html = _post(learner, "labs:faults", sandbox, fault)
    assert status == 400
    assert "You injected 2 faults in the last minute: wait a moment" in html
    assert Fault.objects.count() == 2  # the third was not injected

    launch = reverse("labs:launch", args=["sidecar-proxy"])
    for _ in range(2):  # the first launches; the second is refused by the quota, and counts
        client_for(learner).post(launch, HTTP_HX_REQUEST="true")
    html = client_for(learner).post(launch, HTTP_HX_REQUEST="true").content.decode()
    assert "You launched 2 times in the last minute" in html
    # Another learner has their own allowance.
    html = client_for(other_learner).post(launch, HTTP_HX_REQUEST="true").content.decode()
    assert "in the last minute" not in html


def test_the_panel_reads_node_states_the_supervisor_saw_not_the_engine(
    sandbox: Sandbox, learner: User, local_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page with a running sandbox does not ask the engine while the supervisor's view is
    fresh; a learner's kill forgets it, so the next page shows the node down at once; a
    stale view (no supervisor) falls back to the engine."""
    from apps.labs import node_status

    node_status.status_store(sandbox.hex, local_engine.status(sandbox.hex))
    asked: list[str] = []
    real_status = local_engine.status

    def counted(sandbox_id: str):  # type: ignore[no-untyped-def]
        asked.append(sandbox_id)
        return real_status(sandbox_id)

    monkeypatch.setattr(local_engine, "status", counted)
    browser = client_for(learner)
    url = reverse("labs:sandbox", args=[sandbox.hex])

    def node_state(html: str, name: str) -> str:
        found = re.search(rf'data-node="{name}"><code>{name}</code>.*?node-state">([^<]+)<', html)
        assert found is not None
        return found[1]

    assert node_state(browser.get(url).content.decode(), "replica-2") == "running"
    assert asked == []

    services.fault_inject(
        sandbox=sandbox, user=learner, node_name="replica-2", kind="kill", params={}, enqueue=False
    )
    asked.clear()
    assert node_state(browser.get(url).content.decode(), "replica-2") != "running"
    assert asked == [sandbox.hex]  # forgotten by the kill: the engine was asked

    monkeypatch.setattr(node_status, "FRESH_S", -1.0)  # the supervisor is gone: stale
    node_status.status_store(sandbox.hex, real_status(sandbox.hex))
    asked.clear()
    browser.get(url)
    assert asked == [sandbox.hex]
