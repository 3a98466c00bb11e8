"""Small chapter files for tests that need content they control."""

from __future__ import annotations

from pathlib import Path

QUIZ = """quiz:
  - id: q1
    question: Which one is right?
    answer: b
    options:
      - id: a
        text: The first
        explain: Not this one.
      - id: b
        text: The second
        explain: Yes, this one.
  - id: q2
    question: Pick both good ones.
    answer: [a, c]
    options:
      - id: a
        text: Good
        explain: Good indeed.
      - id: b
        text: Bad
        explain: Bad indeed.
      - id: c
        text: Also good
        explain: Also good indeed.
"""


def chapter_text(
    *, slug: str, number: int, title: str = "", body: str = "", quiz: str = QUIZ
) -> str:
    title = title or f"Chapter about {slug}"
    body = body or f"# {title}\n\nSome words about {slug}.\n\n## A section\n\nMore words.\n"
    return (
        "---\n"
        f"slug: {slug}\n"
        f"number: {number}\n"
        f"title: {title}\n"
        f"summary: What {slug} teaches.\n"
        "sandbox: replicated-lb\n"
        "minutes: 10\n"
        "objectives:\n  - Understand it\n"
        f"{quiz}"
        "---\n"
        f"{body}"
    )


def write_chapter(directory: Path, name: str, **kwargs: object) -> Path:
    path = directory / name
    path.write_text(chapter_text(**kwargs), encoding="utf-8")  # type: ignore[arg-type]
    return path
