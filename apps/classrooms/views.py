from __future__ import annotations

import csv
from datetime import UTC
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.text import slugify
from django.views.decorators.http import require_http_methods, require_POST, require_safe

from apps.accounts.http import AuthedHttpRequest
from apps.classrooms import selectors, services
from apps.classrooms.drills import DRILLS_PER_MINUTE, DrillError, drill_candidates, drill_start
from apps.classrooms.forms import (
    ClassroomForm,
    InstructorForm,
    InviteForm,
    JoinCodeForm,
    JoinForm,
    ScheduleForm,
)
from apps.classrooms.guided import (
    MAX_MINUTES,
    ClassExperimentError,
    class_experiment_close,
    class_experiment_results,
    class_experiment_start,
    experiment_title,
)
from apps.classrooms.models import ClassExperiment, Classroom, JoinCode, Membership
from apps.courses.selectors import chapter_list_live
from apps.labs.patterns import Pattern, PatternError, load_pattern
from apps.labs.services import FAULT_PARAMS

UNKNOWN_ACTION = "Unknown action."


def _may_teach(request: AuthedHttpRequest) -> bool:
    return bool(request.user.is_instructor or request.user.is_staff)


# --- instructors: list, create ------------------------------------------------------------


def _list_page(
    request: AuthedHttpRequest, form: ClassroomForm | None = None, status: int = 200
) -> HttpResponse:
    context = {
        "classrooms": selectors.classroom_list_for_instructor(user=request.user),
        "form": form or ClassroomForm(),
    }
    return render(request, "classrooms/list.html", context, status=status)


@require_safe
@login_required
def classroom_list(request: AuthedHttpRequest) -> HttpResponse:
    if not _may_teach(request):
        return redirect("classrooms:join")
    return _list_page(request)


@require_POST
@login_required
def classroom_create(request: AuthedHttpRequest) -> HttpResponse:
    if not _may_teach(request):
        raise Http404
    form = ClassroomForm(request.POST)
    if form.is_valid():
        try:
            classroom = services.classroom_create(
                owner=request.user,
                name=form.cleaned_data["name"],
                sandbox_quota=form.cleaned_data["sandbox_quota"],
            )
        except services.ClassroomError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"{classroom.name} is ready: share its code with learners.")
            return redirect("classrooms:manage", classroom_id=classroom.pk)
    return _list_page(request, form, status=422)


# --- the dashboard ------------------------------------------------------------------------


@require_safe
@login_required
def dashboard(request: AuthedHttpRequest, classroom_id: int) -> HttpResponse:
    classroom = selectors.classroom_get_for_instructor(user=request.user, classroom_id=classroom_id)
    sort = request.GET.get("sort", "name")
    if sort not in selectors.SORTS:
        sort = "name"
    matrix = selectors.classroom_matrix(
        classroom=classroom,
        sort=sort,
        query=request.GET.get("q", "").strip()[:80],
        chapter_slug=request.GET.get("chapter", ""),
    )
    context: dict[str, Any] = {
        "classroom": classroom,
        "matrix": matrix,
        "sorts": selectors.SORTS,
        "all_chapters": chapter_list_live(),
        "may_manage": selectors.classroom_is_instructor(user=request.user, classroom=classroom),
    }
    template = "classrooms/dashboard.html"
    if request.htmx and request.htmx.target == "matrix":
        template += "#matrix"
    return render(request, template, context)


@require_safe
@login_required
def learner_detail(request: AuthedHttpRequest, classroom_id: int, learner_id: int) -> HttpResponse:
    classroom = selectors.classroom_get_for_instructor(user=request.user, classroom_id=classroom_id)
    learner = selectors.learner_get_for_instructor(
        user=request.user, classroom=classroom, learner_id=learner_id
    )
    row, details = selectors.learner_detail(classroom=classroom, learner=learner)
    context = {"classroom": classroom, "learner": learner, "row": row, "details": details}
    return render(request, "classrooms/learner.html", context)


@require_safe
@login_required
def insight(request: AuthedHttpRequest, classroom_id: int) -> HttpResponse:
    classroom = selectors.classroom_get_for_instructor(user=request.user, classroom_id=classroom_id)
    chapter_slug = request.GET.get("chapter", "")
    context = {
        "classroom": classroom,
        "chapters": selectors.classroom_insight(classroom=classroom, chapter_slug=chapter_slug),
        "all_chapters": chapter_list_live(),
        "chapter_slug": chapter_slug,
    }
    return render(request, "classrooms/insight.html", context)


# --- the health wall ----------------------------------------------------------------------


@require_safe
@login_required
def wall(request: AuthedHttpRequest, classroom_id: int) -> HttpResponse:
    """Every running sandbox of the class as a small card, refreshed every 2 seconds."""
    classroom = selectors.classroom_get_for_instructor(user=request.user, classroom_id=classroom_id)
    context = {"classroom": classroom, "cards": selectors.classroom_wall(classroom=classroom)}
    template = "classrooms/wall.html"
    if request.htmx:
        template += "#wall"
    return render(request, template, context)


# --- drills -----------------------------------------------------------------------------


def _whole(value: str | None, label: str) -> int:
    try:
        return int(value or "")
    except ValueError:
        raise DrillError(f"{label} must be a whole number, got {value!r}.") from None


def _chapter_patterns() -> list[tuple[Any, Pattern]]:
    """(chapter, its sandbox's pattern) of every live chapter whose pattern loads."""
    out = []
    for chapter in chapter_list_live():
        try:
            out.append((chapter, load_pattern(chapter.sandbox)))
        except PatternError:
            continue
    return out


def _drill_targets() -> list[tuple[Any, str, list[str], list[str]]]:
    """(chapter, pattern, node names, fault kinds) of every chapter whose sandbox loads."""
    return [
        (chapter, chapter.sandbox, pattern.node_names(), list(pattern.faults))
        for chapter, pattern in _chapter_patterns()
    ]


def _drill_page(
    request: AuthedHttpRequest, classroom: Classroom, *, error: str = "", status: int = 200
) -> HttpResponse:
    targets = _drill_targets()
    kinds = sorted({k for *_, faults in targets for k in faults}, key=list(FAULT_PARAMS).index)
    drills = list(
        classroom.drills.select_related("created_by")
        .prefetch_related("targets__learner", "targets__fault")
        .order_by("-created_at", "-pk")[:20]
    )
    running = {
        pattern: len(drill_candidates(classroom=classroom, pattern=pattern))
        for _, pattern, _, _ in targets
    }
    context = {
        "classroom": classroom,
        "targets": [(c, p, nodes, faults, running[p]) for c, p, nodes, faults in targets],
        "kinds": kinds,
        "learners": selectors.classroom_learners(classroom=classroom),
        "drills": drills,
        "error": error,
        "form": request.POST if request.method == "POST" else {},
        "may_run": selectors.classroom_is_instructor(user=request.user, classroom=classroom),
        "per_minute": DRILLS_PER_MINUTE,
    }
    return render(request, "classrooms/drills.html", context, status=status)


@require_http_methods(["GET", "POST"])
@login_required
def drills(request: AuthedHttpRequest, classroom_id: int) -> HttpResponse:
    """The class's drills (GET, staff too) and starting one (POST, its instructors)."""
    classroom = selectors.classroom_get_for_instructor(
        user=request.user, classroom_id=classroom_id, manage=request.method == "POST"
    )
    if request.method == "GET":
        return _drill_page(request, classroom)
    post = request.POST
    pattern, _, node = post.get("target", "").partition(":")
    try:
        kind = post.get("kind", "")
        params: dict[str, Any] = {}
        if kind == "latency":
            params["ms"] = _whole(post.get("ms"), "The latency")
        elif kind in ("errors", "drop"):
            params["rate"] = _whole(post.get("rate_pct"), "The rate") / 100
        drill = drill_start(
            classroom=classroom,
            by=request.user,
            pattern=pattern,
            node=node,
            kind=kind,
            duration=0 if kind == "restart" else _whole(post.get("duration"), "The duration"),
            params=params,
            learner_ids=[_whole(v, "A learner") for v in post.getlist("learners")] or None,
        )
    except DrillError as exc:
        return _drill_page(request, classroom, error=str(exc), status=422)
    count = drill.targets.count()
    boxes = f"{count} sandbox{'es' if count != 1 else ''}"
    messages.success(request, f"Drill started: {drill.kind} on {drill.node} in {boxes}.")
    return redirect("classrooms:drills", classroom_id=classroom.pk)


# --- guided class experiments ----------------------------------------------------------


def _experiment_choices() -> list[tuple[Any, str, list[tuple[str, str]]]]:
    """(chapter, pattern, [(experiment id, title)]) of every chapter whose sandbox loads."""
    return [
        (chapter, chapter.sandbox, [(e.id, e.title) for e in pattern.experiments])
        for chapter, pattern in _chapter_patterns()
        if pattern.experiments
    ]


def _experiments_page(
    request: AuthedHttpRequest, classroom: Classroom, *, error: str = "", status: int = 200
) -> HttpResponse:
    choices = _experiment_choices()
    asks = list(classroom.class_experiments.select_related("created_by")[:20])
    context = {
        "classroom": classroom,
        "choices": [
            (c, p, found, len(drill_candidates(classroom=classroom, pattern=p)))
            for c, p, found in choices
        ],
        "results": [class_experiment_results(ask=ask) for ask in asks],
        "error": error,
        "form": request.POST if request.method == "POST" else {},
        "may_run": selectors.classroom_is_instructor(user=request.user, classroom=classroom),
        "max_minutes": MAX_MINUTES,
    }
    return render(request, "classrooms/experiments.html", context, status=status)


@require_http_methods(["GET", "POST"])
@login_required
def class_experiments(request: AuthedHttpRequest, classroom_id: int) -> HttpResponse:
    """The class's guided experiments with their results (GET, staff too) and asking the
    class for one (POST, its instructors)."""
    classroom = selectors.classroom_get_for_instructor(
        user=request.user, classroom_id=classroom_id, manage=request.method == "POST"
    )
    if request.method == "GET":
        return _experiments_page(request, classroom)
    pattern, _, experiment = request.POST.get("experiment", "").partition(":")
    try:
        ask, told = class_experiment_start(
            classroom=classroom,
            by=request.user,
            pattern=pattern,
            experiment=experiment,
            minutes=_whole(request.POST.get("minutes"), "The time it stays open"),
        )
    except (ClassExperimentError, DrillError) as exc:
        return _experiments_page(request, classroom, error=str(exc), status=422)
    boxes = f"{told} running sandbox{'es' if told != 1 else ''}"
    title = experiment_title(ask.pattern, ask.experiment)
    messages.success(
        request,
        f"Asked the class to run “{title}” until {ask.closes_at:%H:%M} UTC; "
        f"{boxes} told now, the others see it when they open that chapter's lab.",
    )
    return redirect("classrooms:class_experiment", classroom_id=classroom.pk, ask_id=ask.pk)


def _ask_or_404(classroom: Classroom, ask_id: int) -> ClassExperiment:
    ask = classroom.class_experiments.select_related("created_by").filter(pk=ask_id).first()
    if ask is None:
        raise Http404("No such class experiment in this classroom.")
    return ask


@require_safe
@login_required
def class_experiment(request: AuthedHttpRequest, classroom_id: int, ask_id: int) -> HttpResponse:
    """One ask's results; the results box reloads itself every 2 s while it is open."""
    classroom = selectors.classroom_get_for_instructor(user=request.user, classroom_id=classroom_id)
    ask = _ask_or_404(classroom, ask_id)
    context = {
        "classroom": classroom,
        "r": class_experiment_results(ask=ask),
        "may_run": selectors.classroom_is_instructor(user=request.user, classroom=classroom),
        "live": True,
    }
    template = "classrooms/experiment.html"
    return render(request, template + "#results" if request.htmx else template, context)


@require_POST
@login_required
def class_experiment_end(
    request: AuthedHttpRequest, classroom_id: int, ask_id: int
) -> HttpResponse:
    classroom = selectors.classroom_get_for_instructor(
        user=request.user, classroom_id=classroom_id, manage=True
    )
    class_experiment_close(ask=_ask_or_404(classroom, ask_id), by=request.user)
    messages.success(request, "Closed: runs started from now on no longer count.")
    return redirect("classrooms:class_experiment", classroom_id=classroom.pk, ask_id=ask_id)


def _safe_cell(value: object) -> object:
    """Spreadsheets run a cell that starts with = + - @ as a formula: not ours."""
    if isinstance(value, str) and value[:1] in {"=", "+", "-", "@", "\t", "\r"}:
        return "'" + value
    return value


@require_safe
@login_required
def export_csv(request: AuthedHttpRequest, classroom_id: int) -> HttpResponse:
    """The matrix as CSV (scoring: README's "Classrooms"): per chapter read, quiz best of
    the quiz's points, experiments passed (run to their check) and predictions right of
    those available; then the totals. ``?chapter=<slug>`` keeps one chapter."""
    classroom = selectors.classroom_get_for_instructor(user=request.user, classroom_id=classroom_id)
    chapter_slug = request.GET.get("chapter", "")
    matrix = selectors.classroom_matrix(classroom=classroom, chapter_slug=chapter_slug)
    stamp = timezone.now().strftime("%Y%m%d")
    name = f"{slugify(classroom.name) or 'classroom'}-{chapter_slug or 'all'}-{stamp}.csv"
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    writer = csv.writer(response)
    header = ["username", "name", "email"]
    for c in matrix.chapters:
        prefix = f"ch{c.number} {c.slug}"
        header += [
            f"{prefix} read",
            f"{prefix} quiz best",
            f"{prefix} quiz points",
            f"{prefix} experiments passed",
            f"{prefix} predictions right",
            f"{prefix} experiments available",
        ]
    header += [
        "chapters read",
        "quiz best total",
        "quiz points total",
        "experiments passed total",
        "experiments available total",
        "last seen (UTC)",
    ]
    writer.writerow(header)
    for row in matrix.rows:
        user = row.learner
        line: list[object] = [user.username, user.get_full_name(), user.email]
        for cell in row.cells:
            line += [
                int(cell.read),
                "" if cell.best_score is None else cell.best_score,
                cell.quiz_points,
                cell.experiments_passed,
                len(cell.experiments.right),
                cell.experiments.available,
            ]
        line += [
            row.read_count,
            row.quiz_total,
            row.quiz_points,
            row.experiments_passed,
            row.experiments_available,
            row.last_seen.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if row.last_seen else "",
        ]
        writer.writerow([_safe_cell(v) for v in line])
    return response


# --- managing a classroom -----------------------------------------------------------------


def _manage_page(
    request: AuthedHttpRequest,
    classroom: Classroom,
    status: int = 200,
    **forms: Any,
) -> HttpResponse:
    schedule = {e.chapter_id: e for e in classroom.schedule.all()}
    chapters = chapter_list_live()
    context = {
        "classroom": classroom,
        "settings_form": forms.get("settings_form")
        or ClassroomForm(
            initial={"name": classroom.name, "sandbox_quota": classroom.sandbox_quota}
        ),
        "code_form": forms.get("code_form") or JoinCodeForm(),
        "invite_form": forms.get("invite_form") or InviteForm(),
        "instructor_form": forms.get("instructor_form") or InstructorForm(),
        "schedule_error": forms.get("schedule_error", ""),
        "error": forms.get("error", ""),
        "codes": selectors.join_code_list(classroom=classroom),
        "instructors": selectors.classroom_instructors(classroom=classroom),
        "learners": selectors.classroom_learners(classroom=classroom),
        "schedule": [(c, schedule.get(c.pk)) for c in chapters],
        "join_base": request.build_absolute_uri("/")[:-1],
    }
    return render(request, "classrooms/manage.html", context, status=status)


@require_safe
@login_required
def manage(request: AuthedHttpRequest, classroom_id: int) -> HttpResponse:
    classroom = selectors.classroom_get_for_instructor(
        user=request.user, classroom_id=classroom_id, manage=True
    )
    return _manage_page(request, classroom)


@require_POST
@login_required
def manage_action(request: AuthedHttpRequest, classroom_id: int, action: str) -> HttpResponse:
    """One form of the manage page; back to it on success, the page with the error (422)
    otherwise."""
    classroom = selectors.classroom_get_for_instructor(
        user=request.user, classroom_id=classroom_id, manage=True
    )
    post = request.POST
    try:
        if action == "settings":
            form = ClassroomForm(post)
            if not form.is_valid():
                return _manage_page(request, classroom, 422, settings_form=form)
            services.classroom_update(
                classroom=classroom,
                name=form.cleaned_data["name"],
                sandbox_quota=form.cleaned_data["sandbox_quota"],
            )
            messages.success(request, "Saved.")
        elif action == "code":
            code_form = JoinCodeForm(post)
            if not code_form.is_valid():
                return _manage_page(request, classroom, 422, code_form=code_form)
            code = services.join_code_create(
                classroom=classroom,
                by=request.user,
                expires_in_days=code_form.cleaned_data["expires_in_days"],
            )
            messages.success(request, f"New join code {code.code}.")
        elif action == "revoke":
            try:
                code = services.join_code_revoke(
                    classroom=classroom, code_id=int(post.get("code_id", ""))
                )
            except (ValueError, JoinCode.DoesNotExist):
                raise Http404("No such join code.") from None
            messages.success(request, f"Code {code.code} revoked: it no longer lets anyone join.")
        elif action == "invite":
            invite_form = InviteForm(post)
            if not invite_form.is_valid():
                return _manage_page(request, classroom, 422, invite_form=invite_form)
            code, sent = services.classroom_invite(
                classroom=classroom,
                by=request.user,
                emails=invite_form.cleaned_data["emails"],
                site=request.build_absolute_uri("/"),
            )
            addresses = f"{sent} address{'es' if sent != 1 else ''}"
            messages.success(request, f"Invitation sent to {addresses}, with code {code.code}.")
        elif action == "instructor":
            instructor_form = InstructorForm(post)
            if not instructor_form.is_valid():
                return _manage_page(request, classroom, 422, instructor_form=instructor_form)
            user = services.classroom_instructor_add(
                classroom=classroom, username=instructor_form.cleaned_data["username"]
            )
            messages.success(request, f"{user.username} now co-teaches {classroom.name}.")
        elif action == "instructor-remove":
            services.classroom_instructor_remove(
                classroom=classroom, user_id=_int(post.get("user_id"))
            )
            messages.success(request, "Co-instructor removed.")
        elif action == "schedule":
            schedule_form = ScheduleForm(post)
            if not schedule_form.is_valid():
                error = "; ".join(
                    f"{name}: {' '.join(map(str, errors))}"
                    for name, errors in schedule_form.errors.items()
                )
                return _manage_page(request, classroom, 422, schedule_error=error)
            services.classroom_schedule_set(
                classroom=classroom,
                chapter=schedule_form.cleaned_data["chapter"],
                scheduled=schedule_form.cleaned_data["scheduled"],
                due_at=schedule_form.cleaned_data["due_at"],
            )
            messages.success(request, "Schedule saved.")
        elif action == "remove":
            services.membership_end(classroom=classroom, user_id=_int(post.get("user_id")))
            messages.success(request, "Learner removed; their progress stays theirs.")
        else:
            raise Http404(UNKNOWN_ACTION)
    except services.ClassroomError as exc:
        return _manage_page(request, classroom, 422, error=str(exc))
    return redirect("classrooms:manage", classroom_id=classroom.pk)


def _int(value: str | None) -> int:
    try:
        return int(value or "")
    except ValueError:
        raise Http404 from None


# --- learners: join and leave -------------------------------------------------------------


def _join_page(
    request: AuthedHttpRequest, form: JoinForm | None = None, status: int = 200
) -> HttpResponse:
    context = {
        "form": form or JoinForm(),
        "memberships": selectors.membership_list_for_learner(user=request.user),
    }
    return render(request, "classrooms/join.html", context, status=status)


@require_http_methods(["GET", "HEAD", "POST"])
@login_required
def join(request: AuthedHttpRequest) -> HttpResponse:
    if request.method != "POST":
        return _join_page(request)
    form = JoinForm(request.POST)
    if form.is_valid():
        try:
            membership = services.classroom_join(user=request.user, code=form.cleaned_data["code"])
        except services.ClassroomError as exc:
            form.add_error("code", str(exc))
        else:
            messages.success(request, f"You joined {membership.classroom.name}.")
            return redirect("classrooms:join")
    return _join_page(request, form, status=422)


@require_POST
@login_required
def consent(request: AuthedHttpRequest, classroom_id: int) -> HttpResponse:
    """A learner lets a classroom's instructors act on their sandboxes, or only watch."""
    membership = (
        Membership.objects.filter(
            classroom_id=classroom_id, user=request.user, left_at__isnull=True
        )
        .select_related("classroom")
        .first()
    )
    if membership is None:
        raise Http404("You are not in this classroom.")
    membership.instructors_may_act = request.POST.get("allow") == "on"
    membership.save(update_fields=["instructors_may_act"])
    name = membership.classroom.name
    if membership.instructors_may_act:
        messages.success(request, f"{name}'s instructors may now act on your sandboxes too.")
    else:
        messages.success(request, f"{name}'s instructors may now only watch your sandboxes.")
    return redirect("classrooms:join")


@require_http_methods(["GET", "HEAD", "POST"])
@login_required
def join_link(request: AuthedHttpRequest, code: str) -> HttpResponse:
    """A join link: shows which class it is, and joins on the button (never on a GET)."""
    error = ""
    found = None
    try:
        found = services.join_code_check(code=code)
    except services.ClassroomError as exc:
        error = str(exc)
    if request.method == "POST" and not error:
        try:
            membership = services.classroom_join(user=request.user, code=code)
        except services.ClassroomError as exc:
            error = str(exc)
        else:
            messages.success(request, f"You joined {membership.classroom.name}.")
            return redirect("classrooms:join")
    context = {"code": found, "error": error}
    return render(request, "classrooms/join_link.html", context, status=422 if error else 200)


@require_POST
@login_required
def leave(request: AuthedHttpRequest, classroom_id: int) -> HttpResponse:
    membership = next(
        (
            m
            for m in selectors.membership_list_for_learner(user=request.user)
            if m.classroom_id == classroom_id
        ),
        None,
    )
    if membership is None:
        raise Http404("You are not in that classroom.")
    services.membership_end(classroom=membership.classroom, user_id=request.user.pk)
    messages.success(request, f"You left {membership.classroom.name}. Your progress stays yours.")
    return redirect("classrooms:join")
