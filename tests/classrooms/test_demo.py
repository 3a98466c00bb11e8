from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from apps.accounts.models import User
from apps.classrooms.demo import DEMO_CLASSROOM, DEMO_LEARNERS
from apps.classrooms.models import Classroom
from apps.classrooms.selectors import classroom_learners, classroom_matrix
from apps.courses.models import Chapter
from apps.labs.models import ExperimentRun
from tests.conftest import client_for

pytestmark = pytest.mark.django_db


def test_demo_users_get_a_demo_classroom(capsys: pytest.CaptureFixture[str]) -> None:
    call_command("demo_users")
    call_command("demo_users")
    room = Classroom.objects.get(name=DEMO_CLASSROOM)
    assert room.owner.username == "instructor"
    assert [u.username for u in classroom_learners(classroom=room)] == ["learner"]


def test_demo_class_needs_the_demo_instructor() -> None:
    with pytest.raises(CommandError, match="demo_users"):
        call_command("demo_class")


def test_demo_class_seeds_learners_with_progress(
    course: list[Chapter], capsys: pytest.CaptureFixture[str]
) -> None:
    call_command("demo_users")
    call_command("demo_class")
    assert f"{len(DEMO_LEARNERS)} learner(s) seeded now" in capsys.readouterr().out
    call_command("demo_class")  # idempotent: nobody seeded twice
    assert "0 learner(s) seeded now" in capsys.readouterr().out
    room = Classroom.objects.get(name=DEMO_CLASSROOM)
    matrix = classroom_matrix(classroom=room)
    assert len(matrix.rows) == len(DEMO_LEARNERS) + 1
    seeded = [r for r in matrix.rows if r.learner.username.startswith("demo-")]
    assert all(r.read_count >= 1 and r.quiz_total > 0 for r in seeded)
    assert sum(r.experiments_passed for r in seeded) > 0
    # The runs are consistent with their patterns: each has its verdict and explanation.
    assert ExperimentRun.objects.filter(explanation="").count() == 0
    instructor = User.objects.get(username="instructor")
    response = client_for(instructor).get(room.get_absolute_url())
    assert 'data-testid="row-demo-ada"' in response.content.decode()
    detail = client_for(instructor).get(
        reverse("classrooms:learner", args=[room.pk, seeded[0].learner.pk])
    )
    assert "Latest quiz answers" in detail.content.decode()
