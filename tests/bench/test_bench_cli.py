"""Every benchmark in bench/ starts: its command line parses and it documents itself.

A benchmark runs on demand, not in the suite, so nothing else would notice one that no
longer starts (a syntax error, an import that moved) until somebody needs its figure.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def test_there_are_benchmarks() -> None:
    assert {p.name for p in SCRIPTS} >= {"launch.py", "capacity.py", "soak.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_starts_and_explains_itself(script: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"DEBUG": "true", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
