from __future__ import annotations

import re

import pytest
from django.core import mail
from django.core.management import call_command
from django.core.management.base import CommandError
from django.http import HttpResponse
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


# ---- abuse: addresses behind a proxy, password spraying, sign-up and reset floods --------
# (addresses from the documentation ranges, in headers only: no traffic goes anywhere)

CLIENT_A, CLIENT_B = "198.51.100.7", "203.0.113.9"


def _from(address: str) -> dict[str, str]:
    """What a request through our reverse proxy (127.0.0.1, the test client's address)
    carries: the client's address appended to X-Forwarded-For; a client may have put
    anything before it."""
    return {"HTTP_X_FORWARDED_FOR": f"10.9.9.9, {address}"}


def test_the_client_address_is_believed_only_from_a_trusted_proxy(rf, settings) -> None:  # type: ignore[no-untyped-def]
    from apps.accounts.throttle import client_address

    request = rf.get("/", HTTP_X_FORWARDED_FOR=CLIENT_A)
    assert client_address(request) == "127.0.0.1"  # no trusted proxy: the header is ignored
    settings.TRUSTED_PROXIES = ["127.0.0.0/8"]
    assert client_address(request) == CLIENT_A
    spoofed = rf.get("/", HTTP_X_FORWARDED_FOR=f"{CLIENT_B}, {CLIENT_A}")
    assert client_address(spoofed) == CLIENT_A  # what the client wrote itself is ignored
    assert client_address(rf.get("/", HTTP_X_FORWARDED_FOR="nonsense")) == "127.0.0.1"


def test_behind_a_proxy_a_lockout_is_per_client_not_for_everyone(
    client: Client, learner: User, settings
) -> None:  # type: ignore[no-untyped-def]
    """Axes once saw the proxy's address for everybody: anyone could lock anyone out."""
    settings.TRUSTED_PROXIES = ["127.0.0.1"]
    login = reverse("accounts:login")
    for _ in range(settings.AXES_FAILURE_LIMIT):
        client.post(login, {"username": "alice", "password": "guess"}, **_from(CLIENT_B))
    refused = client.post(login, {"username": "alice", "password": PASSWORD}, **_from(CLIENT_B))
    assert refused.status_code == 429
    allowed = Client().post(login, {"username": "alice", "password": PASSWORD}, **_from(CLIENT_A))
    assert allowed.status_code == 302


def test_a_password_sprayed_over_many_usernames_is_stopped(
    client: Client, learner: User, settings
) -> None:  # type: ignore[no-untyped-def]
    settings.TRUSTED_PROXIES = ["127.0.0.1"]
    settings.LOGIN_FAILURES_PER_ADDRESS = 6
    login = reverse("accounts:login")
    for n in range(6):  # one guess each: Axes' per-username limit never trips
        response = client.post(login, {"username": f"user{n}", "password": "Summer2026!"},
                               **_from(CLIENT_B))  # fmt: skip
        assert response.status_code == 200
    refused = client.post(login, {"username": "alice", "password": PASSWORD}, **_from(CLIENT_B))
    assert refused.status_code == 429
    assert "Sign-in from your address is paused" in refused.content.decode()
    allowed = Client().post(login, {"username": "alice", "password": PASSWORD}, **_from(CLIENT_A))
    assert allowed.status_code == 302


def _signup(client: Client, n: int, **extra: str) -> HttpResponse:
    secret = "a-long-enough-passphrase-1"
    data = {"username": f"newbie{n}", "email": f"newbie{n}@example.org",
            "password1": secret, "password2": secret}  # fmt: skip
    return client.post(reverse("accounts:signup"), data | extra)


def test_open_sign_up_is_limited_per_address(settings) -> None:  # type: ignore[no-untyped-def]
    """30 free accounts could fill all 30 sandbox slots."""
    settings.SIGNUPS_PER_ADDRESS_PER_HOUR = 2
    assert [_signup(Client(), n).status_code for n in range(2)] == [302, 302]
    refused = _signup(Client(), 2)
    assert refused.status_code == 429
    assert "Too many accounts were created from your address" in refused.content.decode()
    assert not User.objects.filter(username="newbie2").exists()


def test_sign_up_can_be_closed_or_need_an_invitation_code(settings) -> None:  # type: ignore[no-untyped-def]
    settings.SIGNUP = "closed"
    page = Client().get(reverse("accounts:signup"))
    assert page.status_code == 403 and "Sign-up is closed" in page.content.decode()
    assert _signup(Client(), 1).status_code == 403
    assert not User.objects.filter(username="newbie1").exists()

    settings.SIGNUP, settings.SIGNUP_INVITE_CODE = "invite", "blue-whale-42"
    settings.SIGNUPS_PER_ADDRESS_PER_HOUR = 1  # a class behind one address: the code is the gate
    wrong = _signup(Client(), 1, invite_code="red-whale")
    assert wrong.status_code == 400 and "invitation code is not right" in wrong.content.decode()
    assert [_signup(Client(), n, invite_code="blue-whale-42").status_code for n in (1, 2, 3)] == [
        302, 302, 302,
    ]  # fmt: skip


def test_password_resets_are_limited_and_reveal_nothing(
    client: Client, learner: User, settings
) -> None:  # type: ignore[no-untyped-def]
    settings.PASSWORD_RESETS_PER_HOUR = 2
    reset = reverse("accounts:password_reset")
    for _ in range(2):
        assert client.post(reset, {"email": learner.email}).status_code == 302
    assert len(mail.outbox) == 2
    refused = client.post(reset, {"email": learner.email})
    assert refused.status_code == 429 and len(mail.outbox) == 2
    # The same answer for an address nobody uses: nothing tells the two apart.
    unknown = Client().post(reset, {"email": "nobody@example.org"}, REMOTE_ADDR="127.0.0.2")
    assert unknown.status_code == 302
