"""Chapter 10, "Try it in the sandbox": one certificate per service and only the call the
policy forbids is denied; an intruder without a certificate is refused at the handshake,
then (permissive mTLS) by the policy, then (log only) let through; rotating a certificate
changes nothing, revoking it fails the handshakes until the node restarts; the CA away
for less than half a certificate's lifetime changes nothing, away for longer fails
handshakes as certificates expire; a killed service is a refused connection, not a
refused identity. Then the pattern's two experiments.

A draft, not yet run on Docker. Shortened for CI: certificates live 20 s instead of 2
minutes for step 4 (an outage of 6 s, then of 30 s), and faults last seconds instead of
30 s or 3 minutes. Tolerances: error shares within bounds that leave room for a loaded
machine; who refuses whom, exactly.
"""

from __future__ import annotations

import time

import pytest
from celery import Celery

from apps.accounts.models import User
from tests.walkthroughs.lab import Lab

pytestmark = pytest.mark.django_db(transaction=True)

SERVICES = ("client", "gateway", "orders", "inventory", "reporting")


def test_chapter_10_walkthrough_and_experiments(
    walk_engine: str, learner: User, embedded_celery: Celery
) -> None:
    with Lab(learner, "mtls-authz") as lab:
        walk(lab)
        experiments(lab)


def walk(lab: Lab) -> None:
    # 1. One certificate issued per service; reporting → inventory 100% errors (denied),
    # every other link clean.
    for service in SERVICES:
        lab.wait_event("issued", 0, timeout=20, node="ca", subject=service)
    calm = lab.watch(4, settle=1)
    assert calm.users().errors == 0 and calm.users().n > 0, calm.users()
    assert calm.link("reporting", "inventory").error_pct == 100
    for src, dst in [("gateway", "orders"), ("orders", "inventory"), ("reporting", "orders")]:
        assert calm.link(src, dst).errors == 0, (src, dst)
    lab.wait_event("denied", 0, node="inventory", caller="reporting", route="POST /reserve")
    subjects = {row["subject"] for row in lab.table_rows("certificates")}
    assert subjects == {f"spiffe://sandbox.distlab/{s}" for s in SERVICES}

    # 2. The intruder: refused at the handshake (orders sees nothing); permissive mTLS:
    # denied by the policy (no identity); log only: let through.
    mark = time.time()
    lab.control("intruder", True)
    refused = lab.wait_event("handshake_refused", mark, node="intruder", peer="orders")
    assert refused["data"]["reason"] == "reset during the handshake"
    strict = lab.watch(3)
    assert strict.link("intruder", "orders").error_pct == 100
    mark = time.time()
    lab.control("mtls", "permissive")
    lab.wait_event("denied", mark, node="orders", caller="no identity", action="403")
    assert lab.watch(3).link("intruder", "orders").error_pct == 100
    lab.control("policy", "log only")
    assert lab.watch(3).link("intruder", "orders").error_pct == 0
    lab.control("policy", "enforce")
    lab.control("mtls", "strict")
    lab.control("intruder", False)

    # 3. Rotate orders's certificate: nothing happens. Revoke it: gateway's handshakes
    # fail (certificate revoked), checkouts fail; restart orders: recovered.
    mark = time.time()
    lab.control("rotate", "orders")
    lab.wait_event("issued", mark, node="ca", subject="orders")
    assert lab.watch(3).users().errors == 0
    lab.control("rotate", "none")
    mark = time.time()
    lab.control("revoke", "orders")
    refused = lab.wait_event("handshake_refused", mark, node="gateway", peer="orders")
    assert "revoked" in refused["data"]["reason"], refused
    assert lab.watch(3).users().error_pct == 100
    mark = time.time()
    lab.fault("orders", "restart")
    lab.wait_event("issued", mark, timeout=20, node="ca", subject="orders")
    lab.control("revoke", "none")
    assert lab.watch(3, settle=2).users().errors == 0

    # 4. (the CA partitioned for less, then for longer than a certificate's lifetime) is
    # the experiment ca-outage, below.

    # 5. inventory killed: orders's calls fail to connect; no refused handshake.
    kill = lab.fault("inventory", "kill", duration=30)
    dead = lab.watch(3)
    assert dead.link("orders", "inventory").error_pct == 100
    assert not [t for t in dead.texts("handshake_refused") if "inventory" in t]
    lab.revert(kill)
    lab.wait_until_up("inventory")


def experiments(lab: Lab) -> None:
    # The CA away for 8 s changes nothing; away for 35 s, checkouts fail.
    # Step 4: the CA away for 8 s changes nothing; away for 35 s, certificates expire and
    # checkouts fail, then recover once it is back.
    run = lab.experiment("ca-outage", "neither")
    assert run.correct is False, run.measured
    assert run.measured["short_error_pct"] < 5 <= run.measured["long_error_pct"], run.measured
    assert lab.verdicts(run)["long-only"].correct
    steps = lab.steps(run)
    assert steps["long"].texts("expired"), "no certificate expired while the CA was away"
    assert lab.watch(3, settle=4).users().errors == 0

    # The intruder: refused under strict, denied under permissive, through with log only.
    run = lab.experiment("intruder", "yes")
    assert run.correct is False, run.measured
    assert run.measured["strict_error_pct"] >= 90, run.measured
    assert run.measured["permissive_error_pct"] >= 90, run.measured
    assert run.measured["logonly_error_pct"] <= 10, run.measured
