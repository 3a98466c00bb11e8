"""The live lab, end to end, as a learner uses it: `manage.py serve` exactly as `make run`
starts it (embedded worker, in-memory channel layer, in-process telemetry supervisor) with
real Docker sandboxes, driven in headless Chromium. Screenshots of each step go to
tests/e2e/artifacts/ (40-…)."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from apps.accounts.models import User
from apps.labs.models import ExperimentRun, Sandbox
from tests.e2e.platform import INSTANCE, PASSWORD, STATE_UP, node, shot, wait_until
from tests.e2e.test_sandbox_panel import sign_in

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_a_learner_breaks_a_replica_and_watches_the_system_respond(browser, platform: str) -> None:  # type: ignore[no-untyped-def]
    User.objects.create_user(username="lab", password=PASSWORD)
    context = browser.new_context(viewport={"width": 1366, "height": 900}, base_url=platform.base)
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    # Launch from chapter 5 and watch it come up.
    sign_in(page, "lab", PASSWORD)
    page.goto("/chapters/replicated-load-balanced-services/#sandbox")
    expect(page.get_by_test_id("no-isolation")).to_have_count(0)  # Docker: isolated
    page.get_by_test_id("launch-sandbox").click()
    expect(page.get_by_test_id("sandbox-state")).to_have_text("Running", timeout=60_000)
    sandbox = Sandbox.objects.get()
    assert sandbox.engine == "docker"

    # All nodes on the graph, the stream live, requests moving.
    for name in ("traffic", "lb", "replica-1", "replica-2", "replica-3"):
        expect(node(page, name)).to_have_class(STATE_UP)
    expect(page.get_by_test_id("lab-connection")).to_have_text("● Live", timeout=20_000)
    wait_until(page, "document.querySelectorAll('.g-dots .dot').length > 0")
    wait_until(page, "parseFloat(document.querySelector('[data-stat=rps]').textContent) >= 15")
    expect(page.get_by_test_id("event-log")).to_contain_text("lb started")
    # What the pattern declares it observes: its mark in the legend, the balancer's gauge
    # under its node, its rotation table in the Pattern state panel.
    expect(page.get_by_test_id("legend-mark-ejected")).to_have_text("⚑ ejected")
    in_rotation = page.locator('[data-extras-for="lb"] [data-gauge="in_rotation"] text')
    expect(in_rotation).to_have_text("Replicas in rotation 3")
    rotation = page.get_by_test_id("pattern-table-rotation")
    expect(rotation.locator("caption")).to_contain_text("The balancer's rotation")
    expect(rotation.locator("tbody th")).to_have_text(["replica-1", "replica-2", "replica-3"])
    row = rotation.locator("tbody tr").nth(1)  # replica-2's
    expect(row.locator("td").first).to_have_text("yes")
    shot(page, "40-lab-running")

    # More traffic (a live control), so that requests reach replica-2 between its death
    # and the health check that notices it, whenever in the check's interval it dies.
    page.locator("#control-rps").fill("100")
    page.locator("#control-rps").dispatch_event("change")
    expect(page.get_by_test_id("event-log")).to_contain_text("traffic: rps set to 100")
    wait_until(page, "parseFloat(document.querySelector('[data-stat=rps]').textContent) >= 80")

    # Kill replica-2 for 10 s, picked on the graph (with the keyboard, then the mouse).
    node(page, "replica-3").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("fault-node")).to_have_value("replica-3")
    node(page, "replica-2").click()
    expect(page.get_by_test_id("fault-node")).to_have_value("replica-2")
    page.get_by_test_id("fault-kind").select_option("kill")
    page.get_by_test_id("fault-duration").select_option("10")
    # The users' error % turns red for the second or so before the balancer ejects the
    # replica, which may be over before the checks below: remember that it did.
    page.evaluate(
        """() => {
          const stat = document.querySelector('[data-stat=error_pct]');
          window.sawErrors = false;
          new MutationObserver(() => {
            if (stat.classList.contains('is-bad')) window.sawErrors = true;
          }).observe(stat, {attributes: true, attributeFilter: ['class']});
        }"""
    )
    page.get_by_test_id("inject-fault").click()
    expect(page.get_by_test_id("active-fault")).to_contain_text("replica-2")
    expect(page.get_by_test_id("fault-countdown")).to_contain_text("reverts in")
    expect(node(page, "replica-2")).to_have_class(
        re.compile(r"\bstate-killed\b.*\bhas-fault\b"), timeout=5_000
    )
    expect(page.get_by_test_id("event-log")).to_contain_text("replica-2 is down")
    # Users saw errors until the balancer ejected it, then none.
    wait_until(page, "window.sawErrors", timeout=10)
    shot(page, "41-lab-replica-killed")
    expect(page.get_by_test_id("event-log")).to_contain_text("lb ejected replica-2")
    warning = page.locator('#event-log [data-severity="warning"]', has_text="ejected replica-2")
    expect(warning.locator(".event-severity").first).to_have_text("⚠Warning:")
    # The rotation table says so too: replica-2's row is out of rotation, marked killed.
    expect(row).to_have_attribute("data-node-state", "killed")
    expect(row.locator("th")).to_have_text("replica-2 ✕ killed")
    expect(row.locator("td").first).to_have_text("no")
    expect(in_rotation).to_have_text("Replicas in rotation 2")
    expect(page.get_by_test_id("stat-errors")).to_have_text("0.0 %", timeout=10_000)
    shot(page, "42-lab-errors-over")

    # The fault reverts by itself; the replica comes back and is re-admitted.
    expect(page.get_by_test_id("event-log")).to_contain_text(
        "kill fault on replica-2 cleared", timeout=20_000
    )
    # (after the replica's process is back, which on a busy machine takes a few seconds)
    expect(page.get_by_test_id("event-log")).to_contain_text(
        "lb re-admitted replica-2", timeout=15_000
    )
    expect(node(page, "replica-2")).to_have_class(STATE_UP, timeout=10_000)
    expect(row).not_to_have_attribute("data-node-state", re.compile(".*"))
    expect(row.locator("td").first).to_have_text("yes")
    expect(page.get_by_test_id("active-fault")).to_have_count(0)
    shot(page, "43-lab-replica-back")

    # The first experiment: predict, run (the platform kills replica-2 for the learner),
    # and get a check computed from this sandbox's own telemetry, stored with progress.
    card = page.get_by_test_id("experiment-kill-replica")
    card.get_by_test_id("prediction-kill-replica-under-3s").check()
    shot(page, "45-lab-experiment-predicted")
    card.get_by_test_id("start-kill-replica").click()
    expect(card.get_by_test_id("run-status")).to_have_attribute("data-state", "running")
    expect(card.get_by_test_id("run-countdown")).to_contain_text("result in about")
    expect(node(page, "replica-2")).to_have_class(re.compile(r"\bstate-killed\b"), timeout=15_000)
    shot(page, "46-lab-experiment-running")
    result = card.get_by_test_id("run-result")
    expect(result).to_be_visible(timeout=45_000)
    expect(card.get_by_test_id("run-prediction")).to_have_text("Less than 3 seconds")
    expect(card.get_by_test_id("run-measured")).to_be_visible()
    run = ExperimentRun.objects.get()
    assert (run.state, run.experiment) == ("checked", "kill-replica")
    assert run.correct is not None and run.measured
    assert f"{run.measured['calls']:.0f} " in run.explanation  # the learner's own figures
    expect(card.get_by_test_id("run-explanation")).to_have_text(run.explanation)
    shot(page, "47-lab-experiment-result")

    # A live control: least-connections, applied on the balancer and logged.
    page.locator("#control-policy").select_option("least-connections")
    expect(page.get_by_test_id("event-log")).to_contain_text(
        "lb: policy set to least-connections (was round-robin)"
    )

    # A second change made while the first is still applied wins, and the panel shows it:
    # replicas 3 → 5 (two containers start), and at once 5 → 2.
    replicas = page.locator("#control-replicas")
    replicas.fill("5")
    replicas.dispatch_event("change")
    replicas.fill("2")  # while the first answer is on its way
    replicas.dispatch_event("change")
    expect(page.locator("g.gnode")).to_have_count(4, timeout=20_000)  # traffic, lb, 2 replicas
    expect(page.locator("#control-replicas")).to_have_value("2")
    page.wait_for_timeout(2000)  # nothing comes back to undo it
    expect(page.locator("#control-replicas")).to_have_value("2")
    assert sorted(n.name for n in sandbox.nodes.all()) == [
        "lb",
        "replica-1",
        "replica-2",
        "traffic",
    ]

    # The server restarts: the page keeps its graph and charts, reconnects by itself, and
    # the restarted supervisor picks the running sandbox up again.
    span = (  # the time span of the charts' data
        "(l => [l.times[0], l.times[l.times.length - 1]])"
        "(document.querySelector('[data-lab]').__lab)"
    )
    first = page.evaluate(span)[0]
    platform.stop()
    expect(page.get_by_test_id("lab-connection")).not_to_have_text("● Live", timeout=10_000)
    expect(page.locator("g.gnode")).to_have_count(4)
    stopped = page.evaluate(span)
    assert stopped[0] == first  # nothing was cleared
    shot(page, "44-lab-reconnecting")
    platform.start()
    # Reconnect attempts back off to at most 10 s apart, so the page is live again soon
    # after the server is (htmx's own default waits up to 64 s).
    expect(page.get_by_test_id("lab-connection")).to_have_text("● Live", timeout=20_000)
    wait_until(page, f"{span}[1] > {stopped[1]} + 2")  # new data after the old…
    assert page.evaluate(span)[0] == first  # …and the old still there

    # The result is on the course home, with the learner's progress.
    home = context.new_page()
    home.goto("/")
    expect(home.get_by_test_id("chapter-5").get_by_test_id("experiments-progress")).to_have_text(
        "Experiments 1/2"
    )
    home.close()

    # Stop: the panel offers a new launch and the containers are gone.
    page.get_by_test_id("stop-sandbox").click()
    expect(page.get_by_test_id("launch-sandbox")).to_be_visible(timeout=30_000)
    shot(page, "49-lab-stopped")
    sandbox.refresh_from_db()
    assert sandbox.state == Sandbox.State.STOPPED
    from apps.labs.engine.docker import DockerEngine

    assert DockerEngine(instance=INSTANCE).list_sandboxes() == []
    assert errors == []
    context.close()
