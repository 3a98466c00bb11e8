"""The progress matrix's cells, rendered in Python: a class of 200 has 2,400 of them, and
the template language's per-tag cost (then Django's lazy-aware ``format_html``) made
them most of the dashboard's server time. Plain f-strings with every text escaped by the
standard library's ``html.escape``. The markup is the one the dashboard documents."""

from __future__ import annotations

from html import escape

from django import template
from django.utils.dateformat import format as date_format
from django.utils.safestring import SafeString, mark_safe

from apps.accounts.models import User
from apps.classrooms.selectors import Cell

register = template.Library()


@register.simple_tag
def matrix_cells(learner: User, cells: list[Cell]) -> SafeString:
    username = escape(learner.username)
    return mark_safe("".join(_cell(username, cell) for cell in cells))  # noqa: S308 (escaped)


def _cell(username: str, cell: Cell) -> str:
    """One cell; ``username`` is escaped already, every other text is escaped here."""
    testid = f"cell-{username}-{cell.chapter.number}"
    if cell.empty:
        return (
            f'<td class="matrix-cell is-empty" data-testid="{testid}" title="Nothing yet">'
            '<span class="m-read">·</span></td>'
        )
    classes = "matrix-cell" + (" is-read" if cell.read else "") + (" is-late" if cell.late else "")
    read_title = "Read" if cell.read else "Not read"
    if cell.due_at:
        read_title += f"; due {date_format(cell.due_at, 'M j H:i')}"
    mark = "✓" if cell.read else "late" if cell.late else "·"
    attempts = f"{cell.attempts} attempt{'' if cell.attempts == 1 else 's'}"
    no_quiz = "\u2013"  # an en dash
    quiz = f"{cell.best_score}/{cell.quiz_points}" if cell.best_score is not None else no_quiz
    parts = [
        f'<td class="{classes}" data-testid="{testid}">',
        f'<span class="m-read" title="{escape(read_title)}">{mark}</span>',
        f'<span class="m-quiz" title="Quiz best ({attempts})">{quiz}</span>',
    ]
    available = cell.experiments.available
    if available:
        passed = cell.experiments_passed
        has = " has-passed" if passed else ""
        parts.append(
            f'<span class="m-exp{has}" title="Experiments passed of available">'
            f"⚗ {passed}/{available}</span>"
        )
    if cell.sandbox:
        state, left = escape(str(cell.sandbox.state)), cell.minutes_left
        parts.append(
            f'<span class="m-box" title="Sandbox {state}, {left} min left">● {state} {left}m</span>'
        )
    parts.append("</td>")
    return "".join(parts)
