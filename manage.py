#!/usr/bin/env python
"""Django's command-line utility for Distlab."""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    from config.localenv import load

    load()  # var/local.env, written by `make setup`: commands typed by hand work as make's
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
