"""The mtls-authz pattern: client → gateway → orders → inventory, reporting, an intruder and
an auditor, and ca, as local processes. One test per idea of chapter 10's "Try it in the
sandbox": every workload gets a certificate and only the call the policy forbids is denied;
an intruder without a certificate is refused at the handshake, then (permissive mTLS) by
the policy, then (log only) let through; rotating a certificate changes nothing and
revoking it fails the handshake until the node restarts; certificates outlive a short CA
outage and expire in a long one; a killed service is a refused connection, not a refused
identity. And the user's authority: every hop checks the token it is shown (audience,
scopes, dates by its own clock), and only orders skipping its check lets the auditor's
forbidden orders through; orders keeps its orders encrypted under rotated keys. One sandbox
serves the module; the long outage uses a 10-s lifetime (a control) instead of the
chapter's 2 minutes. After each test everything is put back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from apps.labs.patterns import Pattern, load_pattern
from sandboxes.runtime.testing import LocalCluster
from tests.sandboxes.helpers import assert_quiet, configure, fault, put_back

PATTERN = "mtls-authz"
WORKLOADS = ["inventory", "orders", "gateway", "reporting", "client", "auditor"]
NODES = ["ca", "inventory", "orders", "gateway", "reporting", "client", "intruder", "auditor"]
CA = {
    "mtls": "strict",
    "policy": "enforce",
    "revoke": "none",
    "rotate": "none",
    "deputy": "none",
    "skew_node": "none",
}


@pytest.fixture(scope="module")
def pattern() -> Pattern:
    return load_pattern(PATTERN)


@pytest.fixture(scope="module")
def sandbox(pattern: Pattern) -> Iterator[LocalCluster]:
    with LocalCluster(PATTERN, pattern.expand()) as cluster:
        cluster.wait_started()
        cluster.wait_for(lambda: len(issued(cluster, 0)) >= 6, 15, "six certificates")
        yield cluster


@pytest.fixture
def cluster(sandbox: LocalCluster) -> Iterator[LocalCluster]:
    yield sandbox
    put_back(sandbox, NODES)
    configure(sandbox, "intruder", active=False)
    configure(sandbox, "auditor", active=False)
    configure(sandbox, "client", audience="shop")
    configure(sandbox, "orders", key_rotation_s=60, rewrap_per_s=20)
    configure(sandbox, "ca", **CA)
    if sandbox.ctl("ca", {"op": "state"})["config"]["cert_ttl_s"] != 120:
        configure(sandbox, "ca", cert_ttl_s=120)
    sandbox.wait_for(lambda: checkouts_ok(sandbox, sandbox.mark() - 1.5), 20, "checkouts")
    assert_quiet(sandbox)


def issued(cluster: LocalCluster, since: float, subject: str | None = None) -> list[Any]:
    return [
        e
        for e in events(cluster, "ca", "issued", since)
        if subject is None or e["subject"] == subject
    ]


def events(cluster: LocalCluster, node: str, kind: str, since: float) -> list[dict[str, Any]]:
    return [e for e in cluster.events(node, "state", since) if e["event"] == kind]


def calls(cluster: LocalCluster, src: str, dst: str, since: float) -> list[dict[str, Any]]:
    return [e for e in cluster.events(src, "call", since) if e["dst"] == dst]


def checkouts_ok(cluster: LocalCluster, since: float) -> bool:
    done = calls(cluster, "client", "gateway", since)
    return bool(done) and all(c["status"] == 200 for c in done)


def started(call: dict[str, Any]) -> float:
    """When a call began (its line is written when it ends)."""
    return float(call["ts"]) - float(call["ms"]) / 1000


def failing(cluster: LocalCluster, src: str, dst: str, since: float) -> list[dict[str, Any]]:
    return [c for c in calls(cluster, src, dst, since) if c["status"] != 200]


# ---- step 1: one certificate per workload; deny by default ---------------------------------


def test_every_workload_gets_a_certificate_and_only_the_forbidden_call_is_denied(
    cluster: LocalCluster,
) -> None:
    subjects = {e["subject"] for e in issued(cluster, 0)}
    assert subjects == set(WORKLOADS)  # the intruder has none
    ids = {f"spiffe://sandbox.distlab/{w}" for w in WORKLOADS}

    def table() -> list[dict[str, Any]]:
        return cluster.ctl("ca", {"op": "state"})["observed"]["tables"].get("certificates", [])

    cluster.wait_for(lambda: {r["subject"] for r in table()} == ids, 3, "the certificate table")
    assert {r["status"] for r in table()} == {"valid"}
    since = cluster.mark()
    cluster.wait_for(lambda: len(calls(cluster, "reporting", "inventory", since)) >= 1, 8, "try")
    time.sleep(0.5)
    assert {c["status"] for c in calls(cluster, "reporting", "inventory", since)} == {403}
    assert checkouts_ok(cluster, since)
    for src, dst in [("gateway", "orders"), ("orders", "inventory"), ("reporting", "orders")]:
        assert calls(cluster, src, dst, since) and not failing(cluster, src, dst, since)
    denied = events(cluster, "inventory", "denied", since)
    assert denied and denied[0]["caller"] == "reporting" and denied[0]["route"] == "POST /reserve"

    def by_caller() -> dict[str, dict[str, Any]]:
        tables = cluster.ctl("inventory", {"op": "state"})["observed"]["tables"]
        return {r["caller"]: r for r in tables.get("authz_inventory", [])}

    cluster.wait_for(lambda: "reporting" in by_caller(), 3, "the authz table")
    by_caller = by_caller()
    assert by_caller["reporting"]["denied"] >= 1 and by_caller["reporting"]["allowed"] == 0
    assert by_caller["orders"]["allowed"] >= 1 and by_caller["orders"]["denied"] == 0
    assert by_caller["orders"]["user"] == "alice"  # the client's user, checked at every hop


# ---- step 2: the intruder ------------------------------------------------------------------


def test_the_intruder_is_refused_at_the_handshake_then_by_the_policy_then_let_through(
    cluster: LocalCluster,
) -> None:
    since = cluster.mark()
    configure(cluster, "intruder", active=True)
    cluster.wait_for(lambda: len(calls(cluster, "intruder", "orders", since)) >= 3, 5, "calls")
    tries = calls(cluster, "intruder", "orders", since)
    assert {(c["status"], c["error"]) for c in tries} == {(0, "tls")}
    from_intruder = [r for r in cluster.events("orders", "request", since) if r["src"]]
    assert not [r for r in from_intruder if r["src"] == "intruder"]  # orders saw nothing
    refused = events(cluster, "intruder", "handshake_refused", since)
    assert refused and refused[0]["peer"] == "orders"
    assert refused[0]["reason"] == "reset during the handshake"

    since = cluster.mark()
    configure(cluster, "ca", mtls="permissive")
    cluster.wait_for(
        lambda: any(c["status"] == 403 for c in calls(cluster, "intruder", "orders", since)),
        5,
        "a 403",
    )
    denied = events(cluster, "orders", "denied", since)
    assert denied and denied[-1]["caller"] == "no identity" and denied[-1]["action"] == "403"

    since = cluster.mark()
    configure(cluster, "ca", policy="log only")
    cluster.wait_for(
        lambda: any(c["status"] == 200 for c in calls(cluster, "intruder", "orders", since)),
        5,
        "a 200",
    )
    assert any(e["action"] == "logged only" for e in events(cluster, "orders", "denied", since))
    assert checkouts_ok(cluster, since)  # permissive changes nothing for callers with one


# ---- step 3: rotate, revoke, restart ---------------------------------------------------------


def test_rotating_changes_nothing_and_revoking_fails_handshakes_until_a_restart(
    cluster: LocalCluster,
) -> None:
    since = cluster.mark()
    configure(cluster, "ca", rotate="orders")
    cluster.wait_for(lambda: issued(cluster, since, "orders"), 5, "a new certificate")
    time.sleep(2)
    assert checkouts_ok(cluster, since)

    since = cluster.mark()
    configure(cluster, "ca", revoke="orders")
    # The event line comes on the node's output, which may be read a moment after the reply.
    cluster.wait_for(lambda: events(cluster, "ca", "revoked", since), 2, "the revocation")
    assert events(cluster, "ca", "revoked", since)[0]["subject"] == "orders"
    cluster.wait_for(lambda: failing(cluster, "gateway", "orders", since), 5, "refusals")
    time.sleep(1.5)
    late = cluster.mark() - 1
    begun = [c for c in calls(cluster, "gateway", "orders", late) if started(c) >= late]
    assert begun and {c["error"] for c in begun} == {"tls"}, begun
    assert {c["status"] for c in calls(cluster, "client", "gateway", late)} == {502}
    refused = events(cluster, "gateway", "handshake_refused", since)
    assert refused and "revoked" in refused[0]["reason"], refused

    since = cluster.mark()
    cluster.restart("orders")
    cluster.wait_for(lambda: issued(cluster, since, "orders"), 10, "a fresh certificate")
    cluster.wait_for(lambda: checkouts_ok(cluster, cluster.mark() - 1.5), 10, "recovered")


# ---- step 4: the CA away for less, then more, than a certificate lives -----------------------


def test_certificates_outlive_a_short_ca_outage_and_expire_in_a_long_one(
    cluster: LocalCluster,
) -> None:
    since = cluster.mark()
    configure(cluster, "ca", cert_ttl_s=10)  # everyone renews now, for 10 s
    cluster.wait_for(lambda: len(issued(cluster, since)) >= 5, 5, "renewals")
    time.sleep(1)

    short = cluster.mark()
    fault(cluster, "ca", kind="partition", peers=["*"])
    time.sleep(3)
    cluster.ctl("ca", {"op": "clear"})
    time.sleep(2)
    assert checkouts_ok(cluster, short)
    assert not events(cluster, "orders", "expired", short)

    long = cluster.mark()
    fault(cluster, "ca", kind="partition", peers=["*"])
    cluster.wait_for(lambda: failing(cluster, "client", "gateway", long), 15, "failures")
    first_failure = failing(cluster, "client", "gateway", long)[0]["ts"] - long
    assert 4 <= first_failure <= 11, first_failure  # between half and all of the lifetime
    cluster.wait_for(lambda: not checkouts_ok(cluster, cluster.mark() - 1), 12, "all failing")
    cluster.wait_for(
        lambda: [n for n in WORKLOADS if events(cluster, n, "expired", long)], 3, "expiries"
    )

    def reasons() -> set[str]:
        return {
            e["reason"]
            for node in WORKLOADS
            for e in events(cluster, node, "handshake_refused", long)
        }

    # The certificates were issued a moment apart, so they expire a moment apart: a caller
    # whose own certificate ran out first is hung up on ("reset during the handshake");
    # once the server's has run out too, the caller names it.
    cluster.wait_for(lambda: any("expired" in r for r in reasons()), 10, "'expired' named")

    cluster.ctl("ca", {"op": "clear"})
    cluster.wait_for(lambda: checkouts_ok(cluster, cluster.mark() - 1.5), 10, "recovered")


# ---- step 5: a dead service is not a refused identity ----------------------------------------


def test_a_killed_service_is_a_refused_connection_not_a_refused_identity(
    cluster: LocalCluster,
) -> None:
    since = cluster.mark()
    cluster.kill("inventory")
    killed = cluster.mark() + 0.2
    cluster.wait_for(lambda: len(failing(cluster, "orders", "inventory", since)) >= 5, 5, "fail")
    # A call in flight at the kill is cut ("disconnected", or "tls" if the kill came during
    # its handshake); every call begun after it is refused.
    begun = [c for c in failing(cluster, "orders", "inventory", since) if started(c) > killed]
    assert begun and {c["error"] for c in begun} == {"connect"}, begun
    assert not events(cluster, "orders", "handshake_refused", killed)
    assert {c["status"] for c in failing(cluster, "client", "gateway", since)} == {502}


# ---- the user's authority: tokens at every hop ----------------------------------------------


def table(cluster: LocalCluster, node: str, table_id: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = cluster.ctl(node, {"op": "state"})["observed"]["tables"].get(
        table_id, []
    )
    return rows


def test_a_token_for_another_audience_is_refused_at_the_first_hop(cluster: LocalCluster) -> None:
    configure(cluster, "client", audience="billing")
    cluster.wait_for(lambda: failing(cluster, "client", "gateway", cluster.mark() - 1), 5, "401")
    time.sleep(1)
    late = cluster.mark() - 1
    assert {c["status"] for c in calls(cluster, "client", "gateway", late)} == {401}
    assert not calls(cluster, "gateway", "orders", late)  # refused before going any further
    refused = events(cluster, "gateway", "token_refused", late - 2)
    assert refused and refused[-1]["reason"] == "meant for billing, not shop", refused
    configure(cluster, "client", audience="shop")
    cluster.wait_for(lambda: checkouts_ok(cluster, cluster.mark() - 1), 5, "recovered")


def auditor_statuses(cluster: LocalCluster, deputy: str) -> tuple[set[int], set[int]]:
    """With ``deputy`` skipping its check: the auditor's and the client's statuses."""
    configure(cluster, "ca", deputy=deputy)
    time.sleep(2)  # every node has fetched the bundle
    since = cluster.mark()
    time.sleep(2)
    auditor = {c["status"] for c in calls(cluster, "auditor", "gateway", since)}
    client = {c["status"] for c in calls(cluster, "client", "gateway", since)}
    return auditor, client


def test_only_orders_skipping_its_check_lets_the_auditors_orders_through(
    cluster: LocalCluster,
) -> None:
    configure(cluster, "auditor", active=True)
    since = cluster.mark()
    assert auditor_statuses(cluster, "none") == ({403}, {200})
    refused = events(cluster, "orders", "token_refused", since)
    assert refused and refused[0]["reason"] == "auditor lacks the scope orders:write"
    # gateway's own token may place orders but not reserve stock: inventory refuses it,
    # the auditor's checkouts and alice's alike.
    since = cluster.mark()
    assert auditor_statuses(cluster, "gateway") == ({403}, {403})
    assert events(cluster, "gateway", "deputy", since)
    refused = events(cluster, "inventory", "token_refused", since)
    assert refused and refused[-1]["reason"] == "gateway lacks the scope inventory:reserve"
    # orders's own token may reserve stock: the confused deputy lets the auditor buy.
    assert auditor_statuses(cluster, "orders") == ({200}, {200})
    users = {(r["caller"], r["user"]) for r in table(cluster, "inventory", "authz_inventory")}
    assert ("orders", "orders") in users  # inventory saw orders's own authority
    assert auditor_statuses(cluster, "inventory") == ({403}, {200})  # orders refuses first


def test_a_skewed_clock_refuses_tokens_as_expired_or_from_the_future(
    cluster: LocalCluster,
) -> None:
    for skew, words in [(120, "expired"), (-120, "ahead of this node's clock")]:
        since = cluster.mark()
        configure(cluster, "ca", skew_node="orders", skew_s=skew)
        cluster.wait_for(lambda s=since: failing(cluster, "gateway", "orders", s), 5, "refusals")
        time.sleep(1)
        late = cluster.mark() - 1
        assert {c["status"] for c in calls(cluster, "gateway", "orders", late)} == {401}
        reasons = [e["reason"] for e in events(cluster, "orders", "token_refused", since)]
        assert reasons and all(words in r for r in reasons), reasons
        configure(cluster, "ca", skew_node="none")
        cluster.wait_for(lambda: checkouts_ok(cluster, cluster.mark() - 1), 5, "recovered")

    # The CA's clock ahead: the certificate it issues now is not valid yet.
    since = cluster.mark()
    configure(cluster, "ca", skew_node="ca", skew_s=120)
    configure(cluster, "ca", rotate="orders")
    cluster.wait_for(lambda: failing(cluster, "gateway", "orders", since), 5, "refusals")
    configure(cluster, "ca", skew_node="none", rotate="none")
    refused = events(cluster, "gateway", "handshake_refused", since)
    assert refused and refused[0]["reason"] == "certificate is not yet valid", refused
    configure(cluster, "ca", rotate="orders")
    cluster.wait_for(lambda: checkouts_ok(cluster, cluster.mark() - 1), 10, "recovered")


def test_orders_are_kept_under_rotated_keys_and_old_keys_are_destroyed_once_unused(
    cluster: LocalCluster,
) -> None:
    since = cluster.mark()
    configure(cluster, "orders", rewrap_per_s=0, key_rotation_s=2)
    cluster.wait_for(lambda: len(events(cluster, "orders", "key_rotated", since)) >= 2, 6, "v+2")
    time.sleep(1.2)
    keys = table(cluster, "orders", "keys")
    assert keys[0]["state"] == "primary" and len(keys) >= 3, keys
    assert all(k["orders"] > 0 for k in keys[1:]), keys  # old keys still wrap orders
    assert not events(cluster, "orders", "key_destroyed", since)
    reads = calls(cluster, "reporting", "orders", since)
    assert reads and {c["status"] for c in reads} == {200}  # read back, whatever the key

    since = cluster.mark()
    configure(cluster, "orders", rewrap_per_s=1000, key_rotation_s=0)
    cluster.wait_for(lambda: len(table(cluster, "orders", "keys")) == 1, 5, "one key left")
    assert events(cluster, "orders", "key_destroyed", since)
    reads = calls(cluster, "reporting", "orders", cluster.mark() - 1.5)
    assert reads and {c["status"] for c in reads} == {200}


# ---- the spec ----------------------------------------------------------------------------


def test_the_spec_holds_the_numbers_the_chapter_uses(pattern: Pattern) -> None:
    assert [n.name for n in pattern.expand()] == NODES
    assert dict(pattern.params) == {
        "trust_domain": "sandbox.distlab",
        "cert_ttl_s": 120,
        "token_ttl_s": 60,  # "tokens live a minute"
        "clock_leeway_s": 10,  # "ten seconds of leeway"
    }
    assert pattern.users == ("client",)
    controls = {c.id: c for c in pattern.controls}
    assert controls["cert_ttl"].default == 120  # "2 minutes by default"
    assert controls["mtls"].choices == ("strict", "permissive")
    assert controls["policy"].choices == ("enforce", "log only")
    assert (controls["intruder"].kind, controls["intruder"].default) == ("toggle", False)
    for revoke_or_rotate in ("revoke", "rotate"):
        assert set(controls[revoke_or_rotate].choices) == {"none", *WORKLOADS}
    assert (controls["auditor"].kind, controls["auditor"].default) == ("toggle", False)
    assert controls["deputy"].choices == ("none", "gateway", "orders", "inventory")
    assert controls["audience"].choices == ("shop", "billing")
    assert controls["skew_node"].choices == ("none", "ca", "gateway", "orders", "inventory")
    assert controls["skew_s"].default == 120  # "two minutes ahead"
    assert (controls["key_rotation"].default, controls["rewrap"].default) == (60, 20)
    assert {"kill", "restart", "partition"} <= set(pattern.faults)
    assert {e.id for e in pattern.experiments} == {"ca-outage", "intruder", "deputy"}
