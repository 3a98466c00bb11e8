"""The settings of a local install, remembered in ``var/local.env`` (the var folder is
``DISTLAB_VAR_DIR``), so that ``manage.py`` commands typed by hand in a checkout work as
`make run` does: `make setup` writes the file once (``python -m config.localenv``) with
``DEBUG=true`` and a generated ``SECRET_KEY``, and ``manage.py`` reads it. The environment
always wins over the file. A server never has one: `docker-compose` builds without ``var/``.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import MutableMapping
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
HEADER = """\
# The settings of this local install, written once by `make setup` and read by manage.py
# (the environment wins over this file). Not for a server others use: see README.md.
"""


def path(environ: MutableMapping[str, str] = os.environ) -> Path:
    return Path(environ.get("DISTLAB_VAR_DIR") or BASE_DIR / "var") / "local.env"


def load(environ: MutableMapping[str, str] = os.environ) -> Path | None:
    """Put the file's ``NAME=value`` lines into ``environ`` where it has no such name.
    Returns the file read, or None when there is none."""
    file = path(environ)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip().isidentifier():
            raise SystemExit(f"{file}:{number}: expected NAME=value, got {line!r}")
        environ.setdefault(name.strip(), value.strip())
    return file


def write(environ: MutableMapping[str, str] = os.environ) -> Path:
    """Write the file unless it exists (its key must not change under signed-in users)."""
    file = path(environ)
    if not file.exists():
        file.parent.mkdir(parents=True, exist_ok=True)
        body = f"{HEADER}DEBUG=true\nSECRET_KEY={secrets.token_urlsafe(50)}\n"
        descriptor = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            out.write(body)
    return file


if __name__ == "__main__":
    print(f"local settings: {write()}", file=sys.stderr)
