from __future__ import annotations

import csv
import io
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from apps.accounts.models import User
from apps.classrooms.models import Classroom, JoinCode, Membership
from apps.courses.models import Chapter, ChapterProgress, QuizAttempt
from apps.labs.models import ExperimentRun, Sandbox
from apps.labs.patterns import load_pattern
from apps.labs.services import sandbox_launch
from tests.conftest import client_for

pytestmark = pytest.mark.django_db


def _level_client(level: str, request: pytest.FixtureRequest) -> Client:
    if level == "anonymous":
        return Client()
    user = request.getfixturevalue(
        {
            "learner": "learner",
            "class instructor": "instructor",
            "other instructor": "other_instructor",
            "staff": "staff",
        }[level]
    )
    return client_for(user)


READ_PAGES = ["dashboard", "learner", "export", "insight", "wall"]
EXPECTED = {
    "anonymous": 302,
    "learner": 404,
    "class instructor": 200,
    "other instructor": 404,
    "staff": 200,
}


def _url(name: str, classroom: Classroom, learner: User) -> str:
    if name == "learner":
        return reverse("classrooms:learner", args=[classroom.pk, learner.pk])
    return reverse(f"classrooms:{name}", args=[classroom.pk])


@pytest.mark.parametrize("page", READ_PAGES)
@pytest.mark.parametrize("level", list(EXPECTED))
def test_read_pages_answer_by_permission_level(
    page: str,
    level: str,
    request: pytest.FixtureRequest,
    classroom: Classroom,
    other_classroom: Classroom,
    learner: User,
) -> None:
    response = _level_client(level, request).get(_url(page, classroom, learner))
    assert response.status_code == EXPECTED[level]
    if level == "anonymous":
        assert response["Location"].startswith(reverse("accounts:login"))
    if response.status_code == 200 and page in {"dashboard", "learner"}:
        assert "alice" in response.content.decode()


MANAGE_EXPECTED = {**EXPECTED, "staff": 403}


@pytest.mark.parametrize("level", list(MANAGE_EXPECTED))
def test_manage_page_and_actions_answer_by_permission_level(
    level: str,
    request: pytest.FixtureRequest,
    classroom: Classroom,
    other_classroom: Classroom,
    learner: User,
) -> None:
    client = _level_client(level, request)
    assert client.get(_url("manage", classroom, learner)).status_code == MANAGE_EXPECTED[level]
    response = client.post(
        reverse("classrooms:manage_action", args=[classroom.pk, "remove"]), {"user_id": learner.pk}
    )
    allowed = level == "class instructor"
    assert response.status_code == (
        302 if allowed or level == "anonymous" else MANAGE_EXPECTED[level]
    )
    still_in = Membership.objects.get(classroom=classroom, user=learner).left_at is None
    assert still_in is not allowed


def test_an_instructor_gets_404_for_a_learner_only_in_another_class(
    instructor: User, classroom: Classroom, other_classroom: Classroom, other_learner: User
) -> None:
    response = client_for(instructor).get(
        reverse("classrooms:learner", args=[classroom.pk, other_learner.pk])
    )
    assert response.status_code == 404
    # Nor through the other class's id.
    response = client_for(instructor).get(
        reverse("classrooms:learner", args=[other_classroom.pk, other_learner.pk])
    )
    assert response.status_code == 404


def test_the_list_shows_only_the_classrooms_one_teaches(
    classroom: Classroom, other_classroom: Classroom, instructor: User, staff: User
) -> None:
    html = client_for(instructor).get(reverse("classrooms:list")).content.decode()
    assert "Class A" in html and "1 learner<" in html and "Class B" not in html
    html = client_for(staff).get(reverse("classrooms:list")).content.decode()
    assert "Class A" in html and "Class B" in html


def test_a_co_instructor_sees_the_dashboard(
    classroom: Classroom, other_instructor: User, course: list[Chapter]
) -> None:
    classroom.co_instructors.add(other_instructor)
    response = client_for(other_instructor).get(classroom.get_absolute_url())
    assert response.status_code == 200
    assert 'data-testid="row-alice"' in response.content.decode()


def _progress(learner: User, chapter: Chapter) -> ExperimentRun:
    ChapterProgress.objects.create(user=learner, chapter=chapter)
    question = chapter.quiz[0]
    wrong = next(o["id"] for o in question["options"] if o["id"] not in question["answers"])
    QuizAttempt.objects.create(
        user=learner, chapter=chapter, answers={question["id"]: [wrong]}, score=2, max_score=6
    )
    QuizAttempt.objects.create(
        user=learner,
        chapter=chapter,
        answers={question["id"]: list(question["answers"])},
        score=4,
        max_score=6,
    )
    experiment = load_pattern(chapter.sandbox).experiments[0]
    prediction = experiment.prediction.options[0].id if experiment.prediction.options else 10.0
    return ExperimentRun.objects.create(
        user=learner,
        pattern=chapter.sandbox,
        experiment=experiment.id,
        prediction=prediction,
        state=ExperimentRun.State.CHECKED,
        started_at=timezone.now() - timedelta(minutes=5),
        measured={name: 12.5 for name in experiment.check.outputs},
        correct=True,
        explanation="Because the replicas shared the load.",
    )


def test_the_matrix_shows_each_learners_progress(
    instructor_client: Client, classroom: Classroom, learner: User, chapter5: Chapter
) -> None:
    _progress(learner, chapter5)
    sandbox_launch(user=learner, pattern_id=chapter5.sandbox, enqueue=False)
    html = instructor_client.get(classroom.get_absolute_url()).content.decode()
    cell = html.split('data-testid="cell-alice-5"')[1].split("</td>")[0]
    total = len(load_pattern(chapter5.sandbox).experiments)
    assert "✓" in cell
    assert f"4/{chapter5.quiz_points}" in cell
    assert f"⚗ 1/{total}" in cell
    assert "● requested" in cell
    other = html.split('data-testid="cell-alice-4"')[1].split("</td>")[0]
    assert "✓" not in other and "●" not in other


def test_the_matrix_filters_and_sorts(
    instructor_client: Client,
    classroom: Classroom,
    learner: User,
    chapter5: Chapter,
) -> None:
    zed = User.objects.create_user(username="zed")
    Membership.objects.create(classroom=classroom, user=zed)
    ChapterProgress.objects.create(user=zed, chapter=chapter5)
    url = classroom.get_absolute_url()
    by_name = instructor_client.get(url).content.decode()
    assert by_name.index("row-alice") < by_name.index("row-zed")
    by_read = instructor_client.get(url, {"sort": "read"}).content.decode()
    assert by_read.index("row-zed") < by_read.index("row-alice")
    filtered = instructor_client.get(url, {"q": "ze"}).content.decode()
    assert "row-zed" in filtered and "row-alice" not in filtered
    one = instructor_client.get(url, {"chapter": chapter5.slug}).content.decode()
    assert 'data-testid="cell-zed-5"' in one and 'data-testid="cell-zed-4"' not in one
    assert instructor_client.get(url, {"chapter": "nope"}).status_code == 404
    # htmx asks for the matrix alone.
    partial = instructor_client.get(
        url, {"q": "ze"}, HTTP_HX_REQUEST="true", HTTP_HX_TARGET="matrix"
    )
    body = partial.content.decode()
    assert body.lstrip().startswith('<section id="matrix"') and "<html" not in body


def test_removed_learners_leave_the_roster_and_404(
    instructor_client: Client, classroom: Classroom, learner: User, course: list[Chapter]
) -> None:
    instructor_client.post(
        reverse("classrooms:manage_action", args=[classroom.pk, "remove"]), {"user_id": learner.pk}
    )
    assert "row-alice" not in instructor_client.get(classroom.get_absolute_url()).content.decode()
    response = instructor_client.get(reverse("classrooms:learner", args=[classroom.pk, learner.pk]))
    assert response.status_code == 404


def test_learner_detail_shows_answers_and_experiment_runs(
    instructor_client: Client, classroom: Classroom, learner: User, chapter5: Chapter
) -> None:
    run = _progress(learner, chapter5)
    html = instructor_client.get(
        reverse("classrooms:learner", args=[classroom.pk, learner.pk])
    ).content.decode()
    section = html.split('data-testid="detail-5"')[1]
    question = chapter5.quiz[0]
    answer = section.split(f'data-testid="answer-{question["id"]}"')[1].split("</li>\n      \n")[0]
    assert "✓ right" in answer  # the latest attempt chose the right option
    assert "Chose" in answer
    experiment = load_pattern(chapter5.sandbox).experiments[0]
    runs = section.split('data-testid="runs-5"')[1].split("</table>")[0]
    assert experiment.title in runs
    assert experiment.prediction.show(run.prediction) in runs
    assert "12.5" in runs or "13" in runs
    assert "✓ right" in runs


def test_the_csv_export_holds_the_documented_scores(
    instructor_client: Client, classroom: Classroom, learner: User, chapter5: Chapter
) -> None:
    _progress(learner, chapter5)
    hacker = User.objects.create_user(username="=cmd")
    Membership.objects.create(classroom=classroom, user=hacker)
    response = instructor_client.get(reverse("classrooms:export", args=[classroom.pk]))
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    alice = next(r for r in rows if r["username"] == "alice")
    prefix = f"ch5 {chapter5.slug}"
    total = len(load_pattern(chapter5.sandbox).experiments)
    assert alice[f"{prefix} read"] == "1"
    assert alice[f"{prefix} quiz best"] == "4"
    assert alice[f"{prefix} quiz points"] == str(chapter5.quiz_points)
    assert alice[f"{prefix} experiments passed"] == "1"
    assert alice[f"{prefix} predictions right"] == "1"
    assert alice[f"{prefix} experiments available"] == str(total)
    assert alice["chapters read"] == "1" and alice["quiz best total"] == "4"
    assert {r["username"] for r in rows} == {"alice", "'=cmd"}  # no formula for spreadsheets
    one = instructor_client.get(
        reverse("classrooms:export", args=[classroom.pk]), {"chapter": chapter5.slug}
    )
    header = next(csv.reader(io.StringIO(one.content.decode())))
    assert [h for h in header if h[:2] == "ch" and h[2].isdigit()] == [
        h for h in alice if h.startswith(prefix)
    ]
    assert chapter5.slug in one["Content-Disposition"]


def test_an_instructor_creates_a_classroom_and_bad_data_is_explained(
    instructor_client: Client, learner_client: Client
) -> None:
    response = instructor_client.post(
        reverse("classrooms:create"), {"name": "", "sandbox_quota": "x"}
    )
    assert response.status_code == 422
    html = response.content.decode()
    assert "This field is required." in html and "Enter a whole number." in html
    response = instructor_client.post(
        reverse("classrooms:create"), {"name": "Fall", "sandbox_quota": "50"}
    )
    assert response.status_code == 422
    assert "less than or equal to 20" in response.content.decode()
    response = instructor_client.post(
        reverse("classrooms:create"), {"name": "Fall", "sandbox_quota": "2"}
    )
    room = Classroom.objects.get(name="Fall")
    assert response["Location"] == reverse("classrooms:manage", args=[room.pk])
    assert room.sandbox_quota == 2
    assert learner_client.post(reverse("classrooms:create"), {"name": "Mine"}).status_code == 404
    assert learner_client.get(reverse("classrooms:list"))["Location"] == reverse("classrooms:join")


def test_a_learner_joins_by_code_and_by_link_and_leaves(
    classroom: Classroom, other_learner: User, instructor_client: Client
) -> None:
    client = client_for(other_learner)
    response = client.post(reverse("classrooms:join"), {"code": "WRONG123"})
    assert response.status_code == 422
    assert "No class has the code" in response.content.decode()
    code = classroom.codes.get()
    response = client.post(reverse("classrooms:join"), {"code": code.code.lower()})
    assert response.status_code == 302
    assert "Class A" in client.get(reverse("classrooms:join")).content.decode()
    client.post(reverse("classrooms:leave", args=[classroom.pk]))
    assert not Membership.objects.get(user=other_learner).is_active
    # The link shows the class first and joins on the button only.
    link = code.get_absolute_url()
    page = client.get(link)
    assert page.status_code == 200 and "Join Class A" in page.content.decode()
    assert not Membership.objects.get(user=other_learner).is_active
    client.post(link)
    assert Membership.objects.get(user=other_learner).is_active
    # A revoked code's link says so.
    instructor_client.post(
        reverse("classrooms:manage_action", args=[classroom.pk, "revoke"]), {"code_id": code.pk}
    )
    assert JoinCode.objects.get(pk=code.pk).revoked_at is not None
    response = client.get(link)
    assert response.status_code == 422 and "was revoked" in response.content.decode()
    assert client.post(reverse("classrooms:leave", args=[999])).status_code == 404


def test_manage_forms_explain_bad_data(
    instructor_client: Client, classroom: Classroom, other_classroom: Classroom, chapter5: Chapter
) -> None:
    url = lambda action: reverse("classrooms:manage_action", args=[classroom.pk, action])  # noqa: E731
    response = instructor_client.post(url("code"), {"expires_in_days": "0"})
    assert response.status_code == 422
    assert "greater than or equal to 1" in response.content.decode()
    response = instructor_client.post(url("instructor"), {"username": "alice"})
    assert response.status_code == 422 and "alice is not an instructor" in response.content.decode()
    response = instructor_client.post(url("schedule"), {"chapter": "nope", "scheduled": "on"})
    assert response.status_code == 422
    assert "Select a valid choice" in response.content.decode()
    response = instructor_client.post(
        url("schedule"), {"chapter": chapter5.slug, "scheduled": "on", "due_at": "soon"}
    )
    assert response.status_code == 422 and "Enter a valid date/time" in response.content.decode()
    response = instructor_client.post(
        url("schedule"), {"chapter": chapter5.slug, "scheduled": "on", "due_at": "2020-01-02T10:00"}
    )
    assert response.status_code == 302
    dashboard = instructor_client.get(classroom.get_absolute_url()).content.decode()
    assert "due Jan 2" in dashboard
    assert "late" in dashboard.split('data-testid="cell-alice-5"')[1].split("</td>")[0]
    # Another classroom's code cannot be revoked from this one.
    other_code = other_classroom.codes.get()
    assert instructor_client.post(url("revoke"), {"code_id": other_code.pk}).status_code == 404
    assert instructor_client.post(url("explode"), {}).status_code == 404


def test_navigation_shows_classrooms_to_instructors_and_join_to_learners(
    instructor_client: Client, learner_client: Client, db: None
) -> None:
    assert 'data-testid="nav-classrooms"' in instructor_client.get("/").content.decode()
    html = learner_client.get("/").content.decode()
    assert 'data-testid="nav-join"' in html and "nav-classrooms" not in html


# --- sandboxes: a class's instructors watch their learners' sandboxes -----------------------


def test_a_class_instructor_watches_and_acts_only_with_the_learners_consent(
    classroom: Classroom,
    other_classroom: Classroom,
    learner: User,
    instructor: User,
    other_instructor: User,
) -> None:
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    from apps.labs.supervisor import group_name

    sandbox = sandbox_launch(user=learner, pattern_id="hello-cluster", enqueue=False)
    url = reverse("labs:sandbox", args=[sandbox.hex])
    assert client_for(instructor).get(url).status_code == 200
    assert client_for(other_instructor).get(url).status_code == 404
    stop = reverse("labs:stop", args=[sandbox.hex])
    # The learner said "only watch": the instructor may not stop it.
    Membership.objects.filter(user=learner).update(instructors_may_act=False)
    assert client_for(instructor).post(stop).status_code == 403
    assert Sandbox.objects.get(pk=sandbox.pk).state == Sandbox.State.REQUESTED
    # With consent (the default) the instructor may, and the learner's log says who did.
    Membership.objects.filter(user=learner).update(instructors_may_act=True)
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(group_name(sandbox.hex), channel)
    assert client_for(instructor).post(stop).status_code == 302
    assert Sandbox.objects.get(pk=sandbox.pk).state != Sandbox.State.REQUESTED
    told = async_to_sync(layer.receive)(channel)["data"]
    assert (
        told["kind"] == "acted" and told["text"] == "carol (not you: carol) stopped this sandbox."
    )
    # Another class's instructor never may; and once the learner leaves, nobody sees it.
    assert client_for(other_instructor).post(stop).status_code == 404
    Membership.objects.filter(user=learner).update(left_at=timezone.now())
    assert client_for(instructor).get(url).status_code == 404


def test_a_learner_chooses_whether_instructors_may_act(
    classroom: Classroom, learner: User, other_classroom: Classroom
) -> None:
    client = client_for(learner)
    page = client.get(reverse("classrooms:join")).content.decode()
    assert "They may also <strong>break, change and stop</strong> your sandboxes" in page
    url = reverse("classrooms:consent", args=[classroom.pk])
    assert client.post(url, {"allow": "off"}).status_code == 302
    assert Membership.objects.get(user=learner).instructors_may_act is False
    page = client.get(reverse("classrooms:join")).content.decode()
    assert "They may only <strong>watch</strong> your sandboxes." in page
    client.post(url, {"allow": "on"})
    assert Membership.objects.get(user=learner).instructors_may_act is True
    # Not a member of that one: 404, and nothing changes there.
    other = reverse("classrooms:consent", args=[other_classroom.pk])
    assert client.post(other, {"allow": "off"}).status_code == 404


def test_a_watcher_sees_the_lab_read_only_and_marked(
    classroom: Classroom, learner: User, instructor: User
) -> None:
    now = timezone.now()
    sandbox = Sandbox.objects.create(
        owner=learner, pattern="hello-cluster", state=Sandbox.State.RUNNING,
        expires_at=now + timedelta(minutes=30), last_seen_at=now,
    )  # fmt: skip
    url = reverse("labs:sandbox", args=[sandbox.hex])
    acting = client_for(instructor).get(url).content.decode()  # consent: on by default
    assert "Watching alice's sandbox · they let you act" in acting
    assert 'data-testid="fault-form"' in acting
    Membership.objects.filter(user=learner).update(instructors_may_act=False)
    watched = client_for(instructor).get(url).content.decode()
    assert "Watching alice's sandbox · read-only" in watched
    assert 'data-testid="fault-form"' not in watched and 'data-testid="stop-sandbox"' not in watched
    assert "only alice can break things here" in watched
    assert '<fieldset class="control-set" disabled data-testid="read-only-controls">' in watched
    own = client_for(learner).get(url).content.decode()
    assert 'data-testid="fault-form"' in own and 'data-testid="watching"' not in own
    assert 'data-testid="read-only-controls"' not in own
    # The panels' refreshes answer the watcher; changing anything does not.
    faults = reverse("labs:faults", args=[sandbox.hex])
    assert client_for(instructor).get(faults, HTTP_HX_REQUEST="true").status_code == 200
    posted = client_for(instructor).post(
        faults, {"node": "profile", "kind": "kill", "duration": "30"}
    )
    assert posted.status_code == 403
    controls = reverse("labs:controls", args=[sandbox.hex])
    assert client_for(instructor).get(controls, HTTP_HX_REQUEST="true").status_code == 200
    assert (
        client_for(instructor).post(controls, {"control": "rps", "value": "5"}).status_code == 403
    )


def test_insight_counts_wrong_answers_and_missed_predictions_from_the_latest_tries(
    classroom: Classroom, instructor: User, learner: User, other_learner: User,
    other_classroom: Classroom, course: list[Chapter],
) -> None:  # fmt: skip
    chapter = next(c for c in course if c.sandbox == "replicated-lb")
    first, second = chapter.quiz[0], chapter.quiz[1]
    wrong = next(o["id"] for o in first["options"] if o["id"] not in first["answers"])
    carl = User.objects.create_user(username="carl")
    Membership.objects.create(classroom=classroom, user=carl)
    right_all = {q["id"]: list(q["answers"]) for q in chapter.quiz}
    # alice got the first question wrong, then right: her latest counts (right).
    QuizAttempt.objects.create(
        user=learner,
        chapter=chapter,
        answers={**right_all, first["id"]: [wrong]},
        score=0,
        max_score=1,
    )
    QuizAttempt.objects.create(
        user=learner, chapter=chapter, answers=right_all, score=0, max_score=1
    )
    # carl: wrong on the first, right on the rest.
    QuizAttempt.objects.create(
        user=carl,
        chapter=chapter,
        answers={**right_all, first["id"]: [wrong]},
        score=0,
        max_score=1,
    )
    # bob is in another class: his wrong answers are not this class's.
    QuizAttempt.objects.create(
        user=other_learner, chapter=chapter, answers={second["id"]: []}, score=0, max_score=1
    )
    experiment = load_pattern("replicated-lb").experiments[0]
    guess = experiment.prediction.options[0].id
    for user, correct in ((learner, False), (carl, False), (carl, True)):
        ExperimentRun.objects.create(
            user=user, pattern="replicated-lb", experiment=experiment.id, prediction=guess,
            state=ExperimentRun.State.CHECKED, correct=correct, started_at=timezone.now(),
        )  # fmt: skip

    html = (
        client_for(instructor)
        .get(reverse("classrooms:insight", args=[classroom.pk]))
        .content.decode()
    )
    section = html[html.index(f'data-testid="insight-{chapter.number}"') :]
    assert "2 learners answered" in section
    assert "<strong>1 of 2</strong> wrong (50%)" in section  # the first question: carl only
    assert "most picked wrong answer (1×)" in section  # noqa: RUF001
    assert section.count('data-testid="question-insight"') == len(chapter.quiz)
    # alice missed; carl missed, then got it: one of two learners misses it now.
    assert "<strong>1 of 2</strong> predicted wrong (50%)" in section
    assert experiment.prediction.show(guess) in section
    assert 'data-testid="insight-1"' not in html  # nobody answered chapter 1

    empty = client_for(instructor).get(
        reverse("classrooms:insight", args=[classroom.pk]) + "?chapter=" + course[0].slug
    )
    assert "Nothing to read yet" in empty.content.decode()
    assert (
        client_for(instructor)
        .get(reverse("classrooms:insight", args=[classroom.pk]) + "?chapter=nope")
        .status_code
        == 404
    )


def test_the_wall_shows_each_running_sandbox_red_or_calm_from_its_telemetry(
    classroom: Classroom, instructor: User, learner: User, other_classroom: Classroom,
    other_learner: User, course: list[Chapter],
) -> None:  # fmt: skip
    from django.core.cache import cache

    from apps.labs.supervisor import snapshot_cache_key

    carl = User.objects.create_user(username="carl")
    Membership.objects.create(classroom=classroom, user=carl)
    now = timezone.now()

    def running(owner: User) -> Sandbox:
        return Sandbox.objects.create(
            owner=owner, pattern="replicated-lb", state=Sandbox.State.RUNNING,
            expires_at=now + timedelta(minutes=30), last_seen_at=now,
        )  # fmt: skip

    broken, calm, elsewhere = running(learner), running(carl), running(other_learner)

    def history(errors: int, replica_2: str) -> list[dict[str, object]]:
        nodes = {"lb": {"state": "up"}, "replica-2": {"state": replica_2}}
        return [
            {"ts": 1000 + s, "nodes": nodes, "totals": {"n": 20, "errors": errors,
             "error_pct": 5.0 * errors, "p99_ms": 12.0 + s}}
            for s in range(70)
        ]  # fmt: skip

    cache.set(snapshot_cache_key(broken.hex), {"history": history(4, "killed")})
    cache.set(snapshot_cache_key(calm.hex), {"history": history(0, "up")})
    url = reverse("classrooms:wall", args=[classroom.pk])
    html = client_for(instructor).get(url).content.decode()
    assert 'data-testid="wall-alice" data-status="bad"' in html
    assert "20.0% err" in html and "down: replica-2" in html
    assert 'data-testid="wall-carl" data-status="ok"' in html
    assert f"wall-{other_learner.username}" not in html and elsewhere.hex not in html
    part = client_for(instructor).get(url, HTTP_HX_REQUEST="true").content.decode()
    assert part.lstrip().startswith('<section id="wall"') and 'hx-trigger="every 2s"' in part
    Sandbox.objects.update(state=Sandbox.State.STOPPED)
    html = client_for(instructor).get(url).content.decode()
    assert "No sandbox running" in html


def test_an_instructor_invites_by_email_and_a_newcomer_signs_up_into_the_class(
    classroom: Classroom, instructor: User, mailoutbox: list[object]
) -> None:
    url = reverse("classrooms:manage_action", args=[classroom.pk, "invite"])
    client = client_for(instructor)
    bad = client.post(url, {"emails": "ada@example.org, not-an-address"})
    assert bad.status_code == 422
    assert "Not email addresses: not-an-address. Nothing was sent." in bad.content.decode()
    assert mailoutbox == []
    too_many = client.post(url, {"emails": " ".join(f"l{i}@example.org" for i in range(201))})
    assert "At most 200 addresses at once (got 201)." in too_many.content.decode()

    JoinCode.objects.filter(classroom=classroom).update(revoked_at=timezone.now())  # none live
    response = client.post(url, {"emails": "Ada@example.org\ngrace@example.org, ada@example.org"})
    assert response.status_code == 302
    code = JoinCode.objects.get(classroom=classroom, revoked_at__isnull=True)  # a new one
    assert len(mailoutbox) == 2  # one each, the duplicate once
    mail = mailoutbox[0]
    assert mail.to == ["ada@example.org"] and mail.subject == "Join Class A on Distlab"  # type: ignore[attr-defined]
    link = f"http://testserver/classrooms/join/{code.code}/"
    assert link in mail.body  # type: ignore[attr-defined]

    # A newcomer follows the link: sign in is asked, and signing up comes back to it.
    newcomer = Client()
    login = newcomer.get(link, follow=True).content.decode()
    next_query = "?next=/classrooms/join/" + code.code + "/"
    assert f'<a href="/accounts/signup/{next_query}" data-testid="signup-link">' in login
    signup = newcomer.post(
        "/accounts/signup/" + next_query,
        {"username": "ada", "email": "ada@example.org", "password1": "a-long-enough-passphrase-1",
         "password2": "a-long-enough-passphrase-1", "next": f"/classrooms/join/{code.code}/"},
    )  # fmt: skip
    assert signup.status_code == 302 and signup["Location"] == f"/classrooms/join/{code.code}/"
    joined = newcomer.post(f"/classrooms/join/{code.code}/")
    assert joined.status_code == 302
    assert Membership.objects.filter(classroom=classroom, user__username="ada").exists()
    # A link elsewhere is never followed after sign-up.
    elsewhere = Client().post(
        "/accounts/signup/",
        {"username": "eve", "email": "eve@example.org", "password1": "a-long-enough-passphrase-1",
         "password2": "a-long-enough-passphrase-1", "next": "https://evil.example/"},
    )  # fmt: skip
    assert elsewhere["Location"] == "/"
