"""The live dashboard: ``/ws/classrooms/<id>/?chapter=&q=&sort=``.

Only the classroom's instructors (and staff) may open it (4404 for anyone else, as the
page answers 404). It sends no data of its own at connect: the page already shows the
matrix. Then, whenever learners' rows change (``live.py``), it waits ``FLUSH_S`` to gather
the burst, renders those rows with the page's chapter filter and sends them as htmx
out-of-band fragments that replace the rows in place (the page's order stays put while
the instructor reads it). A join or a leave re-renders the whole matrix with the page's
filter and sort. Every ``CHECK_EVERY_S`` at a send it checks again that the viewer is
signed in and still teaches the classroom. Limits and close codes: ``config.websocket``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.template.loader import render_to_string

from apps.classrooms import selectors
from apps.classrooms.live import group_name
from apps.classrooms.models import Classroom
from config.websocket import (
    CLOSE_NOT_FOUND,
    CLOSE_UNAUTHENTICATED,
    LiveStream,
    signed_in,
)

FLUSH_S = 0.3
CHECK_EVERY_S = 60.0
ROW = "classrooms/dashboard.html#row"
MATRIX = "classrooms/dashboard.html#matrix"


def view_of(query_string: bytes) -> dict[str, str]:
    """The page's filter and sort, as its socket's URL carries them."""
    params = parse_qs(query_string.decode("latin1"))

    def first(name: str) -> str:
        return (params.get(name) or [""])[0].strip()[:80]

    sort = first("sort")
    return {
        "chapter_slug": first("chapter"),
        "query": first("q"),
        "sort": sort if sort in selectors.SORTS else "name",
    }


@database_sync_to_async
def _classroom_for(user: Any, classroom_id: int) -> Classroom:
    return selectors.classroom_get_for_instructor(user=user, classroom_id=classroom_id)


@database_sync_to_async
def _render(
    user: Any,
    session_key: str | None,
    classroom_id: int,
    view: dict[str, str],
    learner_ids: set[int],
    roster: bool,
    check: bool,
) -> str | int:
    """The fragments to send, or a close code. (One hop to the database thread.)"""
    if check and not signed_in(user, session_key):
        return CLOSE_UNAUTHENTICATED
    try:
        classroom = selectors.classroom_get_for_instructor(user=user, classroom_id=classroom_id)
        if roster:
            matrix = selectors.classroom_matrix(
                classroom=classroom,
                sort=view["sort"],
                query=view["query"],
                chapter_slug=view["chapter_slug"],
            )
            context = {"classroom": classroom, "matrix": matrix, "oob": True}
            return render_to_string(MATRIX, context).strip()
        matrix = selectors.classroom_matrix(
            classroom=classroom, chapter_slug=view["chapter_slug"], learner_ids=learner_ids
        )
    except (Http404, PermissionDenied):
        return CLOSE_NOT_FOUND
    return "".join(
        render_to_string(ROW, {"classroom": classroom, "row": row, "oob": True}).strip()
        for row in matrix.rows
    )


class ClassroomConsumer(LiveStream):
    classroom_id: int = 0
    flusher: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        await self.accept()
        user = await self.open_for()
        if user is None:
            return
        try:
            classroom = await _classroom_for(
                user, self.scope["url_route"]["kwargs"]["classroom_id"]
            )
        except (Http404, PermissionDenied):
            await self.close_with(CLOSE_NOT_FOUND)
            return
        self.classroom_id = classroom.pk
        self.view = view_of(self.scope.get("query_string", b""))
        self.pending: set[int] = set()
        self.roster = False
        self.checked = time.monotonic()
        self.group = group_name(classroom.pk)
        await self.channel_layer.group_add(self.group, self.channel_name)

    async def disconnect(self, code: int) -> None:
        if self.flusher is not None and asyncio.current_task() is not self.flusher:
            self.flusher.cancel()
        self.flusher = None
        await super().disconnect(code)

    # --- from live.py -----------------------------------------------------------------

    async def classroom_learner(self, message: dict[str, Any]) -> None:
        if self.group is None:
            return
        self.pending.add(int(message["learner_id"]))
        self._schedule()

    async def classroom_roster(self, message: dict[str, Any]) -> None:
        if self.group is None:
            return
        self.roster = True
        self._schedule()

    def _schedule(self) -> None:
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        await asyncio.sleep(FLUSH_S)
        ids, self.pending = self.pending, set()
        roster, self.roster = self.roster, False
        now = time.monotonic()
        check = now - self.checked >= CHECK_EVERY_S
        if check:
            self.checked = now
            await self.touch_slot()
        result = await _render(
            self.scope["user"],
            self.session_key,
            self.classroom_id,
            self.view,
            ids,
            roster,
            check,
        )
        if isinstance(result, int):
            await self.close_with(result)
        elif result and self.group is not None:
            await self.send(text_data=result)
