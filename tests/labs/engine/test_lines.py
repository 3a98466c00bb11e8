"""What every engine's ``follow`` does with a node's untrusted output."""

from __future__ import annotations

from apps.labs.engine.base import split_lines


def test_split_lines_drops_a_line_too_long_and_never_holds_more() -> None:
    """Docker's log stream comes in chunks of any size: a line over the limit is dropped
    whole (even spread over many chunks), and the lines around it come through."""
    chunks = [b"one\ntw", b"o\n", b"x" * 70, b"x" * 70, b"x" * 70, b"\nthree\n", b"four"]
    assert list(split_lines(chunks, limit=100)) == [b"one", b"two", b"three"]
    assert list(split_lines([b"a" * 101 + b"\nb\n"], limit=100)) == [b"b"]
