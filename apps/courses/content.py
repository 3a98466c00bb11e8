"""The course pipeline: read chapter files, validate them, render Markdown to safe HTML.

Pure functions over files and strings; nothing here touches the database. The format is
documented in ``content/README.md``.

Rendering decisions:

- Markdown is parsed by markdown-it-py (CommonMark + tables + strikethrough) with raw
  HTML *enabled*: raw HTML is passed through to the sanitizer (nh3) instead of being
  escaped, so harmless markup (``<kbd>``, ``<sup>``…) works and anything outside the
  allowlist below is removed. ``load_content`` reports every place where the sanitizer
  would change the author's HTML.
- Every rendered document goes through ``_CLEANER`` last; nothing skips it.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from html import escape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import nh3
import yaml
from markdown_it import MarkdownIt
from markdown_it.renderer import RendererHTML
from markdown_it.token import Token
from markdown_it.utils import EnvType, OptionsDict
from mdit_py_plugins.anchors import anchors_plugin
from mdit_py_plugins.container import container_plugin
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexer import Lexer
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound


@dataclass(frozen=True)
class Problem:
    """One problem in one content file, printed as ``path:line: message``."""

    path: Path
    line: int
    message: str
    fatal: bool = True  # fatal problems keep the chapter from being (re-)indexed

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass(frozen=True)
class ChapterSource:
    """A chapter file whose front matter and quiz are valid."""

    path: Path
    slug: str
    number: int
    title: str
    summary: str
    sandbox: str
    minutes: int
    objectives: tuple[str, ...]
    # Normalised quiz: [{"id", "question", "answers": [ids], "multiple": bool,
    #                    "options": [{"id", "text", "explain"}]}], texts still Markdown.
    quiz: tuple[dict[str, Any], ...]
    body: str  # the Markdown after the front matter
    body_line: int  # 1-based line number of the body's first line in the file
    source_hash: str  # sha256 of the whole file's bytes


@dataclass(frozen=True)
class TocEntry:
    level: int
    anchor: str
    text: str


@dataclass(frozen=True)
class Rendered:
    html: str
    toc: tuple[TocEntry, ...] = field(default_factory=tuple)


def file_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chapter_files(content_dir: Path) -> list[Path]:
    """The chapter files of a content folder: ``*.md`` except README.md, sorted by name."""
    return sorted(p for p in content_dir.glob("*.md") if p.name.lower() != "readme.md")


# --- Problem messages (tests reuse these) ---------------------------------------------
# ``{where}`` is "" for front matter keys, "quiz question 'q1': " inside a question and
# "quiz question 'q1', option 'a': " inside an option.

CANNOT_READ = "cannot read the file: {error}"
NOT_UTF8 = "the file is not UTF-8 text: byte 0x{byte:02x} cannot be decoded"
NO_FRONT_MATTER = "the file must start with front matter: a '---' line, YAML, then a '---' line"
UNCLOSED_FRONT_MATTER = "the front matter is not closed: no second '---' line"
BAD_YAML = "the front matter is not valid YAML: {error}"
FRONT_MATTER_NOT_MAPPING = "the front matter must be a mapping of keys to values, not {actual}"
DUPLICATE_KEY = "{where}key '{key}' appears twice (first on line {first})"
UNKNOWN_KEY = "{where}unknown key '{key}'{hint}"
UNKNOWN_KEY_HINT = " (did you mean '{suggestion}'?)"
MISSING_KEY = "{where}missing required key '{key}'"
WRONG_TYPE = "{where}'{key}' must be {expected}, not {actual}"
EMPTY_VALUE = "{where}'{key}' must not be empty"
TOO_LONG = "{where}'{key}' must be at most {limit} characters, not {length}"
BAD_SLUG = (
    "'{key}' must be lowercase letters, digits and single hyphens "
    "(like 'service-discovery'), not '{value}'"
)
NUMBER_TOO_SMALL = "'number' must be 1 or more, not {value}"
MINUTES_OUT_OF_RANGE = "'minutes' must be between 1 and 600, not {value}"
NO_OBJECTIVES = "'objectives' must list at least one objective"
OBJECTIVE_NOT_STRING = "objective {n} must be a non-empty string, not {actual}"
QUESTION_NOT_MAPPING = (
    "quiz question {n} must be a mapping with id, question, answer and options, not {actual}"
)
DUPLICATE_QUESTION_ID = "quiz question id '{id}' is used twice (first on line {first})"
OPTION_NOT_MAPPING = "{where}option {n} must be a mapping with id, text and explain, not {actual}"
TOO_FEW_OPTIONS = "{where}needs at least two options, has {count}"
DUPLICATE_OPTION_ID = "{where}option id '{id}' is used twice (first on line {first})"
ANSWER_NOT_OPTION = "{where}answer '{answer}' is not one of its options ({options})"
ANSWER_TWICE = "{where}answer '{answer}' is listed twice"
NO_ANSWER = "{where}'answer' must name at least one option"
DUPLICATE_SLUG = "slug '{value}' is also used by {others}"
DUPLICATE_NUMBER = "number {value} is also used by {others}"
BROKEN_LINK = "link to '{target}': no such chapter file"
BROKEN_ANCHOR = "link to '{target}': {file} has no heading with the anchor '#{anchor}'"
BROKEN_LOCAL_ANCHOR = "link to '#{anchor}': this chapter has no heading with that anchor"
RAW_HTML_CHANGED = "raw HTML would be changed by the sanitizer: {html}"

# --- Front matter rules -----------------------------------------------------------------

SLUG_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
TITLE_MAX = 120
SUMMARY_MAX = 400
MINUTES_MIN = 1
MINUTES_MAX = 600
FRONT_MATTER_KEYS = (
    "slug",
    "number",
    "title",
    "summary",
    "sandbox",
    "minutes",
    "objectives",
    "quiz",
)
QUESTION_KEYS = ("id", "question", "answer", "options")
OPTION_KEYS = ("id", "text", "explain")

_FENCE = "---"
_YAML_FIRST_LINE = 2  # the YAML always starts on the file's second line
_SNIPPET_MAX = 60


def _type_name(value: object) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


# --- YAML with line numbers -------------------------------------------------------------


class _LineDict(dict[Any, Any]):
    """A YAML mapping that knows the file line of itself and of each of its keys."""

    line: int
    key_lines: dict[str, int]


class _LineList(list[Any]):
    """A YAML sequence that knows the file line of itself and of each item."""

    line: int
    item_lines: list[int]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings and sequences record file line numbers (1-based)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        # (line, key, line of the first occurrence)
        self.duplicate_keys: list[tuple[int, str, int]] = []


def _file_line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + _YAML_FIRST_LINE


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> Iterator[_LineDict]:
    data = _LineDict()
    data.line = _file_line(node)
    data.key_lines = {}
    for key_node, _value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = str(key_node.value)
        line = _file_line(key_node)
        if key in data.key_lines:
            loader.duplicate_keys.append((line, key, data.key_lines[key]))
        else:
            data.key_lines[key] = line
    yield data
    data.update(loader.construct_mapping(node))


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> Iterator[_LineList]:
    data = _LineList()
    data.line = _file_line(node)
    data.item_lines = [_file_line(item) for item in node.value]
    yield data
    data.extend(loader.construct_sequence(node))


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def _key_line(mapping: Mapping[Any, Any], key: str) -> int:
    if isinstance(mapping, _LineDict):
        return mapping.key_lines.get(key, mapping.line)
    return 1


def _item_line(items: Sequence[Any], index: int, default: int) -> int:
    if isinstance(items, _LineList) and index < len(items.item_lines):
        return items.item_lines[index]
    return default


# --- Loading one chapter ----------------------------------------------------------------


@dataclass
class _Loaded:
    """What ``load_chapter`` returns plus the line numbers ``load_content`` needs."""

    chapter: ChapterSource | None
    problems: list[Problem]
    key_lines: dict[str, int] = field(default_factory=dict)
    # (line, inline Markdown) of each quiz question, option text and explanation
    quiz_texts: list[tuple[int, str]] = field(default_factory=list)


class _Checker:
    """Collects the problems of one file while validating its front matter."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[Problem] = []
        self.quiz_texts: list[tuple[int, str]] = []

    def error(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.path, line, message))

    def keys(
        self, mapping: _LineDict, allowed: Sequence[str], *, where: str, missing_line: int
    ) -> None:
        for key in mapping:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = UNKNOWN_KEY_HINT.format(suggestion=close[0]) if close else ""
                self.error(
                    _key_line(mapping, str(key)),
                    UNKNOWN_KEY.format(where=where, key=key, hint=hint),
                )
        for key in allowed:
            if key not in mapping:
                self.error(missing_line, MISSING_KEY.format(where=where, key=key))

    def string(
        self, mapping: _LineDict, key: str, *, where: str = "", limit: int | None = None
    ) -> str | None:
        """The stripped, non-empty string at ``key``, or None after reporting why not."""
        if key not in mapping:
            return None  # reported as missing
        value = mapping[key]
        line = _key_line(mapping, key)
        if not isinstance(value, str):
            actual = _type_name(value)
            self.error(
                line, WRONG_TYPE.format(where=where, key=key, expected="a string", actual=actual)
            )
            return None
        text = value.strip()
        if not text:
            self.error(line, EMPTY_VALUE.format(where=where, key=key))
            return None
        if limit is not None and len(text) > limit:
            self.error(line, TOO_LONG.format(where=where, key=key, limit=limit, length=len(text)))
            return None
        return text

    def slug(self, mapping: _LineDict, key: str) -> str | None:
        value = self.string(mapping, key)
        if value is not None and not SLUG_RE.match(value):
            self.error(_key_line(mapping, key), BAD_SLUG.format(key=key, value=value))
            return None
        return value

    def integer(self, mapping: _LineDict, key: str) -> int | None:
        if key not in mapping:
            return None
        value = mapping[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(
                _key_line(mapping, key),
                WRONG_TYPE.format(
                    where="", key=key, expected="an integer", actual=_type_name(value)
                ),
            )
            return None
        return value

    def objectives(self, mapping: _LineDict) -> tuple[str, ...] | None:
        if "objectives" not in mapping:
            return None
        value = mapping["objectives"]
        line = _key_line(mapping, "objectives")
        if not isinstance(value, list):
            self.error(
                line,
                WRONG_TYPE.format(
                    where="", key="objectives", expected="a list", actual=_type_name(value)
                ),
            )
            return None
        if not value:
            self.error(line, NO_OBJECTIVES)
            return None
        result: list[str] = []
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                actual = "empty" if isinstance(item, str) else _type_name(item)
                self.error(
                    _item_line(value, index, line),
                    OBJECTIVE_NOT_STRING.format(n=index + 1, actual=actual),
                )
            else:
                result.append(item.strip())
        return tuple(result) if len(result) == len(value) else None

    def quiz(self, mapping: _LineDict) -> tuple[dict[str, Any], ...] | None:
        if "quiz" not in mapping:
            return None
        value = mapping["quiz"]
        line = _key_line(mapping, "quiz")
        if not isinstance(value, list):
            self.error(
                line,
                WRONG_TYPE.format(
                    where="", key="quiz", expected="a list", actual=_type_name(value)
                ),
            )
            return None
        before = len(self.problems)
        questions: list[dict[str, Any]] = []
        seen_ids: dict[str, int] = {}
        for index, item in enumerate(value):
            item_line = _item_line(value, index, line)
            if not isinstance(item, _LineDict):
                self.error(
                    item_line, QUESTION_NOT_MAPPING.format(n=index + 1, actual=_type_name(item))
                )
                continue
            question = self.question(item, index, seen_ids)
            if question is not None:
                questions.append(question)
        if len(self.problems) > before:
            return None
        return tuple(questions)

    def question(
        self, item: _LineDict, index: int, seen_ids: dict[str, int]
    ) -> dict[str, Any] | None:
        before = len(self.problems)
        raw_id = item.get("id")
        label = (
            f"quiz question '{raw_id.strip()}'"
            if isinstance(raw_id, str) and raw_id.strip()
            else f"quiz question {index + 1}"
        )
        where = f"{label}: "
        self.keys(item, QUESTION_KEYS, where=where, missing_line=item.line)
        qid = self.string(item, "id", where=where)
        if qid is not None:
            id_line = _key_line(item, "id")
            if qid in seen_ids:
                self.error(id_line, DUPLICATE_QUESTION_ID.format(id=qid, first=seen_ids[qid]))
            else:
                seen_ids[qid] = id_line
        text = self.string(item, "question", where=where)
        if text is not None:
            self.quiz_texts.append((_key_line(item, "question"), text))
        options = self.options(item, label=label)
        answers, multiple = self.answers(item, options, where=where)
        if len(self.problems) > before or options is None or answers is None:
            return None
        return {
            "id": qid,
            "question": text,
            "answers": answers,
            "multiple": multiple,
            "options": options,
        }

    def options(self, item: _LineDict, *, label: str) -> list[dict[str, str]] | None:
        where = f"{label}: "
        if "options" not in item:
            return None
        value = item["options"]
        line = _key_line(item, "options")
        if not isinstance(value, list):
            self.error(
                line,
                WRONG_TYPE.format(
                    where=where, key="options", expected="a list", actual=_type_name(value)
                ),
            )
            return None
        if len(value) < 2:
            self.error(line, TOO_FEW_OPTIONS.format(where=where, count=len(value)))
        before = len(self.problems)
        options: list[dict[str, str]] = []
        seen: dict[str, int] = {}
        for index, option in enumerate(value):
            option_line = _item_line(value, index, line)
            if not isinstance(option, _LineDict):
                self.error(
                    option_line,
                    OPTION_NOT_MAPPING.format(where=where, n=index + 1, actual=_type_name(option)),
                )
                continue
            raw_id = option.get("id")
            option_where = (
                f"{label}, option '{raw_id.strip()}': "
                if isinstance(raw_id, str) and raw_id.strip()
                else f"{label}, option {index + 1}: "
            )
            self.keys(option, OPTION_KEYS, where=option_where, missing_line=option.line)
            oid = self.string(option, "id", where=option_where)
            if oid is not None:
                id_line = _key_line(option, "id")
                if oid in seen:
                    self.error(
                        id_line,
                        DUPLICATE_OPTION_ID.format(where=where, id=oid, first=seen[oid]),
                    )
                else:
                    seen[oid] = id_line
            text = self.string(option, "text", where=option_where)
            explain = self.string(option, "explain", where=option_where)
            for key, value_text in (("text", text), ("explain", explain)):
                if value_text is not None:
                    self.quiz_texts.append((_key_line(option, key), value_text))
            if oid is not None and text is not None and explain is not None:
                options.append({"id": oid, "text": text, "explain": explain})
        if len(self.problems) > before or len(value) < 2:
            return None
        return options

    def answers(
        self, item: _LineDict, options: list[dict[str, str]] | None, *, where: str
    ) -> tuple[list[str] | None, bool]:
        if "answer" not in item:
            return None, False
        value = item["answer"]
        line = _key_line(item, "answer")
        multiple = isinstance(value, list)
        raw: list[tuple[int, Any]]
        if isinstance(value, str):
            raw = [(line, value)]
        elif isinstance(value, list):
            if not value:
                self.error(line, NO_ANSWER.format(where=where))
                return None, multiple
            raw = [(_item_line(value, i, line), answer) for i, answer in enumerate(value)]
        else:
            self.error(
                line,
                WRONG_TYPE.format(
                    where=where,
                    key="answer",
                    expected="a string or a list of strings",
                    actual=_type_name(value),
                ),
            )
            return None, multiple
        before = len(self.problems)
        option_ids = [option["id"] for option in options] if options is not None else None
        answers: list[str] = []
        for answer_line, answer in raw:
            if not isinstance(answer, str) or not answer.strip():
                actual = "empty" if isinstance(answer, str) else _type_name(answer)
                self.error(
                    answer_line,
                    WRONG_TYPE.format(
                        where=where, key="answer", expected="an option id", actual=actual
                    ),
                )
                continue
            answer = answer.strip()
            if answer in answers:
                self.error(answer_line, ANSWER_TWICE.format(where=where, answer=answer))
            elif option_ids is not None and answer not in option_ids:
                self.error(
                    answer_line,
                    ANSWER_NOT_OPTION.format(
                        where=where, answer=answer, options=", ".join(option_ids)
                    ),
                )
            answers.append(answer)
        if len(self.problems) > before:
            return None, multiple
        return answers, multiple


def _split_front_matter(text: str) -> tuple[str, str, int] | str:
    """(yaml text, body, body line) or the message of a fatal problem at line 1."""
    lines = text.split("\n")
    if lines[0].rstrip() != _FENCE:
        return NO_FRONT_MATTER
    for index in range(1, len(lines)):
        if lines[index].rstrip() == _FENCE:
            yaml_text = "\n".join(lines[1:index])
            body = "\n".join(lines[index + 1 :])
            return yaml_text, body, index + 2
    return UNCLOSED_FRONT_MATTER


def _parse_yaml(yaml_text: str) -> tuple[Any, list[tuple[int, str, int]]]:
    loader = _LineLoader(yaml_text)
    try:
        return loader.get_single_data(), loader.duplicate_keys
    finally:
        loader.dispose()


def _yaml_error(path: Path, exc: yaml.YAMLError) -> Problem:
    line = 1
    detail = str(exc)
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        if mark is not None:
            line = int(mark.line) + _YAML_FIRST_LINE
        parts = [part for part in (exc.context, exc.problem) if part]
        detail = ": ".join(parts) if parts else detail
    return Problem(path, line, BAD_YAML.format(error=detail))


def _load(path: Path) -> _Loaded:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return _Loaded(None, [Problem(path, 1, CANNOT_READ.format(error=exc.strerror or exc))])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return _Loaded(None, [Problem(path, line, NOT_UTF8.format(byte=data[exc.start]))])
    text = text.removeprefix("\ufeff")

    split = _split_front_matter(text)
    if isinstance(split, str):
        return _Loaded(None, [Problem(path, 1, split)])
    yaml_text, body, body_line = split

    try:
        meta, duplicate_keys = _parse_yaml(yaml_text)
    except yaml.YAMLError as exc:
        return _Loaded(None, [_yaml_error(path, exc)])

    checker = _Checker(path)
    if meta is None:
        meta = _LineDict()
        meta.line = 1
        meta.key_lines = {}
    if not isinstance(meta, _LineDict):
        checker.error(_YAML_FIRST_LINE, FRONT_MATTER_NOT_MAPPING.format(actual=_type_name(meta)))
        return _Loaded(None, checker.problems)
    for line, key, first in duplicate_keys:
        checker.error(line, DUPLICATE_KEY.format(where="", key=key, first=first))

    checker.keys(meta, FRONT_MATTER_KEYS, where="", missing_line=1)
    slug = checker.slug(meta, "slug")
    number = checker.integer(meta, "number")
    if number is not None and number < 1:
        checker.error(_key_line(meta, "number"), NUMBER_TOO_SMALL.format(value=number))
    title = checker.string(meta, "title", limit=TITLE_MAX)
    summary = checker.string(meta, "summary", limit=SUMMARY_MAX)
    sandbox = checker.slug(meta, "sandbox")
    minutes = checker.integer(meta, "minutes")
    if minutes is not None and not MINUTES_MIN <= minutes <= MINUTES_MAX:
        checker.error(_key_line(meta, "minutes"), MINUTES_OUT_OF_RANGE.format(value=minutes))
    objectives = checker.objectives(meta)
    quiz = checker.quiz(meta)

    loaded = _Loaded(None, checker.problems, dict(meta.key_lines), checker.quiz_texts)
    if (
        checker.problems
        or slug is None
        or number is None
        or title is None
        or summary is None
        or sandbox is None
        or minutes is None
        or objectives is None
        or quiz is None
    ):
        return loaded
    loaded.chapter = ChapterSource(
        path=path,
        slug=slug,
        number=number,
        title=title,
        summary=summary,
        sandbox=sandbox,
        minutes=minutes,
        objectives=objectives,
        quiz=quiz,
        body=body,
        body_line=body_line,
        source_hash=file_hash(data),
    )
    return loaded


def load_chapter(path: Path) -> tuple[ChapterSource | None, list[Problem]]:
    """Parse and validate one file. Returns None with at least one fatal problem when the
    chapter cannot be indexed."""
    loaded = _load(path)
    return loaded.chapter, loaded.problems


# --- Markdown ---------------------------------------------------------------------------

CALLOUT_TITLES = {"note": "Note", "warning": "Warning", "try-it": "Try it"}
EXTERNAL_LINK_REL = "noopener noreferrer"
_EXTERNAL_RE = re.compile(r"^https?://", re.IGNORECASE)
# A link to a chapter file: "06-x.md", "./06-x.md", "06-x.md#anchor".
_CHAPTER_LINK_RE = re.compile(r"^(?:\./)?([^/?#:]+\.md)(?:#(.*))?$")
_HEADINGS = tuple(f"h{level}" for level in range(1, 7))
_TOC_LEVELS = (2, 3)
_FORMATTER = HtmlFormatter(cssclass="highlight", wrapcode=True)


def highlight_code(code: str, lexer: Lexer) -> str:
    """Code as highlighted HTML (Pygments escapes it), as chapters and the code page show it."""
    return str(highlight(code, lexer, _FORMATTER))


def _slugify(title: str) -> str:
    """A heading's anchor: 'Health checks' -> 'health-checks' (the plugin adds -1, -2…)."""
    slug = re.sub(r"[^\w\- ]", "", title.strip().lower())
    slug = re.sub(r"\s+", "-", slug).strip("-")
    return slug or "section"


@lru_cache(maxsize=64)
def _lexer(language: str) -> Lexer | None:
    if not language:
        return None
    try:
        return get_lexer_by_name(language)
    except ClassNotFound:
        return None


def _render_fence(
    self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
) -> str:
    token = tokens[idx]
    info = token.info.strip()
    language = info.split(maxsplit=1)[0].lower() if info else ""
    code = token.content
    if language == "mermaid":
        return f'<pre class="mermaid">{escape(code, quote=False)}</pre>\n'
    lexer = _lexer(language)
    if lexer is None:
        return f"<pre><code>{escape(code, quote=False)}</code></pre>\n"
    return highlight_code(code, lexer)


def _render_callout(
    self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
) -> str:
    token = tokens[idx]
    if token.nesting != 1:
        return "</aside>\n"
    kind, _, title = token.info.strip().partition(" ")
    title = title.strip() or CALLOUT_TITLES.get(kind, kind)
    return (
        f'<aside class="callout callout-{kind}" role="note">\n'
        f'<p class="callout-title">{escape(title)}</p>\n'
    )


def _render_table_open(
    self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
) -> str:
    return '<div class="table-wrap">\n' + self.renderToken(tokens, idx, options, env)


def _render_table_close(
    self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
) -> str:
    return self.renderToken(tokens, idx, options, env) + "</div>\n"


def _rewrite_href(href: str, chapter_urls: Mapping[str, str]) -> str:
    match = _CHAPTER_LINK_RE.match(href)
    if match is None or match[1] not in chapter_urls:
        return href
    url = chapter_urls[match[1]]
    return f"{url}#{match[2]}" if match[2] else url


def _render_link_open(
    self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
) -> str:
    token = tokens[idx]
    href = token.attrGet("href")
    if isinstance(href, str):
        href = _rewrite_href(href, env.get("chapter_urls") or {})
        token.attrSet("href", href)
        if _EXTERNAL_RE.match(href):
            token.attrSet("rel", EXTERNAL_LINK_REL)
    return self.renderToken(tokens, idx, options, env)


def _make_markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    md.use(anchors_plugin, min_level=1, max_level=6, slug_func=_slugify)
    for kind in CALLOUT_TITLES:
        md.use(container_plugin, name=kind, render=_render_callout)
    md.add_render_rule("fence", _render_fence)
    md.add_render_rule("table_open", _render_table_open)
    md.add_render_rule("table_close", _render_table_close)
    md.add_render_rule("link_open", _render_link_open)
    return md


_MD = _make_markdown()

# --- Sanitizer --------------------------------------------------------------------------

_SAFE_TAG_NAMES = (
    "a abbr aside b blockquote br caption cite code dd del details div dl dt em "
    "figcaption figure hr i img ins kbd li mark ol p pre q s samp small span strong "
    "sub summary sup table tbody td tfoot th thead tr ul var"
)
ALLOWED_TAGS = frozenset({*_HEADINGS, *_SAFE_TAG_NAMES.split()})
ALLOWED_ATTRIBUTES: dict[str, frozenset[str]] = {
    **{heading: frozenset({"id"}) for heading in _HEADINGS},
    "a": frozenset({"href", "title"}),
    "img": frozenset({"src", "alt", "title", "width", "height"}),
    "abbr": frozenset({"title"}),
    "aside": frozenset({"class"}),
    "code": frozenset({"class"}),
    "div": frozenset({"class"}),
    "p": frozenset({"class"}),
    "pre": frozenset({"class"}),
    "span": frozenset({"class"}),
    "ol": frozenset({"start"}),
    "th": frozenset({"style", "colspan", "rowspan"}),
    "td": frozenset({"style", "colspan", "rowspan"}),
}
# rel is ours (external links) and role is ours (callouts); other values are dropped.
ALLOWED_ATTRIBUTE_VALUES: dict[str, dict[str, frozenset[str]]] = {
    "a": {"rel": frozenset({EXTERNAL_LINK_REL})},
    "aside": {"role": frozenset({"note"})},
}
ALLOWED_URL_SCHEMES = frozenset({"http", "https", "mailto"})

_CLEANER = nh3.Cleaner(
    tags=set(ALLOWED_TAGS),
    clean_content_tags={"script", "style"},
    attributes={tag: set(attrs) for tag, attrs in ALLOWED_ATTRIBUTES.items()},
    strip_comments=True,
    link_rel=None,  # we set rel ourselves on external links; nh3 keeps only that value
    tag_attribute_values={
        tag: {attr: set(values) for attr, values in attrs.items()}
        for tag, attrs in ALLOWED_ATTRIBUTE_VALUES.items()
    },
    url_schemes=set(ALLOWED_URL_SCHEMES),
    url_relative="pass_through",
    filter_style_properties={"text-align"},  # table column alignment
)


def _sanitize(html: str) -> str:
    return _CLEANER.clean(html)


def _toc(tokens: Sequence[Token]) -> Iterator[TocEntry]:
    for index, token in enumerate(tokens):
        if token.type != "heading_open":
            continue
        level = int(token.tag[1])
        anchor = token.attrGet("id")
        if level in _TOC_LEVELS and isinstance(anchor, str):
            yield TocEntry(level=level, anchor=anchor, text=_heading_text(tokens[index + 1]))


def _heading_text(inline: Token) -> str:
    return "".join(
        child.content for child in inline.children or [] if child.type in ("text", "code_inline")
    ).strip()


def render_markdown(text: str, *, chapter_urls: Mapping[str, str]) -> Rendered:
    """Render a chapter body to sanitized HTML with heading anchors and a table of contents.

    ``chapter_urls`` maps a chapter's file name (``05-x.md``) to its page URL; links to
    those files are rewritten, keeping any ``#anchor``."""
    env: EnvType = {"chapter_urls": chapter_urls}
    tokens = _MD.parse(text, env)
    html = _MD.renderer.render(tokens, _MD.options, env)
    return Rendered(html=_sanitize(html), toc=tuple(_toc(tokens)))


def render_inline(text: str, *, chapter_urls: Mapping[str, str]) -> str:
    """Render one line of inline Markdown (quiz texts) to sanitized HTML, no ``<p>``."""
    env: EnvType = {"chapter_urls": chapter_urls}
    return _sanitize(_MD.renderInline(text, env))


# --- Checks across files ----------------------------------------------------------------


class _StartTags(HTMLParser):
    """The start tags of an HTML fragment: (tag, sorted attributes, line, source text)."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[tuple[str, tuple[tuple[str, str], ...]], int, str]] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        key = (tag, tuple(sorted((name, value or "") for name, value in attrs)))
        self.tags.append((key, self.getpos()[0], self.get_starttag_text() or f"<{tag}>"))


def _sanitizer_changes(html: str) -> tuple[int, str] | None:
    """(line within ``html``, tag) of the first start tag the sanitizer would drop or
    alter, or None when every tag survives as written. Comments and end tags are ignored."""
    original = _StartTags(html).tags
    if not original:
        return None
    cleaned = [key for key, _line, _text in _StartTags(_sanitize(html)).tags]
    position = 0
    for key, line, source in original:
        try:
            position = cleaned.index(key, position) + 1
        except ValueError:
            return line, source
    return None


def _snippet(html: str) -> str:
    html = " ".join(html.split())
    return html if len(html) <= _SNIPPET_MAX else html[: _SNIPPET_MAX - 1] + "…"


def _inline_items(children: Sequence[Token], line: int) -> Iterator[tuple[Token, int]]:
    """Each child token of an inline token with its file line."""
    for child in children:
        yield child, line
        if child.type in ("softbreak", "hardbreak"):
            line += 1
        else:
            line += child.content.count("\n")


def _body_items(tokens: Sequence[Token], body_line: int) -> Iterator[tuple[Token, int]]:
    """Block tokens and inline children of a body with their file lines."""
    last = body_line
    for token in tokens:
        if token.map is not None:
            last = body_line + token.map[0]
        if token.type == "inline" and token.children:
            yield from _inline_items(token.children, last)
        else:
            yield token, last


def _heading_anchors(tokens: Sequence[Token]) -> set[str]:
    return {
        str(token.attrGet("id"))
        for token in tokens
        if token.type == "heading_open" and token.attrGet("id")
    }


@dataclass
class _Checked:
    loaded: _Loaded
    chapter: ChapterSource
    tokens: list[Token]
    anchors: set[str]


def _check_items(
    checked: _Checked,
    items: Iterator[tuple[Token, int]],
    files: Mapping[str, set[str] | None],
) -> Iterator[Problem]:
    path = checked.chapter.path
    for token, line in items:
        if token.type in ("html_block", "html_inline"):
            change = _sanitizer_changes(token.content)
            if change is not None:
                offset, source = change
                yield Problem(
                    path,
                    line + offset - 1,
                    RAW_HTML_CHANGED.format(html=_snippet(source)),
                    fatal=False,
                )
        elif token.type == "link_open":
            href = token.attrGet("href")
            if isinstance(href, str):
                yield from _check_link(path, line, href, checked.anchors, files)


def _check_link(
    path: Path, line: int, href: str, own: set[str], files: Mapping[str, set[str] | None]
) -> Iterator[Problem]:
    if href.startswith("#"):
        anchor = unquote(href[1:])
        if anchor and anchor not in own:
            yield Problem(path, line, BROKEN_LOCAL_ANCHOR.format(anchor=anchor), fatal=False)
        return
    match = _CHAPTER_LINK_RE.match(href)
    if match is None:
        return
    name, anchor = match[1], unquote(match[2] or "")
    if name not in files:
        yield Problem(path, line, BROKEN_LINK.format(target=href), fatal=False)
        return
    anchors = files[name]
    if anchor and anchors is not None and anchor not in anchors:
        yield Problem(
            path,
            line,
            BROKEN_ANCHOR.format(target=href, file=name, anchor=anchor),
            fatal=False,
        )


def _duplicates(checked: list[_Checked], key: str, message: str) -> tuple[list[Problem], set[Path]]:
    groups: dict[Any, list[_Checked]] = {}
    for item in checked:
        groups.setdefault(getattr(item.chapter, key), []).append(item)
    problems: list[Problem] = []
    dropped: set[Path] = set()
    for value, group in groups.items():
        if len(group) < 2:
            continue
        for item in group:
            others = ", ".join(other.chapter.path.name for other in group if other is not item)
            problems.append(
                Problem(
                    item.chapter.path,
                    item.loaded.key_lines.get(key, 1),
                    message.format(value=value, others=others),
                )
            )
            dropped.add(item.chapter.path)
    return problems, dropped


def load_content(content_dir: Path) -> tuple[list[ChapterSource], list[Problem]]:
    """Load every chapter file and run the checks that span files (duplicate slugs and
    numbers, links between chapters, raw HTML the sanitizer strips). Chapters involved in a
    duplicate are dropped (fatal); the rest are returned sorted by number."""
    paths = chapter_files(content_dir)
    problems: list[Problem] = []
    checked: list[_Checked] = []
    for path in paths:
        loaded = _load(path)
        problems.extend(loaded.problems)
        if loaded.chapter is not None:
            tokens = _MD.parse(loaded.chapter.body, {})
            checked.append(_Checked(loaded, loaded.chapter, tokens, _heading_anchors(tokens)))

    # None: the file exists but did not load, so its anchors are unknown.
    anchors_by_file: dict[str, set[str] | None] = {path.name: None for path in paths}
    anchors_by_file.update({item.chapter.path.name: item.anchors for item in checked})

    for item in checked:
        problems.extend(
            _check_items(item, _body_items(item.tokens, item.chapter.body_line), anchors_by_file)
        )
        for line, text in item.loaded.quiz_texts:
            inline = _MD.parseInline(text, {})
            children = (inline[0].children or []) if inline else []
            problems.extend(_check_items(item, _inline_items(children, line), anchors_by_file))

    slug_problems, slug_dropped = _duplicates(checked, "slug", DUPLICATE_SLUG)
    number_problems, number_dropped = _duplicates(checked, "number", DUPLICATE_NUMBER)
    problems.extend(slug_problems + number_problems)
    dropped = slug_dropped | number_dropped

    chapters = sorted(
        (item.chapter for item in checked if item.chapter.path not in dropped),
        key=lambda chapter: chapter.number,
    )
    problems.sort(key=lambda problem: (str(problem.path), problem.line))
    return chapters, problems
