from __future__ import annotations

import re

import pytest
from django.core import mail
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.urls import reverse

from apps.accounts.forms import EMAIL_TAKEN
from apps.accounts.models import User
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db


def test_sign_up_creates_a_learner_and_signs_in(client: Client) -> None:
    response = client.post(
        reverse("accounts:signup"),
        {
            "username": "dana",
            "email": "Dana@Example.invalid",
            "password1": PASSWORD,
            "password2": PASSWORD,
        },
    )
    assert response.status_code == 302
    user = User.objects.get(username="dana")
    assert user.role == User.Role.LEARNER and user.email == "dana@example.invalid"
    assert "dana" in client.get("/").content.decode()


def test_sign_up_rejects_bad_data_and_keeps_what_was_typed(client: Client, learner: User) -> None:
    response = client.post(
        reverse("accounts:signup"),
        {"username": "erin", "email": learner.email, "password1": "short", "password2": "other"},
    )
    assert response.status_code == 400
    html = response.content.decode()
    assert EMAIL_TAKEN in html
    assert "password fields didn" in html
    assert 'value="erin"' in html
    assert not User.objects.filter(username="erin").exists()


def test_sign_in_and_sign_out(client: Client, learner: User) -> None:
    response = client.post(reverse("accounts:login"), {"username": "alice", "password": PASSWORD})
    assert response.status_code == 302
    assert "alice" in client.get("/").content.decode()
    response = client.post(reverse("accounts:logout"))
    assert response.status_code == 302
    assert "Sign in" in client.get("/").content.decode()


def test_a_wrong_password_says_so(client: Client, learner: User) -> None:
    response = client.post(reverse("accounts:login"), {"username": "alice", "password": "nope"})
    assert response.status_code == 200
    assert "enter a correct username and password" in response.content.decode()


def test_sign_in_is_rate_limited(client: Client, learner: User, settings) -> None:  # type: ignore[no-untyped-def]
    for _ in range(settings.AXES_FAILURE_LIMIT):
        client.post(reverse("accounts:login"), {"username": "alice", "password": "guess"})
    # Now even the right password is refused for a while.
    response = client.post(reverse("accounts:login"), {"username": "alice", "password": PASSWORD})
    assert response.status_code == 429
    assert "Too many sign-in attempts" in response.content.decode()
    assert "_auth_user_id" not in client.session
    # Another account from the same address is not locked.
    other = User.objects.create_user(username="frank", password=PASSWORD)
    response = client.post(
        reverse("accounts:login"), {"username": other.username, "password": PASSWORD}
    )
    assert response.status_code == 302


def test_password_change(learner: User, learner_client: Client) -> None:
    new = "a-brand-new-passphrase-42"
    response = learner_client.post(
        reverse("accounts:password_change"),
        {"old_password": PASSWORD, "new_password1": new, "new_password2": new},
    )
    assert response.status_code == 302
    learner.refresh_from_db()
    assert learner.check_password(new)


def test_password_reset_by_email(client: Client, learner: User) -> None:
    response = client.post(reverse("accounts:password_reset"), {"email": learner.email})
    assert response.status_code == 302
    assert len(mail.outbox) == 1
    link = re.search(r"http://testserver(/accounts/password/reset/\S+/)", mail.outbox[0].body)
    assert link is not None
    response = client.get(link.group(1), follow=True)
    assert response.status_code == 200
    new = "another-new-passphrase-7"
    response = client.post(
        response.redirect_chain[-1][0], {"new_password1": new, "new_password2": new}
    )
    assert response.status_code == 302
    learner.refresh_from_db()
    assert learner.check_password(new)


def test_password_reset_for_an_unknown_address_sends_nothing(client: Client, db: None) -> None:
    response = client.post(reverse("accounts:password_reset"), {"email": "nobody@example.invalid"})
    assert response.status_code == 302  # the same answer: no account enumeration
    assert mail.outbox == []


def test_role_command_grants_instructor(learner: User, capsys: pytest.CaptureFixture[str]) -> None:
    call_command("role", "alice", "instructor")
    learner.refresh_from_db()
    assert learner.is_instructor
    assert "alice is now instructor." in capsys.readouterr().out
    with pytest.raises(CommandError, match="No user named 'zed'"):
        call_command("role", "zed", "instructor")


def test_demo_users_are_created_once(db: None, capsys: pytest.CaptureFixture[str]) -> None:
    call_command("demo_users")
    out = capsys.readouterr().out
    passwords = dict(re.findall(r"user: (\w+)\s+password: (\S+)", out))
    assert set(passwords) == {"instructor", "learner"}
    assert User.objects.get(username="instructor").is_instructor
    assert User.objects.get(username="learner").check_password(passwords["learner"])
    call_command("demo_users")
    again = capsys.readouterr().out
    assert "exist already" in again and passwords["learner"] not in again
