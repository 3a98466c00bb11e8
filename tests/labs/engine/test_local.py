"""What only the local-process engine does."""

from __future__ import annotations

import socket

import pytest

from apps.labs.engine import local


def test_a_port_handed_to_a_node_is_not_handed_out_again_before_it_binds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two nodes of one sandbox drawing the same (still unbound) port would both pass the
    bind check and one would die at start-up: the second draw must skip it."""
    monkeypatch.setattr(local, "_handed_out", {})
    first, second = unbound_ports(2)  # other sandboxes on this machine may hold some
    draws = iter([first, first, second])
    monkeypatch.setattr(local.random, "choice", lambda _ports: next(draws))
    assert [local._free_port(), local._free_port()] == [first, second]


def unbound_ports(count: int) -> list[int]:
    found = []
    for port in local.NODE_PORTS:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise AssertionError("no free ports")


def test_held_ports_are_released_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    [port] = unbound_ports(1)
    monkeypatch.setattr(local, "_handed_out", {port: -local.PORT_HOLD_SECONDS * 2})
    monkeypatch.setattr(local.random, "choice", lambda _ports: port)
    assert local._free_port() == port
