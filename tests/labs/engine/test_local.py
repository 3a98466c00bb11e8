"""What only the local-process engine does."""

from __future__ import annotations

import pytest

from apps.labs.engine import local


def test_a_port_handed_to_a_node_is_not_handed_out_again_before_it_binds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two nodes of one sandbox drawing the same (still unbound) port would both pass the
    bind check and one would die at start-up: the second draw must skip it."""
    monkeypatch.setattr(local, "_handed_out", {})
    draws = iter([24_001, 24_001, 24_002])
    monkeypatch.setattr(local.random, "choice", lambda _ports: next(draws))
    assert [local._free_port(), local._free_port()] == [24_001, 24_002]


def test_held_ports_are_released_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "_handed_out", {24_003: -local.PORT_HOLD_SECONDS * 2})
    monkeypatch.setattr(local.random, "choice", lambda _ports: 24_003)
    assert local._free_port() == 24_003
