"""Writes for accounts: sign-up, roles, the demo users of `make run`."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from django.db import transaction

from apps.accounts.models import User

UNKNOWN_USER = "No user named {username!r}."
DEMO_USERS = (("instructor", User.Role.INSTRUCTOR), ("learner", User.Role.LEARNER))


@dataclass(frozen=True)
class DemoCredentials:
    username: str
    password: str
    role: str


def user_set_role(*, username: str, role: str) -> User:
    if role not in User.Role.values:
        raise ValueError(f"Unknown role {role!r}: choose {', '.join(User.Role.values)}.")
    user = User.objects.filter(username=username).first()
    if user is None:
        raise LookupError(UNKNOWN_USER.format(username=username))
    user.role = role
    user.save(update_fields=["role"])
    return user


@transaction.atomic
def demo_users_ensure() -> list[DemoCredentials]:
    """Create the demo instructor and learner if missing. Returns the credentials of the
    users created now (their passwords are random and shown only this once)."""
    created = []
    for username, role in DEMO_USERS:
        if User.objects.filter(username=username).exists():
            continue
        password = secrets.token_urlsafe(9)
        User.objects.create_user(
            username=username,
            email=f"{username}@example.invalid",
            password=password,
            role=role,
        )
        created.append(DemoCredentials(username, password, role))
    return created
