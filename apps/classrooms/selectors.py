"""Reads for classrooms. An instructor reaches a classroom only through
``classroom_get_for_instructor`` and a learner's data only through
``learner_get_for_instructor``: both answer 404 for what is not theirs to see."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

from django.core.exceptions import PermissionDenied
from django.db.models import Count, Max, Q, QuerySet
from django.http import Http404
from django.utils import timezone

from apps.accounts.models import User
from apps.classrooms.models import Classroom, JoinCode, Membership
from apps.courses.models import Chapter
from apps.courses.selectors import chapter_list_live, course_progress_for_users
from apps.labs.models import ACTIVE_STATES, ExperimentRun, Sandbox
from apps.labs.selectors import ExperimentResults, experiment_results_for_users

CLASSROOM_NOT_FOUND = "No such classroom."
LEARNER_NOT_FOUND = "No such learner in this classroom."
NOT_AN_INSTRUCTOR_OF_IT = "Only this classroom's instructors may change it."

SORTS = {
    "name": "Name",
    "last_seen": "Last seen",
    "read": "Chapters read",
    "quiz": "Quiz points",
    "experiments": "Experiments passed",
}


def _teaching(user: User) -> Q:
    return Q(owner=user) | Q(co_instructors=user)


def classroom_is_instructor(*, user: User, classroom: Classroom) -> bool:
    return bool(
        user.is_authenticated
        and Classroom.objects.filter(_teaching(user), pk=classroom.pk).exists()
    )


def classroom_list_for_instructor(*, user: User) -> list[Classroom]:
    """The classrooms ``user`` teaches (staff: every classroom)."""
    if not user.is_authenticated:
        return []
    qs = Classroom.objects.all() if user.is_staff else Classroom.objects.filter(_teaching(user))
    learners = Count("memberships", filter=Q(memberships__left_at__isnull=True), distinct=True)
    return list(qs.distinct().select_related("owner").annotate(learner_count=learners))


def classroom_get_for_instructor(
    *, user: User, classroom_id: int, manage: bool = False
) -> Classroom:
    """The classroom, if ``user`` teaches it or is staff; 404 otherwise (a learner, or an
    instructor of another classroom, learns nothing of it). ``manage``: changes are for
    its instructors (and superusers); staff who only watch get PermissionDenied."""
    if not user.is_authenticated:
        raise PermissionDenied
    classroom = Classroom.objects.select_related("owner").filter(pk=classroom_id).first()
    if classroom is None:
        raise Http404(CLASSROOM_NOT_FOUND)
    teaches = classroom_is_instructor(user=user, classroom=classroom)
    if not teaches and not user.is_staff:
        raise Http404(CLASSROOM_NOT_FOUND)
    if manage and not teaches and not user.is_superuser:
        raise PermissionDenied(NOT_AN_INSTRUCTOR_OF_IT)
    return classroom


def classroom_instructors(*, classroom: Classroom) -> list[User]:
    return [classroom.owner, *classroom.co_instructors.exclude(pk=classroom.owner_id)]


def classroom_learners(*, classroom: Classroom) -> QuerySet[User]:
    """Its current learners (those who left or were removed are not on the roster)."""
    return User.objects.filter(
        memberships__classroom=classroom, memberships__left_at__isnull=True
    ).order_by("username")


def learner_get_for_instructor(*, user: User, classroom: Classroom, learner_id: int) -> User:
    """A current learner of ``classroom`` (already checked with
    ``classroom_get_for_instructor``), or 404."""
    learner = classroom_learners(classroom=classroom).filter(pk=learner_id).first()
    if learner is None:
        raise Http404(LEARNER_NOT_FOUND)
    return learner


def learner_is_taught_by(*, learner_id: int, instructor: User, to_act: bool = False) -> bool:
    """Whether ``learner_id`` is a current learner of a classroom ``instructor`` teaches;
    with ``to_act``, of one where the learner lets its instructors act on their sandboxes."""
    memberships = Membership.objects.filter(
        Q(classroom__owner=instructor) | Q(classroom__co_instructors=instructor),
        user_id=learner_id,
        left_at__isnull=True,
    )
    if to_act:
        memberships = memberships.filter(instructors_may_act=True)
    return memberships.exists()


def membership_list_for_learner(*, user: User) -> list[Membership]:
    return list(
        Membership.objects.filter(user=user, left_at__isnull=True)
        .select_related("classroom", "classroom__owner")
        .order_by("classroom__name")
    )


def sandbox_quota_for_learner(*, user: User) -> int | None:
    """The largest sandbox quota of the classrooms ``user`` is in, if any sets one."""
    quota = Classroom.objects.filter(
        memberships__user=user, memberships__left_at__isnull=True, sandbox_quota__isnull=False
    ).aggregate(q=Max("sandbox_quota"))["q"]
    return None if quota is None else int(quota)


def join_code_find(*, code: str) -> JoinCode | None:
    normal = code.strip().upper().replace("-", "").replace(" ", "")
    return JoinCode.objects.select_related("classroom").filter(code=normal).first()


def join_code_list(*, classroom: Classroom) -> list[JoinCode]:
    return list(classroom.codes.all())


# --- the progress matrix ------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One learner x one chapter."""

    chapter: Chapter
    read: bool
    best_score: int | None
    quiz_points: int
    attempts: int
    experiments: ExperimentResults
    sandbox: Sandbox | None  # their active sandbox of the chapter's pattern, if any
    due_at: datetime | None = None

    @cached_property
    def experiments_passed(self) -> int:
        return len(self.experiments.checked)

    @cached_property
    def late(self) -> bool:
        """Due, and the chapter is not read yet."""
        return self.due_at is not None and not self.read and self.due_at < timezone.now()

    @cached_property
    def empty(self) -> bool:
        """Nothing to show: not read, no quiz, no experiment passed, no sandbox, not late."""
        return not (
            self.read
            or self.best_score is not None
            or self.experiments_passed
            or self.sandbox
            or self.late
        )

    @property
    def minutes_left(self) -> int | None:
        if self.sandbox is None:
            return None
        return max(0, int((self.sandbox.expires_at - timezone.now()).total_seconds() // 60))


@dataclass(frozen=True)
class Row:
    learner: User
    cells: list[Cell]
    last_seen: datetime | None
    sandbox_running: bool = False

    @property
    def read_count(self) -> int:
        return sum(1 for c in self.cells if c.read)

    @property
    def quiz_total(self) -> int:
        return sum(c.best_score or 0 for c in self.cells)

    @property
    def quiz_points(self) -> int:
        return sum(c.quiz_points for c in self.cells)

    @property
    def experiments_passed(self) -> int:
        return sum(c.experiments_passed for c in self.cells)

    @property
    def experiments_available(self) -> int:
        return sum(c.experiments.available for c in self.cells)


@dataclass(frozen=True)
class Matrix:
    classroom: Classroom
    chapters: list[Chapter]
    rows: list[Row]
    sort: str = "name"
    query: str = ""
    chapter_slug: str = ""
    due: dict[int, datetime] = field(default_factory=dict)  # chapter id → due date

    @property
    def columns(self) -> list[tuple[Chapter, datetime | None]]:
        return [(c, self.due.get(c.pk)) for c in self.chapters]


def _latest(*values: datetime | None) -> datetime | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def classroom_matrix(
    *,
    classroom: Classroom,
    sort: str = "name",
    query: str = "",
    chapter_slug: str = "",
    learner_ids: Collection[int] | None = None,
) -> Matrix:
    """Learners x chapters: read, quiz best, experiments passed out of available, the
    sandbox running now, last seen. A few queries whatever the class size. ``query``
    filters learners by name; ``chapter_slug`` keeps one chapter's column; ``learner_ids``
    keeps those learners' rows (the live dashboard's changed rows)."""
    chapters = chapter_list_live()
    if chapter_slug:
        chapters = [c for c in chapters if c.slug == chapter_slug]
        if not chapters:
            raise Http404("No such chapter")
    learners = classroom_learners(classroom=classroom)
    if query:
        learners = learners.filter(
            Q(username__icontains=query)
            | Q(first_name__icontains=query)
            | Q(last_name__icontains=query)
        )
    if learner_ids is not None:
        learners = learners.filter(pk__in=learner_ids)
    users = list(learners)
    ids = [u.pk for u in users]
    progress = course_progress_for_users(user_ids=ids)
    experiments = experiment_results_for_users(user_ids=ids, patterns={c.sandbox for c in chapters})
    due: dict[int, datetime] = {
        chapter_id: due_at
        for chapter_id, due_at in classroom.schedule.values_list("chapter_id", "due_at")
        if due_at is not None
    }
    active: dict[tuple[int, str], Sandbox] = {}
    for sandbox in Sandbox.objects.filter(owner_id__in=ids, state__in=ACTIVE_STATES).order_by(
        "created_at"
    ):
        active[(sandbox.owner_id, sandbox.pattern)] = sandbox
    sandbox_seen = dict(
        Sandbox.objects.filter(owner_id__in=ids)
        .values("owner_id")
        .annotate(seen=Max("last_seen_at"))
        .values_list("owner_id", "seen")
    )
    experiment_seen = dict(
        ExperimentRun.objects.filter(user_id__in=ids)
        .values("user_id")
        .annotate(seen=Max("started_at"))
        .values_list("user_id", "seen")
    )
    rows = []
    for user in users:
        cells = [
            Cell(
                chapter=c,
                read=(user.pk, c.pk) in progress.read_at,
                best_score=progress.best_score.get((user.pk, c.pk)),
                quiz_points=c.quiz_points,
                attempts=progress.attempts.get((user.pk, c.pk), 0),
                experiments=experiments[user.pk][c.sandbox],
                sandbox=active.get((user.pk, c.sandbox)),
                due_at=due.get(c.pk),
            )
            for c in chapters
        ]
        last_seen = _latest(
            user.last_login,
            progress.last_activity.get(user.pk),
            sandbox_seen.get(user.pk),
            experiment_seen.get(user.pk),
        )
        running = any(s.owner_id == user.pk for s in active.values())
        rows.append(Row(user, cells, last_seen, running))
    rows = _sorted(rows, sort)
    return Matrix(classroom, chapters, rows, sort, query, chapter_slug, due)


def _sorted(rows: list[Row], sort: str) -> list[Row]:
    never = datetime.min.replace(tzinfo=timezone.get_current_timezone())
    keys: dict[str, Any] = {
        "name": lambda r: r.learner.username.lower(),
        "last_seen": lambda r: r.last_seen or never,
        "read": lambda r: r.read_count,
        "quiz": lambda r: r.quiz_total,
        "experiments": lambda r: r.experiments_passed,
    }
    key = keys.get(sort, keys["name"])
    by_name = sorted(rows, key=keys["name"])
    return sorted(by_name, key=key, reverse=sort != "name")


# --- one learner --------------------------------------------------------------------------


@dataclass(frozen=True)
class ChapterDetail:
    cell: Cell
    attempt: Any  # the latest QuizAttempt, or None
    questions: list[dict[str, Any]]  # its answers as ``courses.selectors.quiz_view`` shows them
    cards: list[Any]  # experiment cards (``labs.experiment_views.Card``), with runs
    runs: list[ExperimentRun]


def learner_detail(*, classroom: Classroom, learner: User) -> tuple[Row, list[ChapterDetail]]:
    """A learner's row of the matrix and, per chapter they did anything in: their latest
    quiz answers with the explanations they saw, and their experiment runs (prediction,
    measured numbers, right or not)."""
    from apps.courses.models import QuizAttempt
    from apps.courses.selectors import chapter_render, quiz_view
    from apps.labs.experiment_views import experiment_card
    from apps.labs.patterns import PatternError, load_pattern

    row = classroom_matrix(classroom=classroom, learner_ids=[learner.pk]).rows[0]
    details = []
    runs_by_pattern: dict[str, list[ExperimentRun]] = {}
    for run in ExperimentRun.objects.filter(user=learner).order_by("-started_at", "-pk"):
        runs_by_pattern.setdefault(run.pattern, []).append(run)
    for cell in row.cells:
        attempt = (
            QuizAttempt.objects.filter(user=learner, chapter=cell.chapter)
            .order_by("-created_at", "-pk")
            .first()
        )
        runs = runs_by_pattern.get(cell.chapter.sandbox, [])
        if attempt is None and not runs and not cell.read:
            continue
        questions = []
        if attempt is not None:
            rendered = chapter_render(chapter=cell.chapter)
            questions = quiz_view(rendered=rendered, chosen=attempt.answers, feedback=True)
        cards = []
        try:
            experiments = {e.id: e for e in load_pattern(cell.chapter.sandbox).experiments}
        except PatternError:
            experiments = {}
        for run in runs:
            if run.experiment in experiments:
                cards.append(experiment_card(experiments[run.experiment], run))
        details.append(ChapterDetail(cell, attempt, questions, cards, runs))
    return row, details


# --- class insight ------------------------------------------------------------------------


@dataclass(frozen=True)
class QuestionInsight:
    question_html: str
    wrong: int  # learners whose latest answer to it was wrong
    answered: int  # learners who answered it
    common_wrong_html: str  # the wrong option picked most often ("" if none)
    common_wrong_count: int

    @property
    def wrong_pct(self) -> int:
        return round(100 * self.wrong / self.answered) if self.answered else 0


@dataclass(frozen=True)
class ExperimentInsight:
    title: str
    missed: int  # learners whose latest checked run's prediction was wrong
    checked: int  # learners with a checked run
    common_miss: str  # the wrong prediction made most often, as learners read it
    common_miss_count: int

    @property
    def missed_pct(self) -> int:
        return round(100 * self.missed / self.checked) if self.checked else 0


@dataclass(frozen=True)
class ChapterInsight:
    chapter: Chapter
    learners: int
    questions: list[QuestionInsight]  # most often wrong first
    experiments: list[ExperimentInsight]  # most often missed first


def classroom_insight(*, classroom: Classroom, chapter_slug: str = "") -> list[ChapterInsight]:
    """Per chapter: which quiz questions the class's learners get wrong and which
    experiment predictions they miss, with counts, from each learner's latest attempt and
    latest checked run (what they believe now). Chapters nobody answered are left out."""
    from collections import Counter

    from apps.courses.models import QuizAttempt
    from apps.courses.selectors import chapter_render
    from apps.labs.patterns import PatternError, load_pattern

    chapters = chapter_list_live()
    if chapter_slug:
        chapters = [c for c in chapters if c.slug == chapter_slug]
        if not chapters:
            raise Http404("No such chapter")
    ids = list(classroom_learners(classroom=classroom).values_list("pk", flat=True))
    latest: dict[tuple[int, int], dict[str, list[str]]] = {}
    for user_id, chapter_id, answers in (
        QuizAttempt.objects.filter(user_id__in=ids, chapter__in=chapters)
        .order_by("created_at", "pk")
        .values_list("user_id", "chapter_id", "answers")
    ):
        latest[(user_id, chapter_id)] = answers if isinstance(answers, dict) else {}
    runs: dict[tuple[int, str, str], tuple[Any, bool]] = {}
    for user_id, pattern, experiment_id, prediction, correct in (
        ExperimentRun.objects.filter(
            user_id__in=ids,
            pattern__in={c.sandbox for c in chapters},
            state=ExperimentRun.State.CHECKED,
        )
        .order_by("started_at", "pk")
        .values_list("user_id", "pattern", "experiment", "prediction", "correct")
    ):
        runs[(user_id, pattern, experiment_id)] = (prediction, bool(correct))

    out = []
    for chapter in chapters:
        answer_sets = [a for (_, c), a in latest.items() if c == chapter.pk]
        questions = []
        if answer_sets:
            for q in chapter_render(chapter=chapter).quiz:
                right = sorted(q["answers"])
                picks = [sorted(a[q["id"]]) for a in answer_sets if a.get(q["id"])]
                wrong_options: Counter[str] = Counter(
                    option
                    for pick in picks
                    if pick != right
                    for option in pick
                    if option not in right
                )
                common = wrong_options.most_common(1)
                text = {o["id"]: o["text_html"] for o in q["options"]}
                questions.append(
                    QuestionInsight(
                        question_html=q["question_html"],
                        wrong=sum(1 for pick in picks if pick != right),
                        answered=len(picks),
                        common_wrong_html=text.get(common[0][0], "") if common else "",
                        common_wrong_count=common[0][1] if common else 0,
                    )
                )
            questions.sort(key=lambda q: (-q.wrong_pct, -q.wrong))
        experiments = []
        try:
            found = load_pattern(chapter.sandbox).experiments
        except PatternError:
            found = ()
        for experiment in found:
            results = [
                v for (_, p, e), v in runs.items() if p == chapter.sandbox and e == experiment.id
            ]
            if not results:
                continue
            misses = Counter(
                experiment.prediction.show(prediction)
                for prediction, correct in results
                if not correct
            )
            common_miss = misses.most_common(1)
            experiments.append(
                ExperimentInsight(
                    title=experiment.title,
                    missed=sum(misses.values()),
                    checked=len(results),
                    common_miss=common_miss[0][0] if common_miss else "",
                    common_miss_count=common_miss[0][1] if common_miss else 0,
                )
            )
        experiments.sort(key=lambda e: (-e.missed_pct, -e.missed))
        if questions or experiments:
            out.append(ChapterInsight(chapter, len(answer_sets), questions, experiments))
    return out


# --- the health wall ----------------------------------------------------------------------

WALL_SECONDS = 60  # each card's sparkline
WALL_BAD_PCT = 5.0  # error % over the last 5 s at which a card turns red
WALL_WARN_PCT = 0.5


@dataclass(frozen=True)
class WallCard:
    learner: User
    sandbox: Sandbox
    chapter: Chapter | None
    rps: float
    error_pct: float  # over the last 5 seconds
    p99_ms: float | None
    nodes_down: list[str]
    errors_line: str  # SVG polyline points, 0..100 x 0..30, error % (0 to 100)
    p99_line: str  # the same for p99, scaled to the card's own highest

    @property
    def status(self) -> str:
        if self.error_pct >= WALL_BAD_PCT or self.nodes_down:
            return "bad"
        return "warn" if self.error_pct >= WALL_WARN_PCT else "ok"


def _polyline(values: list[float | None], top: float) -> str:
    """Points of a 100 x 30 sparkline (y grows downwards); gaps stay at zero."""
    if not values:
        return ""
    step = 100 / max(1, WALL_SECONDS - 1)
    offset = WALL_SECONDS - len(values)
    points = []
    for i, value in enumerate(values):
        y = 30 - 28 * min(1.0, (value or 0.0) / top) if top > 0 else 30
        points.append(f"{(offset + i) * step:.1f},{y:.1f}")
    return " ".join(points)


def classroom_wall(*, classroom: Classroom) -> list[WallCard]:
    """Every running sandbox of the classroom's learners, with its last minute of
    telemetry from the supervisor's snapshots (one cache read for all)."""
    from django.core.cache import cache

    from apps.labs.supervisor import snapshot_cache_key

    learners = {u.pk: u for u in classroom_learners(classroom=classroom)}
    sandboxes = list(
        Sandbox.objects.filter(owner_id__in=learners, state=Sandbox.State.RUNNING).order_by(
            "owner__username", "created_at"
        )
    )
    chapters = {c.sandbox: c for c in reversed(chapter_list_live())}  # the first chapter wins
    keys = {s.hex: snapshot_cache_key(s.hex) for s in sandboxes}
    snapshots = cache.get_many(list(keys.values()))
    cards = []
    for sandbox in sandboxes:
        snapshot = snapshots.get(keys[sandbox.hex])
        history = snapshot.get("history") if isinstance(snapshot, dict) else None
        points = [p for p in (history or [])[-WALL_SECONDS:] if isinstance(p, dict)]
        totals = [p.get("totals") or {} for p in points]
        recent = totals[-5:]
        calls = sum(int(t.get("n") or 0) for t in recent)
        errors = sum(int(t.get("errors") or 0) for t in recent)
        p99s = [t.get("p99_ms") for t in totals]
        last_nodes = (points[-1].get("nodes") or {}) if points else {}
        down = sorted(
            name
            for name, node in last_nodes.items()
            if isinstance(node, dict) and node.get("state") not in (None, "up")
        )
        top_p99 = max((v for v in p99s if isinstance(v, int | float)), default=0.0)
        cards.append(
            WallCard(
                learner=learners[sandbox.owner_id],
                sandbox=sandbox,
                chapter=chapters.get(sandbox.pattern),
                rps=round(calls / len(recent), 1) if recent else 0.0,
                error_pct=round(100 * errors / calls, 1) if calls else 0.0,
                p99_ms=p99s[-1] if p99s and isinstance(p99s[-1], int | float) else None,
                nodes_down=down,
                errors_line=_polyline([t.get("error_pct") for t in totals], 100.0),
                p99_line=_polyline(p99s, top_p99),
            )
        )
    return cards
