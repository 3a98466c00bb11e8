from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from config.env import Env
from tests.conftest import REPO

PRODUCTION = {
    "DEBUG": "false",
    "SECRET_KEY": "a-production-secret-key-that-is-long-enough-1234567890",
    "ALLOWED_HOSTS": "lab.example.org",
    "CSRF_TRUSTED_ORIGINS": "https://lab.example.org",
}


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in {"DEBUG", "SECRET_KEY"}}
    base.pop("DJANGO_SETTINGS_MODULE", None)
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_deploy_is_clean_under_production_settings() -> None:
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=PRODUCTION)
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DEBUG": "false", "SECRET_KEY": ""}, "SECRET_KEY: required when DEBUG is off"),
        ({**PRODUCTION, "SECRET_KEY": "x" * 49}, "SECRET_KEY: must be at least 50"),
        ({**PRODUCTION, "SANDBOX_ENGINE": "auto"}, "SANDBOX_ENGINE: auto is for development"),
        ({"DEBUG": "true", "SIGNUP": "maybe"}, "SIGNUP: expected open, invite or closed"),
        ({"DEBUG": "true", "SIGNUP": "invite"}, "SIGNUP_INVITE_CODE: set a code"),
        ({"DEBUG": "true", "TRUSTED_PROXIES": "proxy.local"}, "TRUSTED_PROXIES: 'proxy.local'"),
        ({"DEBUG": "maybe"}, "DEBUG: expected true or false, got 'maybe'"),
        ({"DEBUG": "true", "DATABASE_URL": "mysql://x"}, "DATABASE_URL: expected a URL"),
        ({"DEBUG": "true", "REDIS_URL": "http://x"}, "REDIS_URL: expected a URL"),
        ({"DEBUG": "true", "CSRF_TRUSTED_ORIGINS": "lab.example.org"}, "CSRF_TRUSTED_ORIGINS"),
        ({"DEBUG": "true", "AXES_FAILURE_LIMIT": "lots"}, "AXES_FAILURE_LIMIT: expected a whole"),
        ({"DEBUG": "true", "SECRET_KEY_FILE": "/nonexistent/key"}, "SECRET_KEY_FILE: cannot read"),
    ],
)
def test_a_bad_setting_stops_start_up_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    result = manage("check", env=env)
    assert result.returncode != 0
    assert message in result.stderr


def test_outside_debug_sandboxes_run_on_docker_unless_local_is_chosen() -> None:
    """Without DEBUG the engine is Docker by default: no silent fallback to local
    processes (no isolation) when Docker does not answer."""
    show = "from django.conf import settings; print(settings.SANDBOX_ENGINE)"
    assert manage("shell", "-c", show, env=PRODUCTION).stdout.split()[-1:] == ["docker"]
    local = manage("shell", "-c", show, env={**PRODUCTION, "SANDBOX_ENGINE": "local"})
    assert local.stdout.split()[-1:] == ["local"]
    assert manage("shell", "-c", show, env={"DEBUG": "true"}).stdout.split()[-1:] == ["auto"]


def test_secrets_may_come_from_files(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(PRODUCTION["SECRET_KEY"] + "\n")
    env = Env({"SECRET_KEY_FILE": str(key), "SECRET_KEY": "ignored"})
    assert env.str("SECRET_KEY") == PRODUCTION["SECRET_KEY"]


def test_env_helpers_parse_typed_values() -> None:
    env = Env({"A": "yes", "B": "0", "N": "42", "L": "a, b,,c", "U": "redis://h:1/0"})
    assert env.bool("A") is True and env.bool("B") is False and env.bool("MISSING", True)
    assert env.int("N", 1) == 42 and env.int("MISSING", 7) == 7
    assert env.list("L") == ["a", "b", "c"]
    assert env.url("U", schemes=("redis",)) == "redis://h:1/0"
    with pytest.raises(ImproperlyConfigured, match="N: must be at least 50"):
        env.int("N", 1, minimum=50)


def test_postgres_and_redis_urls_select_those_backends() -> None:
    code = (
        "from django.conf import settings as s;"
        "print(s.DATABASES['default']['ENGINE']);"
        "print(s.CHANNEL_LAYERS['default']['BACKEND']);"
        "print(s.CELERY_BROKER_URL, s.CELERY_EMBEDDED_WORKER)"
    )
    result = subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); {code}"],
        cwd=REPO,
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "DEBUG": "true",
            "DATABASE_URL": "postgres://u@127.0.0.1:5432/x",
            "REDIS_URL": "redis://127.0.0.1:6379/3",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == [
        "django.db.backends.postgresql",
        "channels_redis.core.RedisChannelLayer",
        "redis://127.0.0.1:6379/3 False",
    ]


def test_a_local_install_remembers_its_settings_for_commands_typed_by_hand(
    tmp_path: Path,
) -> None:
    """`make setup` writes var/local.env; manage.py reads it, the environment winning."""
    var = {"DISTLAB_VAR_DIR": str(tmp_path)}
    refused = manage("check", env=var)  # a fresh checkout without it: DEBUG is off
    assert "SECRET_KEY: required when DEBUG is off" in refused.stderr

    written = subprocess.run(
        [sys.executable, "-m", "config.localenv"], cwd=REPO, env={**os.environ, **var}, check=True
    )
    assert written.returncode == 0
    local = tmp_path / "local.env"
    assert local.stat().st_mode & 0o777 == 0o600  # it holds the secret key
    first = local.read_text()
    subprocess.run([sys.executable, "-m", "config.localenv"], cwd=REPO, env={**os.environ, **var})
    assert local.read_text() == first  # written once: sessions survive

    assert manage("check", env=var).returncode == 0
    show = "from django.conf import settings; print(settings.DEBUG, len(settings.SECRET_KEY))"
    assert manage("shell", "-c", show, env=var).stdout.split()[-2:] == ["True", "67"]
    production = manage("shell", "-c", show, env={**var, **PRODUCTION})
    assert production.stdout.split()[-2:] == ["False", str(len(PRODUCTION["SECRET_KEY"]))]

    local.write_text(first + "not a setting\n")
    broken = manage("check", env=var)
    assert broken.returncode != 0
    assert f"{local}:5: expected NAME=value, got 'not a setting'" in broken.stderr
