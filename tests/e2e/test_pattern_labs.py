"""Every chapter's sandbox in the browser, on Docker, as a learner meets it: launch from
the chapter, see every node up and the pattern's own state, break the chapter's main
thing and see the state change, run one experiment to its result. Screenshots go to
tests/e2e/artifacts/ (60-… per pattern). Chapter 5's fuller journey is test_live_lab.py."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from playwright.sync_api import Page, expect

from apps.accounts.models import User
from apps.labs.models import ExperimentRun, Sandbox
from apps.labs.patterns import load_pattern
from tests.e2e.platform import ARTIFACTS, PASSWORD, STATE_UP, Platform, node, shot, wait_until
from tests.e2e.test_sandbox_panel import sign_in

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@dataclass(frozen=True)
class Case:
    chapter: str  # the chapter's slug
    nodes: tuple[str, ...]
    figure: str  # a text the Pattern state panel shows (a gauge's or a state's label)
    fault: tuple[str, str]  # node, kind: the chapter's main fault
    state: str  # the node's state class while the fault holds
    experiment: tuple[str, str]  # id, the option the learner picks
    series: str = ""  # one of the pattern's series, chosen in the charts' "Show"


CASES = {
    "hello-cluster": Case(
        "introduction",
        ("traffic", "front", "profile", "greeting"),
        "Calls waiting on greeting",
        ("greeting", "kill"),
        "killed",
        ("slow-or-dead", "cannot-tell"),
    ),
    "sidecar-proxy": Case(
        "single-node-patterns",
        ("traffic", "sidecar", "app"),
        "Calls to the app",
        ("app", "pause"),
        "paused",
        ("retries-error-rate", "about-9"),
    ),
    "sharded-kv": Case(
        "multi-node-patterns",
        ("traffic", "reporter", "router", "shard-1", "shard-2", "shard-3"),
        "Keys stored",
        ("shard-2", "kill"),
        "killed",
        ("scatter-gather-tail", "about-300"),
    ),
    "event-sourcing-cqrs": Case(
        "data-management-patterns",
        ("client", "commands", "event-store", "projector-balances", "projector-history"),
        "Projector",
        ("projector-history", "kill"),
        "killed",
        ("concurrent-writers", "conflicts"),
    ),
    "service-discovery": Case(
        "service-discovery",
        ("client", "dns", "registry", "api-1", "api-2", "api-3"),
        "Registry leases",
        ("api-2", "kill"),
        "killed",
        ("registry-outage", "nothing"),
    ),
    "pubsub-queue": Case(
        "messaging-patterns",
        ("producer", "broker", "worker-1", "worker-2", "worker-3", "auditor"),
        "Depth of work",
        ("auditor", "partition"),
        "partitioned",
        ("slow-subscriber", "audit-only"),
    ),
    "circuit-breaker-bulkhead": Case(
        "resiliency-patterns",
        ("client", "api", "fast", "flaky"),
        "Breaker on flaky",
        ("flaky", "pause"),
        "paused",
        ("breaker-opening", "seconds"),
        series="fast",
    ),
    "tracing-logging": Case(
        "monitoring-and-logging",
        ("client", "gateway", "orders", "inventory", "payments", "collector"),
        "Traces kept (total)",
        ("collector", "kill"),
        "killed",
        ("collector-down", "carry-on"),
        series="checkout",
    ),
    "mtls-authz": Case(
        "security-patterns",
        ("ca", "inventory", "orders", "gateway", "reporting", "client", "intruder", "auditor"),
        "Valid certificates",
        ("inventory", "kill"),
        "killed",
        ("intruder", "no"),
        series="checkout",
    ),
    "capstone": Case(
        "conclusion",
        (
            "traffic",
            "lb",
            "api-1",
            "api-2",
            "api-3",
            "shard-a",
            "shard-b",
            "shard-c",
            "shard-d",
            "recommender",
            "queue",
            "consumer-1",
            "consumer-2",
            "collector",
        ),
        "Queue depth",
        ("api-2", "kill"),
        "killed",
        ("kill-api", "under-2s"),
        series="order",
    ),
    "blue-green-canary": Case(
        "deployment-patterns",
        (
            "client",
            "router",
            "analysis",
            "blue-1",
            "blue-2",
            "blue-3",
            "green-1",
            "green-2",
            "green-3",
            "db",
        ),
        "Green weight",
        ("green-2", "kill"),
        "killed",
        ("who-sees-the-bug", "one-pct"),
        series="blue",
    ),
}


@pytest.mark.parametrize("pattern", sorted(CASES))
def test_a_learner_launches_breaks_and_experiments(
    browser,  # type: ignore[no-untyped-def]
    platform: Platform,
    pattern: str,
) -> None:
    case = CASES[pattern]
    User.objects.create_user(username="lab", password=PASSWORD)
    context = browser.new_context(viewport={"width": 1366, "height": 900}, base_url=platform.base)
    page: Page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    sign_in(page, "lab", PASSWORD)
    page.goto(f"/chapters/{case.chapter}/#sandbox")
    page.get_by_test_id("launch-sandbox").click()
    expect(page.get_by_test_id("sandbox-state")).to_have_text("Running", timeout=60_000)
    assert Sandbox.objects.get().pattern == pattern
    for name in case.nodes:
        expect(node(page, name)).to_have_class(STATE_UP)
    expect(page.get_by_test_id("lab-connection")).to_have_text("● Live", timeout=20_000)
    wait_until(page, "document.querySelectorAll('.g-dots .dot').length > 0")
    expect(page.get_by_test_id("pattern-state")).to_be_visible()
    expect(page.get_by_test_id("pattern-state")).to_contain_text(case.figure, timeout=10_000)
    shot(page, f"60-{pattern}-running")

    if case.series:  # the charts show one series of the pattern's: calls on one route
        page.get_by_test_id("chart-scope").select_option(f"series:{case.series}")
        wait_until(
            page,
            "((document.querySelector('[data-lab]').__lab.perNode['series:"
            + case.series
            + "'] || {}).rps || []).some(v => v > 0)",
        )
        shot(page, f"64-{pattern}-series")

    if load_pattern(pattern).observe.traces:  # a collector: the Traces and Logs cards
        page.get_by_test_id("lab-traces").scroll_into_view_if_needed()
        page.get_by_test_id("open-trace").first.click(timeout=20_000)
        rows = page.get_by_test_id("waterfall").locator("tr.span-row")
        expect(rows.first).to_be_visible()
        assert rows.count() >= 2
        trace_id = page.get_by_test_id("trace-id").text_content() or ""
        page.get_by_test_id("trace-logs").click()
        expect(page.get_by_test_id("log-trace")).to_have_value(trace_id)
        lines = page.get_by_test_id("log-lines").locator("li.log-line")
        expect(lines.first).to_be_visible()
        for index in range(lines.count()):
            expect(lines.nth(index).locator(".log-trace")).to_contain_text(trace_id[:8])
        shot(page, f"65-{pattern}-trace")

        # A moving request opens its own trace (dots move, so the click is dispatched on
        # one as it is found); a point of the latency chart opens that moment's slowest.
        wait_until(page, "!!document.querySelector('[data-lab-graph] .dot-traced')")
        clicked = page.evaluate(
            """() => {
              const dot = document.querySelector('[data-lab-graph] .dot-traced');
              dot.dispatchEvent(new MouseEvent('click', {bubbles: true}));
              return dot.getAttribute('data-trace');
            }"""
        )
        expect(page.get_by_test_id("trace-id")).to_have_text(clicked, timeout=15_000)
        expect(page.get_by_test_id("waterfall").locator("tr.span-row").first).to_be_visible()
        plot = page.get_by_test_id("chart-latency").locator(".u-over")
        plot.scroll_into_view_if_needed()
        box = plot.bounding_box()
        assert box is not None
        page.mouse.click(box["x"] + box["width"] - 3, box["y"] + box["height"] / 2)
        slowest = page.evaluate(
            "(() => { const lab = document.querySelector('[data-lab]').__lab;"
            " return lab.traceAt(lab.charts.latency.cursor.idx); })()"
        )
        assert slowest, "the latency chart's newest points name no traced request"
        expect(page.get_by_test_id("trace-id")).to_have_text(slowest, timeout=15_000)
        shot(page, f"67-{pattern}-clicked-trace")

    # The code each node runs, one click away (read-only, highlighted).
    first = page.get_by_test_id("code-links").locator("a").first
    program = first.text_content() or ""
    code = context.new_page()
    code.goto(first.get_attribute("href") or "")
    expect(code.get_by_role("heading", level=1)).to_have_text(program)
    expect(code.get_by_test_id("program-code")).to_contain_text("def setup(node: Node)")
    code.screenshot(path=str(ARTIFACTS / f"63-{pattern}-code.png"))
    code.close()

    # The chapter's main fault, from the form, for 20 s, then reverted from its row.
    target, kind = case.fault
    node(page, target).click()
    expect(page.get_by_test_id("fault-node")).to_have_value(target)
    page.get_by_test_id("fault-kind").select_option(kind)
    page.get_by_test_id("fault-duration").select_option("20")
    page.get_by_test_id("inject-fault").click()
    expect(page.get_by_test_id("active-fault")).to_contain_text(target)
    expect(node(page, target)).to_have_class(re.compile(rf"\bstate-{case.state}\b"), timeout=10_000)
    shot(page, f"61-{pattern}-broken")
    # Reverted before its time (chapter 5's journey waits for a fault to revert by itself).
    active = page.get_by_test_id("active-fault").filter(has_text=target)
    active.get_by_role("button", name="Revert now").click()
    expect(page.get_by_test_id("active-fault")).to_have_count(0)
    expect(node(page, target)).to_have_class(STATE_UP, timeout=40_000)  # back

    # One experiment, to its result.
    experiment, option = case.experiment
    card = page.get_by_test_id(f"experiment-{experiment}")
    details = card.locator("details").first
    if not details.evaluate("el => el.open"):
        details.locator("summary").click()  # the learner opens the experiment's card
    card.get_by_test_id(f"prediction-{experiment}-{option}").check()
    card.get_by_test_id(f"start-{experiment}").click()
    expect(card.get_by_test_id("run-status")).to_have_attribute("data-state", "running")
    result = card.get_by_test_id("run-result")
    expect(result).to_be_visible(timeout=90_000)
    run = ExperimentRun.objects.get()
    assert run.state == ExperimentRun.State.CHECKED, run.error
    expect(card.get_by_test_id("run-explanation")).to_have_text(run.explanation)
    shot(page, f"62-{pattern}-experiment")
    scenario = load_pattern(pattern).scenario
    if scenario is not None:  # the first stage done, scored; the next one open
        total = len(scenario.experiments)
        expect(page.get_by_test_id("scenario-score")).to_contain_text(f"1 of {total} stages done")
        following = page.get_by_test_id(f"experiment-{scenario.experiments[1]}")
        expect(following.locator("details").first).to_have_attribute("open", "")
        page.get_by_test_id("scenario").scroll_into_view_if_needed()
        shot(page, f"66-{pattern}-scenario")

    page.get_by_test_id("stop-sandbox").click()
    expect(page.get_by_test_id("launch-sandbox")).to_be_visible(timeout=30_000)
    assert errors == []
    context.close()
