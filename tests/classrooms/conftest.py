"""Two classrooms: carol teaches A (alice in it), dave teaches B (bob in it)."""

from __future__ import annotations

import pytest

from apps.accounts.models import User
from apps.classrooms.models import Classroom, Membership
from apps.classrooms.services import classroom_create
from tests.conftest import make_user


@pytest.fixture(autouse=True)
def _fast_passwords(settings) -> None:  # type: ignore[no-untyped-def]
    """These tests make five users each and never sign in by password."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def other_instructor(db: None) -> User:
    return make_user("dave", User.Role.INSTRUCTOR)


@pytest.fixture
def staff(db: None) -> User:
    user = make_user("sam")
    user.is_staff = True
    user.save(update_fields=["is_staff"])
    return user


@pytest.fixture
def classroom(instructor: User, learner: User) -> Classroom:
    room = classroom_create(owner=instructor, name="Class A")
    Membership.objects.create(classroom=room, user=learner)
    return room


@pytest.fixture
def other_classroom(other_instructor: User, other_learner: User) -> Classroom:
    room = classroom_create(owner=other_instructor, name="Class B")
    Membership.objects.create(classroom=room, user=other_learner)
    return room
