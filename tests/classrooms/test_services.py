from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from apps.accounts.models import User
from apps.classrooms import services
from apps.classrooms.models import Classroom, JoinCode, Membership
from apps.classrooms.selectors import classroom_learners, sandbox_quota_for_learner
from apps.courses.models import Chapter, ChapterProgress, QuizAttempt
from apps.labs.models import Sandbox
from apps.labs.services import QuotaExceeded, sandbox_launch

pytestmark = pytest.mark.django_db


def test_it_creates_a_classroom_with_a_first_join_code(instructor: User) -> None:
    room = services.classroom_create(owner=instructor, name="  Distributed   systems ")
    assert room.name == "Distributed systems"
    (code,) = room.codes.all()
    assert len(code.code) == services.CODE_LENGTH
    assert set(code.code) <= set(services.CODE_ALPHABET)
    assert code.is_usable


def test_a_learner_cannot_create_a_classroom(learner: User) -> None:
    with pytest.raises(services.ClassroomError, match=services.NOT_AN_INSTRUCTOR):
        services.classroom_create(owner=learner, name="Mine")
    assert not Classroom.objects.exists()


@pytest.mark.parametrize(
    ("name", "quota", "message"),
    [
        ("   ", None, services.NAME_REQUIRED),
        ("x" * 121, None, services.NAME_TOO_LONG),
        ("ok", 99, services.BAD_QUOTA.format(max=services.MAX_QUOTA)),
    ],
)
def test_bad_classroom_settings_are_refused_clearly(
    instructor: User, name: str, quota: int | None, message: str
) -> None:
    with pytest.raises(services.ClassroomError) as info:
        services.classroom_create(owner=instructor, name=name, sandbox_quota=quota)
    assert str(info.value) == message


def test_a_learner_joins_by_code_in_any_spelling(classroom: Classroom, other_learner: User) -> None:
    code = classroom.codes.get().code
    typed = f" {code[:4].lower()}-{code[4:].lower()} "
    membership = services.classroom_join(user=other_learner, code=typed)
    assert membership.classroom == classroom
    assert other_learner in classroom_learners(classroom=classroom)


def test_a_learner_may_belong_to_several_classrooms(
    classroom: Classroom, other_classroom: Classroom, learner: User
) -> None:
    services.classroom_join(user=learner, code=other_classroom.codes.get().code)
    assert Membership.objects.filter(user=learner, left_at__isnull=True).count() == 2


def test_unknown_revoked_and_expired_codes_are_refused(
    classroom: Classroom, instructor: User, other_learner: User
) -> None:
    with pytest.raises(services.ClassroomError, match="No class has the code 'NOPE'"):
        services.classroom_join(user=other_learner, code="NOPE")
    code = classroom.codes.get()
    services.join_code_revoke(classroom=classroom, code_id=code.pk)
    with pytest.raises(services.ClassroomError, match="was revoked"):
        services.classroom_join(user=other_learner, code=code.code)
    soon = services.join_code_create(classroom=classroom, by=instructor, expires_in_days=1)
    JoinCode.objects.filter(pk=soon.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    with pytest.raises(services.ClassroomError, match="expired on"):
        services.classroom_join(user=other_learner, code=soon.code)
    assert not Membership.objects.filter(user=other_learner).exists()


def test_a_code_expiry_must_be_in_range(classroom: Classroom, instructor: User) -> None:
    for days in (0, services.MAX_CODE_DAYS + 1):
        with pytest.raises(services.ClassroomError, match="A code lasts from 1 to"):
            services.join_code_create(classroom=classroom, by=instructor, expires_in_days=days)


def test_joining_twice_or_as_its_instructor_is_refused(
    classroom: Classroom, instructor: User, learner: User
) -> None:
    code = classroom.codes.get().code
    with pytest.raises(services.ClassroomError, match="already in Class A"):
        services.classroom_join(user=learner, code=code)
    with pytest.raises(services.ClassroomError, match="instructors do not join"):
        services.classroom_join(user=instructor, code=code)


def test_leaving_keeps_progress_and_rejoining_shows_it_again(
    classroom: Classroom, learner: User, chapter5: Chapter
) -> None:
    ChapterProgress.objects.create(user=learner, chapter=chapter5)
    QuizAttempt.objects.create(user=learner, chapter=chapter5, answers={}, score=3, max_score=6)
    services.membership_end(classroom=classroom, user_id=learner.pk)
    assert learner not in classroom_learners(classroom=classroom)
    assert ChapterProgress.objects.filter(user=learner).exists()
    assert QuizAttempt.objects.filter(user=learner).exists()
    services.classroom_join(user=learner, code=classroom.codes.get().code)
    assert learner in classroom_learners(classroom=classroom)
    with pytest.raises(services.ClassroomError, match="bob is not in this classroom"):
        services.membership_end(classroom=classroom, user_id=User.objects.create(username="bob").pk)


def test_co_instructors_must_be_instructors(
    classroom: Classroom, other_instructor: User, other_learner: User
) -> None:
    with pytest.raises(services.ClassroomError, match="bob is not an instructor"):
        services.classroom_instructor_add(classroom=classroom, username="bob")
    with pytest.raises(services.ClassroomError, match="No user named 'nobody'"):
        services.classroom_instructor_add(classroom=classroom, username="nobody")
    services.classroom_instructor_add(classroom=classroom, username="dave")
    with pytest.raises(services.ClassroomError, match="dave already teaches"):
        services.classroom_instructor_add(classroom=classroom, username="dave")
    with pytest.raises(services.ClassroomError, match=services.OWNER_STAYS):
        services.classroom_instructor_remove(classroom=classroom, user_id=classroom.owner_id)
    assert list(classroom.co_instructors.all()) == [other_instructor]


def test_a_classroom_quota_sets_how_many_sandboxes_its_learners_run(
    classroom: Classroom, learner: User, settings
) -> None:  # type: ignore[no-untyped-def]
    settings.SANDBOX_PER_LEARNER = 1
    assert sandbox_quota_for_learner(user=learner) is None
    services.classroom_update(classroom=classroom, name="Class A", sandbox_quota=2)
    assert sandbox_quota_for_learner(user=learner) == 2
    sandbox_launch(user=learner, pattern_id="hello-cluster", enqueue=False)
    sandbox_launch(user=learner, pattern_id="replicated-lb", enqueue=False)
    with pytest.raises(QuotaExceeded):
        sandbox_launch(user=learner, pattern_id="sharded-kv", enqueue=False)
    assert Sandbox.objects.filter(owner=learner).count() == 2
    services.classroom_update(classroom=classroom, name="Class A", sandbox_quota=0)
    Sandbox.objects.all().delete()
    with pytest.raises(QuotaExceeded):
        sandbox_launch(user=learner, pattern_id="hello-cluster", enqueue=False)


def test_the_schedule_holds_due_dates(classroom: Classroom, chapter5: Chapter) -> None:
    due = timezone.now() + timedelta(days=7)
    entry = services.classroom_schedule_set(
        classroom=classroom, chapter=chapter5, scheduled=True, due_at=due
    )
    assert entry is not None and entry.due_at == due
    services.classroom_schedule_set(
        classroom=classroom, chapter=chapter5, scheduled=False, due_at=None
    )
    assert not classroom.schedule.exists()
