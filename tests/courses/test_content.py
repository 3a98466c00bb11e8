"""The course pipeline: loading and validating chapter files, rendering Markdown.

No database: these are pure functions over files in ``tmp_path`` and strings.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from apps.courses import content
from apps.courses.content import (
    ChapterSource,
    Problem,
    TocEntry,
    file_hash,
    load_chapter,
    load_content,
    render_inline,
    render_markdown,
)

# Line numbers of this file are referred to by the tests below.
VALID = """\
---
slug: first-chapter
number: 1
title: First chapter
summary: >
  What the learner will understand.
sandbox: replicated-lb
minutes: 45
objectives:
  - Explain replicas
quiz:
  - id: q1
    question: Which *one*?
    answer: b
    options:
      - id: a
        text: A
        explain: Wrong.
      - id: b
        text: B
        explain: Right.
---
# First chapter

Body.
"""
# slug 2, number 3, title 4, summary 5, sandbox 7, minutes 8, objectives 9 (item 10),
# quiz 11, question id 12, question 13, answer 14, options 15, option a id 16, text 17,
# explain 18, option b id 19, text 20, explain 21; closing --- 22; body starts on 23.


def write(directory: Path, name: str, text: str | bytes) -> Path:
    path = directory / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def chapter_text(*, slug: str, number: int, body: str = "# Title\n", quiz: str = "[]") -> str:
    return (
        f"---\nslug: {slug}\nnumber: {number}\ntitle: T\nsummary: S\nsandbox: lb\n"
        f"minutes: 10\nobjectives: [Learn]\nquiz: {quiz}\n---\n{body}"
    )


CHAPTER_BODY_LINE = 11  # the first body line of a file made by chapter_text()


def load_one(tmp_path: Path, text: str | bytes) -> tuple[ChapterSource | None, list[Problem]]:
    return load_chapter(write(tmp_path, "01-x.md", text))


def only_problem(problems: list[Problem]) -> tuple[int, str]:
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0].line, problems[0].message


def lines_and_messages(problems: list[Problem]) -> list[tuple[int, str]]:
    return [(p.line, p.message) for p in problems]


# --- load_chapter -------------------------------------------------------------------


def test_it_loads_a_valid_chapter(tmp_path: Path) -> None:
    path = write(tmp_path, "01-first-chapter.md", VALID)

    chapter, problems = load_chapter(path)

    assert problems == []
    assert chapter == ChapterSource(
        path=path,
        slug="first-chapter",
        number=1,
        title="First chapter",
        summary="What the learner will understand.",
        sandbox="replicated-lb",
        minutes=45,
        objectives=("Explain replicas",),
        quiz=(
            {
                "id": "q1",
                "question": "Which *one*?",
                "answers": ["b"],
                "multiple": False,
                "options": [
                    {"id": "a", "text": "A", "explain": "Wrong."},
                    {"id": "b", "text": "B", "explain": "Right."},
                ],
            },
        ),
        body="# First chapter\n\nBody.\n",
        body_line=23,
        source_hash=file_hash(VALID.encode()),
    )


def test_it_marks_a_list_answer_as_multiple(tmp_path: Path) -> None:
    chapter, problems = load_one(tmp_path, VALID.replace("answer: b", "answer: [b]"))

    assert problems == []
    assert chapter is not None
    assert chapter.quiz[0]["answers"] == ["b"]
    assert chapter.quiz[0]["multiple"] is True


def test_it_accepts_an_empty_quiz(tmp_path: Path) -> None:
    chapter, problems = load_one(tmp_path, chapter_text(slug="x", number=1))

    assert problems == []
    assert chapter is not None
    assert chapter.quiz == ()
    assert chapter.body_line == CHAPTER_BODY_LINE


def test_it_reports_a_file_without_front_matter(tmp_path: Path) -> None:
    chapter, problems = load_one(tmp_path, "# Title\n\nNo front matter.\n")

    assert chapter is None
    assert only_problem(problems) == (1, content.NO_FRONT_MATTER)
    assert problems[0].fatal


def test_it_reports_front_matter_that_is_never_closed(tmp_path: Path) -> None:
    chapter, problems = load_one(tmp_path, "---\nslug: x\n# Title\n")

    assert chapter is None
    assert only_problem(problems) == (1, content.UNCLOSED_FRONT_MATTER)


def test_it_reports_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    data = VALID.replace("Body.", "Caf\xe9.").encode("latin-1")

    chapter, problems = load_one(tmp_path, data)

    assert chapter is None
    assert only_problem(problems) == (25, content.NOT_UTF8.format(byte=0xE9))
    assert problems[0].fatal


def test_it_reports_bad_yaml_at_the_line_of_the_error(tmp_path: Path) -> None:
    chapter, problems = load_one(tmp_path, VALID.replace("minutes: 45", "minutes: [45"))

    assert chapter is None
    assert len(problems) == 1
    assert problems[0].message.startswith("the front matter is not valid YAML: ")
    assert problems[0].line == 9  # where the parser notices the unclosed list
    assert problems[0].fatal


def test_it_reports_front_matter_that_is_not_a_mapping(tmp_path: Path) -> None:
    chapter, problems = load_one(tmp_path, "---\n- a\n- b\n---\n# T\n")

    assert chapter is None
    assert only_problem(problems) == (2, content.FRONT_MATTER_NOT_MAPPING.format(actual="a list"))


def test_it_reports_an_unknown_key_at_its_line_with_a_suggestion(tmp_path: Path) -> None:
    text = VALID.replace("minutes: 45\n", "minutes: 45\ntitel: Oops\n")

    chapter, problems = load_one(tmp_path, text)

    assert chapter is None
    assert only_problem(problems) == (
        9,
        content.UNKNOWN_KEY.format(
            where="", key="titel", hint=content.UNKNOWN_KEY_HINT.format(suggestion="title")
        ),
    )


def test_it_reports_a_missing_key_at_line_1(tmp_path: Path) -> None:
    chapter, problems = load_one(tmp_path, VALID.replace("sandbox: replicated-lb\n", ""))

    assert chapter is None
    assert only_problem(problems) == (1, content.MISSING_KEY.format(where="", key="sandbox"))


def test_it_reports_a_key_given_twice(tmp_path: Path) -> None:
    text = VALID.replace("minutes: 45\n", "minutes: 45\nminutes: 50\n")

    chapter, problems = load_one(tmp_path, text)

    assert chapter is None
    assert only_problem(problems) == (
        9,
        content.DUPLICATE_KEY.format(where="", key="minutes", first=8),
    )


@pytest.mark.parametrize(
    ("old", "new", "line", "message"),
    [
        (
            "slug: first-chapter",
            "slug: First_Chapter",
            2,
            content.BAD_SLUG.format(key="slug", value="First_Chapter"),
        ),
        (
            "slug: first-chapter",
            "slug: first--chapter",
            2,
            content.BAD_SLUG.format(key="slug", value="first--chapter"),
        ),
        (
            "sandbox: replicated-lb",
            "sandbox: Replicated LB",
            7,
            content.BAD_SLUG.format(key="sandbox", value="Replicated LB"),
        ),
        (
            "number: 1",
            "number: one",
            3,
            content.WRONG_TYPE.format(
                where="", key="number", expected="an integer", actual="a string"
            ),
        ),
        (
            "number: 1",
            "number: true",
            3,
            content.WRONG_TYPE.format(
                where="", key="number", expected="an integer", actual="a boolean"
            ),
        ),
        ("number: 1", "number: 0", 3, content.NUMBER_TOO_SMALL.format(value=0)),
        ("minutes: 45", "minutes: 601", 8, content.MINUTES_OUT_OF_RANGE.format(value=601)),
        ("minutes: 45", "minutes: 0", 8, content.MINUTES_OUT_OF_RANGE.format(value=0)),
        (
            "title: First chapter",
            "title: " + "x" * 121,
            4,
            content.TOO_LONG.format(where="", key="title", limit=120, length=121),
        ),
        (
            "  What the learner will understand.",
            "  " + "x" * 401,
            5,
            content.TOO_LONG.format(where="", key="summary", limit=400, length=401),
        ),
        (
            "title: First chapter",
            "title: 2024",
            4,
            content.WRONG_TYPE.format(
                where="", key="title", expected="a string", actual="an integer"
            ),
        ),
        (
            "title: First chapter",
            'title: "  "',
            4,
            content.EMPTY_VALUE.format(where="", key="title"),
        ),
        (
            "  - Explain replicas",
            "  - 12",
            10,
            content.OBJECTIVE_NOT_STRING.format(n=1, actual="an integer"),
        ),
        ("objectives:\n  - Explain replicas", "objectives: []", 9, content.NO_OBJECTIVES),
        (
            "objectives:\n  - Explain replicas",
            "objectives: Explain replicas",
            9,
            content.WRONG_TYPE.format(
                where="", key="objectives", expected="a list", actual="a string"
            ),
        ),
    ],
)
def test_it_reports_an_invalid_value_at_its_line(
    tmp_path: Path, old: str, new: str, line: int, message: str
) -> None:
    assert old in VALID

    chapter, problems = load_one(tmp_path, VALID.replace(old, new))

    assert chapter is None
    assert only_problem(problems) == (line, message)
    assert problems[0].fatal


def test_it_reports_an_answer_that_is_not_an_option(tmp_path: Path) -> None:
    chapter, problems = load_one(tmp_path, VALID.replace("answer: b", "answer: e"))

    assert chapter is None
    assert only_problem(problems) == (
        14,
        "quiz question 'q1': answer 'e' is not one of its options (a, b)",
    )


def test_it_reports_a_wrong_answer_in_a_list_at_the_items_line(tmp_path: Path) -> None:
    text = VALID.replace("answer: b", "answer:\n      - b\n      - z")

    chapter, problems = load_one(tmp_path, text)

    assert chapter is None
    assert only_problem(problems) == (
        16,
        content.ANSWER_NOT_OPTION.format(where="quiz question 'q1': ", answer="z", options="a, b"),
    )


def test_it_reports_an_empty_answer_list(tmp_path: Path) -> None:
    chapter, problems = load_one(tmp_path, VALID.replace("answer: b", "answer: []"))

    assert chapter is None
    assert only_problem(problems) == (14, content.NO_ANSWER.format(where="quiz question 'q1': "))


def test_it_reports_a_question_with_one_option(tmp_path: Path) -> None:
    text = VALID.replace("      - id: b\n        text: B\n        explain: Right.\n", "").replace(
        "answer: b", "answer: a"
    )

    chapter, problems = load_one(tmp_path, text)

    assert chapter is None
    assert only_problem(problems) == (
        15,
        content.TOO_FEW_OPTIONS.format(where="quiz question 'q1': ", count=1),
    )


def test_it_reports_an_option_without_explain(tmp_path: Path) -> None:
    chapter, problems = load_one(tmp_path, VALID.replace("        explain: Wrong.\n", ""))

    assert chapter is None
    assert only_problem(problems) == (
        16,
        content.MISSING_KEY.format(where="quiz question 'q1', option 'a': ", key="explain"),
    )


def test_it_reports_a_duplicate_option_id(tmp_path: Path) -> None:
    chapter, problems = load_one(tmp_path, VALID.replace("      - id: b", "      - id: a"))

    assert chapter is None
    # answers are checked only once the options are valid, so 'b' is not reported too
    assert only_problem(problems) == (
        19,
        content.DUPLICATE_OPTION_ID.format(where="quiz question 'q1': ", id="a", first=16),
    )


def test_it_reports_a_duplicate_question_id(tmp_path: Path) -> None:
    question = VALID[VALID.index("  - id: q1") : VALID.index("---\n# First")]
    text = VALID.replace("---\n# First", question + "---\n# First")

    chapter, problems = load_one(tmp_path, text)

    assert chapter is None
    assert only_problem(problems) == (
        22,
        content.DUPLICATE_QUESTION_ID.format(id="q1", first=12),
    )


def test_it_reports_unknown_and_missing_keys_in_a_question(tmp_path: Path) -> None:
    text = VALID.replace("    question: Which *one*?", "    questoin: Which *one*?")

    chapter, problems = load_one(tmp_path, text)

    assert chapter is None
    assert lines_and_messages(problems) == [
        (
            13,
            content.UNKNOWN_KEY.format(
                where="quiz question 'q1': ",
                key="questoin",
                hint=content.UNKNOWN_KEY_HINT.format(suggestion="question"),
            ),
        ),
        (12, content.MISSING_KEY.format(where="quiz question 'q1': ", key="question")),
    ]


def test_it_reports_a_question_that_is_not_a_mapping(tmp_path: Path) -> None:
    chapter, problems = load_one(tmp_path, chapter_text(slug="x", number=1, quiz="[oops]"))

    assert chapter is None
    assert only_problem(problems) == (
        9,
        content.QUESTION_NOT_MAPPING.format(n=1, actual="a string"),
    )


# --- load_content -------------------------------------------------------------------


def test_it_loads_a_folder_sorted_by_number_and_skips_the_readme(tmp_path: Path) -> None:
    write(tmp_path, "README.md", "# Not a chapter\n")
    write(tmp_path, "01-b.md", chapter_text(slug="b", number=2))
    write(tmp_path, "02-a.md", chapter_text(slug="a", number=1))

    chapters, problems = load_content(tmp_path)

    assert problems == []
    assert [c.slug for c in chapters] == ["a", "b"]


def test_it_drops_a_chapter_with_a_fatal_problem_and_keeps_the_others(tmp_path: Path) -> None:
    write(tmp_path, "01-a.md", chapter_text(slug="a", number=1))
    broken = write(tmp_path, "02-b.md", "no front matter\n")

    chapters, problems = load_content(tmp_path)

    assert [c.slug for c in chapters] == ["a"]
    assert problems == [Problem(broken, 1, content.NO_FRONT_MATTER)]


def test_it_reports_a_duplicate_slug_in_each_file_and_drops_both(tmp_path: Path) -> None:
    first = write(tmp_path, "01-a.md", chapter_text(slug="same", number=1))
    second = write(tmp_path, "02-b.md", chapter_text(slug="same", number=2))
    write(tmp_path, "03-c.md", chapter_text(slug="other", number=3))

    chapters, problems = load_content(tmp_path)

    assert [c.slug for c in chapters] == ["other"]
    assert problems == [
        Problem(first, 2, content.DUPLICATE_SLUG.format(value="same", others="02-b.md")),
        Problem(second, 2, content.DUPLICATE_SLUG.format(value="same", others="01-a.md")),
    ]
    assert all(p.fatal for p in problems)
    assert str(problems[0]) == f"{first}:2: slug 'same' is also used by 02-b.md"


def test_it_reports_a_duplicate_number_in_each_file_and_drops_both(tmp_path: Path) -> None:
    first = write(tmp_path, "01-a.md", chapter_text(slug="a", number=4))
    second = write(tmp_path, "02-b.md", chapter_text(slug="b", number=4))

    chapters, problems = load_content(tmp_path)

    assert chapters == []
    assert problems == [
        Problem(first, 3, content.DUPLICATE_NUMBER.format(value=4, others="02-b.md")),
        Problem(second, 3, content.DUPLICATE_NUMBER.format(value=4, others="01-a.md")),
    ]


def test_it_reports_broken_links_and_anchors_at_their_lines(tmp_path: Path) -> None:
    write(
        tmp_path,
        "02-target.md",
        chapter_text(slug="target", number=2, body="# T\n\n## Real part\n"),
    )
    body = (
        "# Source\n"  # line 11
        "\n"
        "Fine: [ok](02-target.md), [ok](./02-target.md#real-part), [ok](#source).\n"  # 13
        "Broken: [file](03-missing.md) and\n"  # 14
        "[anchor](02-target.md#no-such-part).\n"  # 15
        "\n"
        "- a list item with [a local anchor](#nowhere)\n"  # 17
        "- [external](https://example.com/x.md) is not checked\n"
    )
    source = write(tmp_path, "01-source.md", chapter_text(slug="source", number=1, body=body))

    chapters, problems = load_content(tmp_path)

    assert [c.slug for c in chapters] == ["source", "target"]  # broken links are not fatal
    assert problems == [
        Problem(source, 14, content.BROKEN_LINK.format(target="03-missing.md"), fatal=False),
        Problem(
            source,
            15,
            content.BROKEN_ANCHOR.format(
                target="02-target.md#no-such-part", file="02-target.md", anchor="no-such-part"
            ),
            fatal=False,
        ),
        Problem(source, 17, content.BROKEN_LOCAL_ANCHOR.format(anchor="nowhere"), fatal=False),
    ]


def test_it_reports_broken_links_in_quiz_texts(tmp_path: Path) -> None:
    text = VALID.replace("explain: Right.", "explain: See [this](09-gone.md).")
    path = write(tmp_path, "01-first-chapter.md", text)

    chapters, problems = load_content(tmp_path)

    assert len(chapters) == 1
    assert problems == [
        Problem(path, 21, content.BROKEN_LINK.format(target="09-gone.md"), fatal=False)
    ]


def test_it_reports_raw_html_the_sanitizer_would_change(tmp_path: Path) -> None:
    body = (
        "# Title\n"  # 11
        "\n"
        "Press <kbd>Ctrl</kbd> and <sup>2</sup>: allowed, not reported.\n"  # 13
        "\n"
        "<div>\n"  # 15
        "<script>alert(1)</script>\n"  # 16
        "</div>\n"
        "\n"
        "A paragraph\n"  # 19
        'with <img src="x.png" onerror="alert(1)"> inline.\n'  # 20
        "\n"
        '<a href="javascript:alert(1)">click</a>\n'  # 22
        "\n"
        "<!-- a comment for authors is not reported -->\n"
    )
    path = write(tmp_path, "01-x.md", chapter_text(slug="x", number=1, body=body))

    chapters, problems = load_content(tmp_path)

    assert len(chapters) == 1  # not fatal
    assert problems == [
        Problem(path, 16, content.RAW_HTML_CHANGED.format(html="<script>"), fatal=False),
        Problem(
            path,
            20,
            content.RAW_HTML_CHANGED.format(html='<img src="x.png" onerror="alert(1)">'),
            fatal=False,
        ),
        Problem(
            path,
            22,
            content.RAW_HTML_CHANGED.format(html='<a href="javascript:alert(1)">'),
            fatal=False,
        ),
    ]
    assert str(problems[0]).endswith(":16: raw HTML would be changed by the sanitizer: <script>")


def test_it_reports_raw_html_in_quiz_texts(tmp_path: Path) -> None:
    text = VALID.replace("text: B", "text: B <script>alert(1)</script>")
    path = write(tmp_path, "01-first-chapter.md", text)

    _chapters, problems = load_content(tmp_path)

    assert problems == [
        Problem(path, 20, content.RAW_HTML_CHANGED.format(html="<script>"), fatal=False)
    ]


def test_it_shortens_long_html_in_the_report(tmp_path: Path) -> None:
    body = f'# T\n\n<p onclick="{"x" * 100}">hi</p>\n'
    write(tmp_path, "01-x.md", chapter_text(slug="x", number=1, body=body))

    _chapters, problems = load_content(tmp_path)

    (problem,) = problems
    assert problem.line == 13
    assert problem.message.endswith("…")
    assert len(problem.message) == len(content.RAW_HTML_CHANGED.format(html="")) + 60


# --- render_markdown ----------------------------------------------------------------


def render(text: str, chapter_urls: dict[str, str] | None = None) -> str:
    return render_markdown(text, chapter_urls=chapter_urls or {}).html


def test_it_removes_script_tags_and_their_content() -> None:
    html = render("Hello\n\n<script>alert('x')</script>\n\nand <script>alert(2)</script> inline")

    assert "<script" not in html
    assert "alert" not in html
    assert "Hello" in html


def test_it_removes_event_handler_attributes() -> None:
    html = render('<img src="a.png" onerror="alert(1)">\n\n<p onclick="alert(2)">x</p>')

    assert "onerror" not in html
    assert "onclick" not in html
    assert '<img src="a.png">' in html


def test_it_removes_javascript_links() -> None:
    html = render(
        '[md link](javascript:alert(1)) <a href="javascript:alert(2)">raw</a> '
        '<a href="JaVaScRiPt:alert(3)">mixed case</a> [data](data:text/html,x)'
    )

    assert 'href="javascript' not in html.lower()
    assert 'href="data:' not in html
    assert "<a>raw</a>" in html


def test_it_sanitizes_quiz_inline_text() -> None:
    html = render_inline(
        'Pick <script>alert(1)</script><img src=x onerror="alert(2)"> '
        '<a href="javascript:alert(3)">this</a> *one*',
        chapter_urls={},
    )

    assert "script" not in html
    assert "onerror" not in html
    assert "javascript" not in html
    assert html == 'Pick <img src="x"> <a>this</a> <em>one</em>'


def test_it_renders_inline_markdown_without_a_paragraph() -> None:
    html = render_inline(
        "Use `GET /health` and see [discovery](06-sd.md#client-side)",
        chapter_urls={"06-sd.md": "/chapters/sd/"},
    )

    assert html == (
        'Use <code>GET /health</code> and see <a href="/chapters/sd/#client-side">discovery</a>'
    )


def test_it_adds_unique_heading_anchors_and_a_toc_of_levels_2_and_3() -> None:
    rendered = render_markdown(
        "# Chapter\n\n## Health checks\n\n### Why `GET /health`?\n\n#### Deep\n\n"
        "## Health checks\n",
        chapter_urls={},
    )

    assert '<h1 id="chapter">Chapter</h1>' in rendered.html
    assert '<h2 id="health-checks">Health checks</h2>' in rendered.html
    assert '<h3 id="why-get-health">Why <code>GET /health</code>?</h3>' in rendered.html
    assert '<h4 id="deep">Deep</h4>' in rendered.html
    assert '<h2 id="health-checks-1">Health checks</h2>' in rendered.html
    assert rendered.toc == (
        TocEntry(level=2, anchor="health-checks", text="Health checks"),
        TocEntry(level=3, anchor="why-get-health", text="Why GET /health?"),
        TocEntry(level=2, anchor="health-checks-1", text="Health checks"),
    )


@pytest.mark.parametrize(
    ("kind", "title"), [("note", "Note"), ("warning", "Warning"), ("try-it", "Try it")]
)
def test_it_renders_callouts_with_a_default_title(kind: str, title: str) -> None:
    html = render(f"::: {kind}\nSome *text*.\n:::\n")

    assert html == (
        f'<aside class="callout callout-{kind}" role="note">\n'
        f'<p class="callout-title">{title}</p>\n'
        "<p>Some <em>text</em>.</p>\n"
        "</aside>\n"
    )


def test_it_renders_a_callout_with_its_own_title_escaped() -> None:
    html = render("::: warning Round robin is <not> fair\nBody.\n:::\n")

    assert html.startswith(
        '<aside class="callout callout-warning" role="note">\n'
        '<p class="callout-title">Round robin is &lt;not&gt; fair</p>\n'
    )


def test_it_leaves_an_unknown_callout_kind_as_text() -> None:
    html = render("::: danger\nBody.\n:::\n")

    assert "<aside" not in html
    assert "::: danger" in html


def test_it_highlights_fenced_code_with_pygments_classes() -> None:
    html = render('```python\ndef f():\n    return "<b>"\n```\n')

    assert html.startswith('<div class="highlight"><pre>')
    assert '<span class="k">def</span>' in html
    assert '<span class="nf">f</span>' in html
    assert "&lt;b&gt;" in html
    assert "style=" not in html


def test_it_renders_unknown_languages_as_plain_escaped_code() -> None:
    html = render("```nosuchlanguage\n<b>x</b>\n```\n\n```\nplain & simple\n```\n")

    assert html == (
        "<pre><code>&lt;b&gt;x&lt;/b&gt;\n</code></pre>\n"
        "<pre><code>plain &amp; simple\n</code></pre>\n"
    )


def test_it_keeps_mermaid_blocks_escaped_for_the_browser() -> None:
    html = render('```mermaid\ngraph LR\n  A["<script>"] --> B & C\n```\n')

    assert html == (
        '<pre class="mermaid">graph LR\n  A["&lt;script&gt;"] --&gt; B &amp; C\n</pre>\n'
    )


def test_it_wraps_tables_for_horizontal_scrolling() -> None:
    html = render("| a | b |\n| --: | --- |\n| 1 | 2 |\n")

    assert html.startswith('<div class="table-wrap">\n<table>\n')
    assert html.endswith("</table>\n</div>\n")
    assert '<th style="text-align:right">a</th>' in html


def test_it_renders_strikethrough() -> None:
    assert render("~~gone~~") == "<p><s>gone</s></p>\n"


def test_it_rewrites_links_to_chapters_keeping_the_anchor() -> None:
    urls = {"06-service-discovery.md": "/chapters/service-discovery/"}

    html = render(
        "[a](06-service-discovery.md) [b](./06-service-discovery.md#client-side-discovery) "
        "[c](07-unknown.md#x)",
        urls,
    )

    assert '<a href="/chapters/service-discovery/">a</a>' in html
    assert '<a href="/chapters/service-discovery/#client-side-discovery">b</a>' in html
    assert '<a href="07-unknown.md#x">c</a>' in html


def test_it_adds_rel_to_external_links_only() -> None:
    html = render(
        '[ext](https://example.com) [local](/chapters/x/) <a href="/y" rel="opener">y</a>'
    )

    assert '<a href="https://example.com" rel="noopener noreferrer">ext</a>' in html
    assert '<a href="/chapters/x/">local</a>' in html
    assert '<a href="/y">y</a>' in html


def test_it_keeps_images_with_safe_attributes() -> None:
    html = render('![A diagram](img/d.png "Title")')

    assert html == '<p><img src="img/d.png" alt="A diagram" title="Title"></p>\n'
