from __future__ import annotations

from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from apps.courses.content import Problem, load_content
from apps.courses.services import content_sync
from apps.labs.patterns import pattern_ids, pattern_problems


def shown(problem: Problem) -> str:
    """``file:line: message``, with the file relative to the current folder when inside it."""
    try:
        path: Path = problem.path.resolve().relative_to(Path.cwd())
    except ValueError:
        path = problem.path
    return f"{path}:{problem.line}: {problem.message}"


class Command(BaseCommand):
    help = (
        "Check the course content (and the sandbox patterns it names) for problems, or "
        "index it into the database."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("action", choices=["check", "sync"])
        parser.add_argument(
            "--dir", type=Path, default=None, help="Content folder (default: CONTENT_DIR)"
        )

    def handle(self, *args: Any, action: str, dir: Path | None, **options: Any) -> None:
        content_dir = dir or settings.CONTENT_DIR
        if not content_dir.is_dir():
            raise CommandError(f"{content_dir}: no such content folder")
        if action == "check":
            sources, problems = load_content(content_dir)
            problems += [Problem(path, line, text) for path, line, text in pattern_problems()]
            problems += sandbox_problems(sources)
            for problem in problems:
                self.stdout.write(shown(problem))
            if problems:
                raise CommandError(f"{len(problems)} problem(s) in {content_dir}", returncode=1)
            self.stdout.write(f"{len(sources)} chapters, no problems.")
            return
        report = content_sync(content_dir=content_dir)
        for problem in report.problems:
            self.stderr.write(shown(problem))
        self.stdout.write(
            f"content sync: {report.created} created, {report.updated} updated, "
            f"{report.retired} retired, {report.unchanged} unchanged, "
            f"{len(report.problems)} problem(s)"
        )


NO_SANDBOX = (
    "sandbox: no pattern named {sandbox!r} in sandboxes/patterns/ (there are: {known}): "
    "every chapter launches a sandbox of its own"
)


def sandbox_problems(sources: list[Any]) -> list[Problem]:
    """Every chapter names a pattern that exists, so each launches a sandbox of its own."""
    known = pattern_ids()
    problems = []
    for source in sources:
        if source.sandbox in known:
            continue
        lines = source.path.read_text(encoding="utf-8").splitlines()
        line = next((n for n, text in enumerate(lines, 1) if text.startswith("sandbox:")), 1)
        message = NO_SANDBOX.format(sandbox=source.sandbox, known=", ".join(sorted(known)))
        problems.append(Problem(source.path, line, message))
    return problems
