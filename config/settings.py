"""Distlab settings: one file, driven by environment variables.

Embedded defaults (no variables set, ``DEBUG=true``): SQLite in ``var/``, an in-memory
channel layer and cache, and background work on an in-process Celery worker. Setting
``DATABASE_URL`` and ``REDIS_URL`` switches to PostgreSQL and Redis. Every variable is
listed in ``README.md``; a bad value stops start-up with the variable's name.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
import django_stubs_ext
from django.core.exceptions import ImproperlyConfigured

from config.env import Env

# Lets classes such as ModelAdmin[Chapter] be subscripted at run time, as the type stubs say.
django_stubs_ext.monkeypatch()

env = Env()

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env.str("DISTLAB_VAR_DIR", str(BASE_DIR / "var")))

DEBUG = env.bool("DEBUG", False)

# A development key is allowed only while debugging; anywhere else the key is required.
DEV_SECRET_KEY = "django-insecure-distlab-development-key-not-for-production"  # noqa: S105
SECRET_KEY = env.str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY: required when DEBUG is off (set SECRET_KEY or SECRET_KEY_FILE)"
        )
    SECRET_KEY = DEV_SECRET_KEY
elif len(SECRET_KEY) < 50 and not DEBUG:
    raise ImproperlyConfigured("SECRET_KEY: must be at least 50 characters long")

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS")
for origin in CSRF_TRUSTED_ORIGINS:
    if "://" not in origin:
        raise ImproperlyConfigured(
            f"CSRF_TRUSTED_ORIGINS: {origin!r} needs a scheme, e.g. https://{origin}"
        )

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "channels",
    "django_htmx",
    "template_partials",
    "axes",
    "apps.accounts",
    "apps.courses",
    "apps.labs",
    "apps.classrooms",
    "apps.lti",
]

MIDDLEWARE = [
    "config.health.LivenessMiddleware",  # first: answers /healthz whatever the Host or scheme
    "django.middleware.security.SecurityMiddleware",
    "config.security.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "config" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------
DATABASE_URL = env.url(
    "DATABASE_URL",
    schemes=("sqlite", "postgres", "postgresql", "pgsql"),
    default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}",
)
try:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
except ValueError as exc:
    raise ImproperlyConfigured(f"DATABASE_URL: {exc}") from exc
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Concurrent readers and one writer without "database is locked" under Channels.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "timeout": 20,
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: channel layer, cache and Celery broker -----------------------------------
REDIS_URL = env.url("REDIS_URL", schemes=("redis", "rediss", "unix"))
# What this Distlab's cache keys and channel names start with, in a Redis it may share with
# another Distlab. Each parallel test worker (pytest-xdist) has its own.
REDIS_PREFIX = env.str("REDIS_PREFIX", "distlab") + os.environ.get("PYTEST_XDIST_WORKER", "")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": REDIS_PREFIX, "capacity": 200},
        }
    }
    CACHES = {
        "default": {
            # Pages keep serving while Redis is away (config/cache.py).
            "BACKEND": "config.cache.ResilientRedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": REDIS_PREFIX,
            "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 2},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# Without Redis, Celery uses an in-memory transport and `manage.py serve` runs a worker
# (with beat) inside the web process: same tasks, same countdowns, same schedule.
CELERY_BROKER_URL = REDIS_URL or "memory://localhost/"
CELERY_EMBEDDED_WORKER = not REDIS_URL
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TIMEZONE = "UTC"
CONTENT_SYNC_INTERVAL = env.int("CONTENT_SYNC_INTERVAL", 300, minimum=5)
# A task whose worker died is redelivered after this long (Redis broker).
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 300}
CELERY_BEAT_SCHEDULE = {
    "content-sync": {
        "task": "apps.courses.tasks.content_sync_task",
        "schedule": float(CONTENT_SYNC_INTERVAL),
    },
    "sandbox-reap": {
        "task": "apps.labs.tasks.sandbox_reap_task",
        "schedule": float(env.int("SANDBOX_REAP_INTERVAL", 30, minimum=5)),
    },
}

# --- Accounts -------------------------------------------------------------------------
AUTH_USER_MODEL = "accounts.User"
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "accounts:login"
LOGIN_REDIRECT_URL = "courses:home"
LOGOUT_REDIRECT_URL = "courses:home"

# Login guessing: after AXES_FAILURE_LIMIT failures for one username from one address,
# that pair is locked out for AXES_COOLOFF_MINUTES.
AXES_FAILURE_LIMIT = env.int("AXES_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env.int("AXES_COOLOFF_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "accounts/locked_out.html"
AXES_CLIENT_IP_CALLABLE = "apps.accounts.throttle.client_address"
# Reverse proxies in front of Distlab (addresses or networks): only from these is
# X-Forwarded-For believed, so that sign-in limits see clients, not the proxy.
TRUSTED_PROXIES = env.list("TRUSTED_PROXIES")
for _proxy in TRUSTED_PROXIES:
    try:
        ipaddress.ip_network(_proxy, strict=False)
    except ValueError:
        raise ImproperlyConfigured(
            f"TRUSTED_PROXIES: {_proxy!r} is not an address or a network"
        ) from None
# Failed sign-ins from one address, whatever the usernames, before that address waits
# AXES_COOLOFF_MINUTES (a classroom behind one NAT address shares it: keep it generous).
LOGIN_FAILURES_PER_ADDRESS = env.int("LOGIN_FAILURES_PER_ADDRESS", 30, minimum=1)
# Who may create an account: open (limited per address), invite (with SIGNUP_INVITE_CODE,
# which instructors hand out), or closed (accounts made by an administrator).
SIGNUP = env.str("SIGNUP", "open")
if SIGNUP not in {"open", "invite", "closed"}:
    raise ImproperlyConfigured("SIGNUP: expected open, invite or closed")
SIGNUP_INVITE_CODE = env.str("SIGNUP_INVITE_CODE")
if SIGNUP == "invite" and len(SIGNUP_INVITE_CODE) < 8:
    raise ImproperlyConfigured("SIGNUP_INVITE_CODE: set a code of 8 or more characters")
SIGNUPS_PER_ADDRESS_PER_HOUR = env.int("SIGNUPS_PER_ADDRESS_PER_HOUR", 20, minimum=1)
# Per user, beyond the sandbox quota: launch attempts and fault injections from the lab.
LAUNCHES_PER_MINUTE = env.int("LAUNCHES_PER_MINUTE", 6, minimum=1)
FAULTS_PER_MINUTE = env.int("FAULTS_PER_MINUTE", 30, minimum=1)
PASSWORD_RESETS_PER_HOUR = env.int(
    "PASSWORD_RESETS_PER_HOUR", 5, minimum=1
)  # per address and per email
AXES_VERBOSE = False

# --- Email ----------------------------------------------------------------------------
EMAIL_HOST = env.str("EMAIL_HOST")
if EMAIL_HOST:
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_PORT = env.int("EMAIL_PORT", 587, minimum=1)
    EMAIL_HOST_USER = env.str("EMAIL_HOST_USER")
    EMAIL_HOST_PASSWORD = env.str("EMAIL_HOST_PASSWORD")
    EMAIL_USE_TLS = env.bool("EMAIL_USE_TLS", True)
else:
    EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", "Distlab <distlab@localhost>")

# --- Course content -------------------------------------------------------------------
CONTENT_DIR = Path(env.str("CONTENT_DIR", str(BASE_DIR / "content")))
# Re-index content when a file changes, checked on each course page (cheap: one stat per
# file). On by default while debugging so that editing a chapter shows on reload.
CONTENT_AUTO_SYNC = env.bool("CONTENT_AUTO_SYNC", DEBUG)

# --- Sandboxes ------------------------------------------------------------------------
# Isolation is never dropped silently: ``auto`` (Docker when it answers, local processes
# otherwise) is for development only; a server uses Docker unless told ``local``.
SANDBOX_ENGINE = env.str("SANDBOX_ENGINE", "auto" if DEBUG else "docker")
if SANDBOX_ENGINE not in {"auto", "docker", "local"}:
    raise ImproperlyConfigured("SANDBOX_ENGINE: expected auto, docker or local")
if SANDBOX_ENGINE == "auto" and not DEBUG:
    raise ImproperlyConfigured(
        "SANDBOX_ENGINE: auto is for development (DEBUG=true): it would run sandboxes as "
        "local processes, without isolation, whenever Docker does not answer. Set docker, "
        "or local to run them without isolation on purpose"
    )
DOCKER_HOST = env.str("DOCKER_HOST")  # empty: the default socket
SANDBOX_RUNTIME = env.str("SANDBOX_RUNTIME", "runc")  # the OCI runtime, e.g. runsc
# Labels this installation's containers and networks, so that housekeeping never removes
# sandboxes of another Distlab sharing the Docker engine. Default: from the database.
SANDBOX_INSTANCE = (
    env.str("SANDBOX_INSTANCE") or hashlib.sha256(DATABASE_URL.encode()).hexdigest()[:12]
)
# Pin the sandbox image; empty: the image built from this checkout's sandboxes/ folder.
SANDBOX_IMAGE = env.str("SANDBOX_IMAGE")
SANDBOX_SUBNET_POOL = env.str("SANDBOX_SUBNET_POOL", "10.213.0.0/16")
SANDBOX_SUBNET_PREFIX = env.int("SANDBOX_SUBNET_PREFIX", 26, minimum=16)
SANDBOX_LIFETIME_MINUTES = env.int("SANDBOX_LIFETIME_MINUTES", 60, minimum=1)
SANDBOX_MAX_LIFETIME_MINUTES = env.int("SANDBOX_MAX_LIFETIME_MINUTES", 240, minimum=1)
SANDBOX_EXTEND_MINUTES = env.int("SANDBOX_EXTEND_MINUTES", 30, minimum=1)
SANDBOX_IDLE_MINUTES = env.int("SANDBOX_IDLE_MINUTES", 10, minimum=1)
SANDBOX_PER_LEARNER = env.int("SANDBOX_PER_LEARNER", 1, minimum=0)
SANDBOX_PER_INSTRUCTOR = env.int("SANDBOX_PER_INSTRUCTOR", 3, minimum=0)
SANDBOX_MAX_TOTAL = env.int("SANDBOX_MAX_TOTAL", 30, minimum=1)
SANDBOX_LAUNCH_TIMEOUT = env.int("SANDBOX_LAUNCH_TIMEOUT", 60, minimum=5)
SANDBOX_REAP_INTERVAL = env.int("SANDBOX_REAP_INTERVAL", 30, minimum=5)
# Live streams (lab pages) one user may have open at once, across every web process.
SOCKETS_PER_USER = env.int("SOCKETS_PER_USER", 4, minimum=1)
# Whether `manage.py serve` runs the telemetry supervisor inside the web process. It must
# without Redis (the in-memory channel layer reaches only this process's viewers); with
# Redis the classroom stack runs `manage.py supervise` as a service of its own.
SANDBOX_SUPERVISOR_IN_PROCESS = env.bool("SANDBOX_SUPERVISOR_IN_PROCESS", not REDIS_URL)

# --- Static files ---------------------------------------------------------------------
STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
# Our own CSS and JS, and the front-end libraries from npm that `make assets` copies into
# var/vendor/ (never committed).
# The built assets belong to the checkout (like .venv), wherever DISTLAB_VAR_DIR points.
STATICFILES_DIRS = [BASE_DIR / "config" / "static", ("vendor", BASE_DIR / "var" / "vendor")]
# While debugging (make run), serve static files straight from their sources.
WHITENOISE_USE_FINDERS = DEBUG
WHITENOISE_AUTOREFRESH = DEBUG
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "django.contrib.staticfiles.storage.StaticFilesStorage"
            if DEBUG
            else "whitenoise.storage.CompressedManifestStaticFilesStorage"
        )
    },
}

# --- Internationalisation -------------------------------------------------------------
LANGUAGE_CODE = "en"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- Security -------------------------------------------------------------------------
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # htmx reads the token from the page, not the cookie
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
if not DEBUG:
    SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", True)
    CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", True)
    SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", 60 * 60 * 24 * 365, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", False)
    # HSTS preload is a commitment a school makes for its whole domain: opt-in only.
    SILENCED_SYSTEM_CHECKS = ["security.W021"]
    if env.bool("TRUST_X_FORWARDED_PROTO", False):
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", "INFO").upper()},
    # One line per sandbox launched or stopped at INFO; the periodic housekeeping, each task
    # the worker runs and the servers' start-up chatter only at LOG_LEVEL=DEBUG.
    "loggers": {
        name: {"level": env.str("LOG_LEVEL", "WARNING").upper()}
        for name in (
            "django.channels.server",
            "daphne.server",
            "celery.beat",
            "celery.worker.strategy",
            "celery.app.trace",
            "celery.worker.consumer.connection",
        )
    },
}
