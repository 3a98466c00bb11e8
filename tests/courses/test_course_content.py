"""The real course in ``content/`` meets the course's rules.

Every chapter parses with no problems (the pipeline's own loader, as ``manage.py content
check`` runs it), has a quiz of at least five explained questions, a sandbox, a Mermaid
diagram and a body of 1,500 to 3,500 words; the chapters are the outline's twelve, in its
order, and link to each other where their patterns meet. These tests read the files
themselves, not a copy: an edit that breaks a rule fails here, naming the chapter.
"""

from __future__ import annotations

import shutil
from functools import cache
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from apps.courses import content
from apps.courses.content import ChapterSource, Problem, chapter_files, load_content
from tests.conftest import REPO

CONTENT_DIR = REPO / "content"

# The course outline's chapters, in its order: (number, file name).
OUTLINE = (
    (1, "01-introduction.md"),
    (2, "02-single-node-patterns.md"),
    (3, "03-multi-node-patterns.md"),
    (4, "04-data-management-patterns.md"),
    (5, "05-replicated-load-balanced-services.md"),
    (6, "06-service-discovery.md"),
    (7, "07-messaging-patterns.md"),
    (8, "08-resiliency-patterns.md"),
    (9, "09-monitoring-and-logging.md"),
    (10, "10-security-patterns.md"),
    (11, "11-deployment-patterns.md"),
    (12, "12-conclusion.md"),
)
FILE_BY_NUMBER = dict(OUTLINE)

MIN_WORDS = 1_500
MAX_WORDS = 3_500
MIN_QUESTIONS = 5
MIN_CHAPTERS_LINKED_FROM_CONCLUSION = 6
# What every broken-link problem of the pipeline starts with ("link to '").
LINK_PROBLEM = content.BROKEN_LINK.partition("{")[0]

# (from chapter, to chapter, where the patterns meet): the body of the first must link to
# the second.
REQUIRED_LINKS = (
    (3, 5, "replication and sharding"),
    (5, 3, "replication and sharding"),
    (6, 5, "service discovery and load balancing"),
    (5, 6, "service discovery and load balancing"),
    (7, 8, "queues and bulkheads"),
    (8, 7, "queues and bulkheads"),
    (9, 8, "tracing and circuit breakers"),
    (8, 9, "tracing and circuit breakers"),
    (11, 9, "canaries and monitoring"),
    (11, 5, "deployments and load balancing"),
)

_MARKDOWN = MarkdownIt("commonmark")


def body_word_count(body: str) -> int:
    """The length of a chapter body, as the course's rules count it.

    The rule: the whitespace-separated words of the Markdown body after the front matter,
    excluding fenced code blocks (Mermaid diagrams and code alike, fences included).
    Everything else counts as written: headings (with their ``#``), lists, tables,
    callouts and their ``:::`` lines.
    """
    fenced: set[int] = set()
    for token in _MARKDOWN.parse(body):
        if token.type == "fence" and token.map is not None:
            fenced.update(range(*token.map))
    lines = body.split("\n")
    return sum(len(line.split()) for number, line in enumerate(lines) if number not in fenced)


def mermaid_diagrams(body: str) -> list[str]:
    return [
        token.content
        for token in _MARKDOWN.parse(body)
        if token.type == "fence" and token.info.strip().split(maxsplit=1)[:1] == ["mermaid"]
    ]


def linked_chapter_files(body: str) -> set[str]:
    """The chapter files the body links to (``06-x.md``, ``./06-x.md#anchor``)."""
    files: set[str] = set()
    for token in _MARKDOWN.parse(body):
        for child in token.children or []:
            href = child.attrGet("href") if child.type == "link_open" else None
            if isinstance(href, str) and not href.startswith(("#", "/")) and ":" not in href:
                name = href.removeprefix("./").partition("#")[0]
                if name.endswith(".md"):
                    files.add(name)
    return files


@cache
def course() -> tuple[dict[str, ChapterSource], tuple[Problem, ...]]:
    chapters, problems = load_content(CONTENT_DIR)
    return {chapter.path.name: chapter for chapter in chapters}, tuple(problems)


def chapter(name: str) -> ChapterSource:
    chapters, problems = course()
    if name not in chapters:
        mine = [str(problem) for problem in problems if problem.path.name == name]
        pytest.fail(f"{name} did not load: {mine or 'no such chapter file'}")
    return chapters[name]


CHAPTER_FILES = [name for _number, name in OUTLINE]
per_chapter = pytest.mark.parametrize("name", CHAPTER_FILES)


# --- The counting rule itself --------------------------------------------------------


def test_it_counts_words_outside_fenced_blocks_only() -> None:
    body = (
        "# Three word title\n"
        "\n"
        "One two three.\n"
        "\n"
        "```mermaid\nflowchart LR\n  A --> B\n```\n"
        "\n"
        "::: note\n"
        "Four five\n"
        "\n"
        "~~~python\nprint('not counted')\n~~~\n"
        ":::\n"
    )

    # "#", "Three", "word", "title", "One", "two", "three.", "::: note" (2), "Four five" (2),
    # ":::" (1)
    assert body_word_count(body) == 12


def test_it_finds_mermaid_diagrams_and_chapter_links() -> None:
    body = (
        "See [five](05-x.md#health-checks), [six](./06-y.md), [web](https://a.example/b.md) "
        "and [here](#local).\n\n```mermaid\nflowchart LR\n  A --> B\n```\n\n```python\nx = 1\n```\n"
    )

    assert linked_chapter_files(body) == {"05-x.md", "06-y.md"}
    assert mermaid_diagrams(body) == ["flowchart LR\n  A --> B\n"]


# --- The course as a whole ------------------------------------------------------------


def test_it_has_exactly_the_twelve_chapters_of_the_outline() -> None:
    files = [path.name for path in chapter_files(CONTENT_DIR)]

    assert files == CHAPTER_FILES


def test_it_numbers_the_chapters_1_to_12_in_the_outlines_order() -> None:
    chapters, _problems = course()
    numbered = sorted(chapters.values(), key=lambda c: c.number)

    assert [(c.number, c.path.name) for c in numbered] == list(OUTLINE)


# --- Each chapter -----------------------------------------------------------------------


@per_chapter
def test_it_parses_with_no_problems(name: str) -> None:
    _chapters, problems = course()

    assert [str(p) for p in problems if p.path.name == name] == []
    chapter(name)


@per_chapter
def test_it_has_a_quiz_of_at_least_five_explained_questions(name: str) -> None:
    quiz = chapter(name).quiz

    assert len(quiz) >= MIN_QUESTIONS, f"{name} has {len(quiz)} quiz questions"
    unexplained = [
        f"{question['id']}/{option['id']}"
        for question in quiz
        for option in question["options"]
        if not option["explain"].strip()
    ]
    assert unexplained == []


@per_chapter
def test_it_declares_a_sandbox_pattern(name: str) -> None:
    sandbox = chapter(name).sandbox

    assert content.SLUG_RE.match(sandbox), sandbox


@per_chapter
def test_it_has_a_mermaid_diagram(name: str) -> None:
    diagrams = mermaid_diagrams(chapter(name).body)

    assert diagrams, f"{name} has no ```mermaid block"
    assert all(diagram.strip() for diagram in diagrams)


@per_chapter
def test_its_body_is_1500_to_3500_words(name: str) -> None:
    words = body_word_count(chapter(name).body)

    assert MIN_WORDS <= words <= MAX_WORDS, f"{name} has {words} body words"


@per_chapter
def test_its_links_to_chapters_and_anchors_resolve(name: str) -> None:
    _chapters, problems = course()
    broken = [
        str(p) for p in problems if p.path.name == name and p.message.startswith(LINK_PROBLEM)
    ]

    assert broken == []
    chapter(name)  # a chapter that did not load had its links left unchecked


# --- Links between chapters ------------------------------------------------------------


def test_the_link_checker_catches_a_broken_link_and_anchor(tmp_path: Path) -> None:
    """Guards the test above: on a copy of the real course, a link to a missing chapter
    and one to a missing heading are both reported."""
    folder = tmp_path / "content"
    shutil.copytree(CONTENT_DIR, folder)
    path = folder / FILE_BY_NUMBER[11]
    target = FILE_BY_NUMBER[5]
    path.write_text(
        path.read_text(encoding="utf-8")
        + f"\nSee [nowhere](99-nowhere.md) and [no part]({target}#no-such-heading).\n",
        encoding="utf-8",
    )

    _chapters, problems = load_content(folder)

    messages = [p.message for p in problems if p.path == path]
    assert content.BROKEN_LINK.format(target="99-nowhere.md") in messages
    assert (
        content.BROKEN_ANCHOR.format(
            target=f"{target}#no-such-heading", file=target, anchor="no-such-heading"
        )
        in messages
    )
    assert all(message.startswith(LINK_PROBLEM) for message in messages if "99-" in message)


@pytest.mark.parametrize(
    ("source", "target", "topic"),
    REQUIRED_LINKS,
    ids=[f"{source}-to-{target}" for source, target, _topic in REQUIRED_LINKS],
)
def test_it_links_chapters_where_their_patterns_meet(source: int, target: int, topic: str) -> None:
    links = linked_chapter_files(chapter(FILE_BY_NUMBER[source]).body)

    assert FILE_BY_NUMBER[target] in links, (
        f"chapter {source} should link to chapter {target} ({topic}); it links to {sorted(links)}"
    )


def test_the_conclusion_links_to_most_of_the_course() -> None:
    links = linked_chapter_files(chapter(FILE_BY_NUMBER[12]).body)
    others = {name for number, name in OUTLINE if number != 12}

    assert len(links & others) >= MIN_CHAPTERS_LINKED_FROM_CONCLUSION, sorted(links)
