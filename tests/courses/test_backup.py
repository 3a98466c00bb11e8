"""`manage.py backup` and `manage.py restore`: what a school's admin relies on to move or
rebuild a server. Everything a learner and an instructor made comes back, into an empty
database only."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from apps.accounts.models import User
from apps.classrooms.models import Classroom, Membership
from apps.classrooms.services import classroom_create
from apps.courses.models import Chapter, ChapterProgress, QuizAttempt
from apps.courses.services import chapter_mark_read, quiz_submit
from apps.labs.models import ExperimentRun
from tests.conftest import make_user

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_backup_restores_accounts_classes_and_progress(
    course: list[Chapter], tmp_path: Path
) -> None:
    teacher = make_user("carol", User.Role.INSTRUCTOR)
    alice = make_user("alice")
    alice.set_password("a-long-enough-passphrase-1")
    alice.save()
    room = classroom_create(owner=teacher, name="Class A")
    Membership.objects.create(classroom=room, user=alice)
    chapter = course[4]
    chapter_mark_read(user=alice, chapter=chapter)
    answers = {q["id"]: list(q["answers"]) for q in chapter.quiz}
    quiz_submit(user=alice, chapter=chapter, answers=answers)
    ExperimentRun.objects.create(
        user=alice, pattern="replicated-lb", experiment="kill-replica", prediction="under-3s",
        state=ExperimentRun.State.CHECKED, correct=True, started_at=timezone.now(),
    )  # fmt: skip

    target = tmp_path / "school.json.gz"
    call_command("backup", str(target))
    assert target.is_file() and not (tmp_path / "school.json.gz.partial").exists()
    assert b'"username": "alice"' in gzip.decompress(target.read_bytes())

    # Refused into a database that has accounts: nothing is mixed.
    with pytest.raises(CommandError, match="already has 2 account"):
        call_command("restore", str(target))

    call_command("flush", interactive=False)
    Chapter.objects.all().delete()
    call_command("content", "sync")  # a fresh install indexes the content first
    call_command("restore", str(target))

    restored = User.objects.get(username="alice")
    assert restored.check_password("a-long-enough-passphrase-1")  # can sign in again
    classroom = Classroom.objects.get(name="Class A")
    assert classroom.owner.username == "carol"
    assert Membership.objects.filter(classroom=classroom, user=restored).exists()
    assert ChapterProgress.objects.get(user=restored).chapter.slug == chapter.slug
    attempt = QuizAttempt.objects.get(user=restored)
    assert attempt.score == attempt.max_score == len(chapter.quiz)
    assert ExperimentRun.objects.get(user=restored).correct is True


def test_restore_explains_a_wrong_file(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="No such file"):
        call_command("restore", str(tmp_path / "missing.json.gz"))
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(CommandError, match=r"is not a `manage\.py backup` file"):
        call_command("restore", str(other))
