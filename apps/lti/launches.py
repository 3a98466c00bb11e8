"""From a platform's launch to a signed-in user on a chapter.

``launch_read`` keeps what Distlab needs of a validated launch (a ``Launch``: plain data,
so it can wait in the cache while a new user chooses an account). A platform user seen
before is signed in at once (``identity_user``); a new one chooses on ``/lti/welcome/``:
a new Distlab account (``account_create``) or the account they are signed in to
(``identity_link``; never matched by name or email, which an LMS does not prove).
``launch_finish`` then brings the LMS course's classroom up to date (an instructor's
first launch makes it; a learner joins it), records where the chapter's score goes back,
and says where the user goes.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.urls import Resolver404, resolve, reverse
from django.utils import timezone
from django.utils.text import slugify
from pylti1p3.message_launch import MessageLaunch

from apps.accounts.models import User
from apps.classrooms.models import Classroom, Membership
from apps.courses.models import Chapter
from apps.lti.models import Context, Identity, Platform, ScoreLink

CLAIM = "https://purl.imsglobal.org/spec/lti/claim/"
AGS_CLAIM = "https://purl.imsglobal.org/spec/lti-ags/claim/endpoint"
DEEP_LINK_CLAIM = "https://purl.imsglobal.org/spec/lti-dl/claim/deep_linking_settings"
SCORE_SCOPE = "https://purl.imsglobal.org/spec/lti-ags/scope/score"
PARKED_SECONDS = 15 * 60

NO_CHAPTER = (
    "This link does not say which chapter to open. Ask your instructor to add Distlab to the "
    "course again and pick a chapter (deep linking), or to set the custom parameter "
    "chapter=<chapter slug>."
)
UNKNOWN_CHAPTER = "This link opens the chapter “{slug}”, which this Distlab does not have."


class LaunchError(Exception):
    """A launch that was valid LTI but cannot be served; the message is for the user."""


@dataclass
class Launch:
    platform_id: int
    sub: str
    deployment_id: str
    deep_link: bool
    instructor: bool
    name: str = ""
    given_name: str = ""
    family_name: str = ""
    email: str = ""
    context_id: str = ""
    context_title: str = ""
    resource_link_id: str = ""
    chapter: str = ""  # slug; empty on a deep-linking launch
    ags: dict[str, Any] = field(default_factory=dict)
    deep_link_settings: dict[str, Any] = field(default_factory=dict)

    @property
    def platform(self) -> Platform:
        return Platform.objects.get(pk=self.platform_id)


def _chapter_slug(claims: dict[str, Any]) -> str:
    """The chapter a resource link opens: its custom parameter ``chapter``, else the
    chapter page its target link URI names."""
    custom = claims.get(CLAIM + "custom") or {}
    if isinstance(custom, dict) and isinstance(custom.get("chapter"), str):
        return custom["chapter"].strip()
    target = claims.get(CLAIM + "target_link_uri")
    if isinstance(target, str):
        try:
            match = resolve(urlparse(target).path)
        except Resolver404:
            return ""
        if match.view_name == "courses:chapter":
            return str(match.kwargs["slug"])
    return ""


def _text(value: Any, limit: int = 150) -> str:
    return value.strip()[:limit] if isinstance(value, str) else ""


def launch_read(message: MessageLaunch, platform: Platform) -> Launch:
    """What Distlab keeps of a launch pylti1p3 has validated (signature, audience,
    dates, nonce, deployment, message type)."""
    claims: dict[str, Any] = dict(message.get_launch_data())
    sub = _text(claims.get("sub"), 255)
    if not sub:
        raise LaunchError(
            "The LMS sent this launch without a user (no “sub”): anonymous "
            "launches are not supported."
        )
    context = claims.get(CLAIM + "context") or {}
    link = claims.get(CLAIM + "resource_link") or {}
    launch = Launch(
        platform_id=platform.pk,
        sub=sub,
        deployment_id=_text(claims.get(CLAIM + "deployment_id"), 255),
        deep_link=message.is_deep_link_launch(),
        instructor=message.check_teacher_access(),
        name=_text(claims.get("name")),
        given_name=_text(claims.get("given_name")),
        family_name=_text(claims.get("family_name")),
        email=_text(claims.get("email"), 254),
        context_id=_text(context.get("id"), 255) if isinstance(context, dict) else "",
        context_title=_text(context.get("title"), 255) if isinstance(context, dict) else "",
        resource_link_id=_text(link.get("id"), 255) if isinstance(link, dict) else "",
    )
    if launch.deep_link:
        launch.deep_link_settings = dict(claims.get(DEEP_LINK_CLAIM) or {})
        return launch
    launch.chapter = _chapter_slug(claims)
    if not launch.chapter:
        raise LaunchError(NO_CHAPTER)
    if not Chapter.objects.filter(slug=launch.chapter, retired_at__isnull=True).exists():
        raise LaunchError(UNKNOWN_CHAPTER.format(slug=launch.chapter))
    ags = claims.get(AGS_CLAIM)
    if isinstance(ags, dict) and isinstance(ags.get("lineitem"), str):
        launch.ags = {"lineitem": ags["lineitem"], "scope": list(ags.get("scope") or [])}
    return launch


# --- a launch waiting for a new user's choice ---------------------------------------------


def launch_park(launch: Launch) -> str:
    token = secrets.token_urlsafe(24)
    cache.set(f"lti:parked:{token}", asdict(launch), PARKED_SECONDS)
    return token


def launch_parked(token: str) -> Launch | None:
    data = cache.get(f"lti:parked:{token}") if token else None
    return Launch(**data) if isinstance(data, dict) else None


def launch_unpark(token: str) -> None:
    cache.delete(f"lti:parked:{token}")


# --- accounts --------------------------------------------------------------------------


def identity_user(launch: Launch) -> User | None:
    identity = (
        Identity.objects.select_related("user")
        .filter(platform_id=launch.platform_id, sub=launch.sub)
        .first()
    )
    return identity.user if identity and identity.user.is_active else None


def _username(launch: Launch) -> str:
    base = slugify(launch.email.split("@")[0] or launch.given_name or launch.name)[:20]
    base = base or "learner"
    for _ in range(20):
        candidate = f"{base}-{secrets.token_hex(2)}"
        if not User.objects.filter(username=candidate).exists():
            return candidate
    return f"{base}-{secrets.token_hex(6)}"


@transaction.atomic
def account_create(launch: Launch) -> User:
    """A new Distlab account for the platform's user (no password: they come through the
    LMS; they may set one with "Forgot your password" if the LMS gave an email)."""
    user = User(
        username=_username(launch),
        first_name=launch.given_name[:150] or launch.name[:150],
        last_name=launch.family_name[:150],
        email=launch.email,
    )
    user.set_unusable_password()
    user.save()
    identity_link(launch, user)
    return user


def identity_link(launch: Launch, user: User) -> Identity:
    """The platform's user is ``user`` from now on."""
    try:
        with transaction.atomic():
            identity, _ = Identity.objects.update_or_create(
                platform_id=launch.platform_id, sub=launch.sub, defaults={"user": user}
            )
    except IntegrityError:  # two first launches at once: the other one made it
        identity = Identity.objects.get(platform_id=launch.platform_id, sub=launch.sub)
    return identity


# --- after sign-in ---------------------------------------------------------------------


def _classroom(launch: Launch, user: User) -> Classroom | None:
    """The LMS course's classroom, made or joined as the launch's role says."""
    if not launch.context_id:
        return None
    context, _ = Context.objects.get_or_create(
        platform_id=launch.platform_id,
        context_id=launch.context_id,
        defaults={"title": launch.context_title},
    )
    context = Context.objects.select_for_update().get(pk=context.pk)
    title = launch.context_title or context.title or "LMS course"
    if launch.instructor:
        if user.role != User.Role.INSTRUCTOR and not user.is_superuser:
            user.role = User.Role.INSTRUCTOR
            user.save(update_fields=["role"])
        if context.classroom is None:
            context.classroom = Classroom.objects.create(owner=user, name=title[:120])
            context.save(update_fields=["classroom"])
        elif context.classroom.owner_id != user.pk:
            context.classroom.co_instructors.add(user)
        return context.classroom
    classroom = context.classroom
    if classroom is None or classroom.owner_id == user.pk:
        return classroom
    if classroom.co_instructors.filter(pk=user.pk).exists():
        return classroom
    membership, created = Membership.objects.get_or_create(classroom=classroom, user=user)
    if not created and membership.left_at is not None:
        membership.left_at = None
        membership.joined_at = timezone.now()
        membership.save(update_fields=["left_at", "joined_at"])
    return classroom


@transaction.atomic
def launch_finish(launch: Launch, user: User) -> str:
    """Everything a launch changes once its user is known; returns where they go next."""
    Identity.objects.filter(platform_id=launch.platform_id, sub=launch.sub).update(
        last_launch_at=timezone.now()
    )
    _classroom(launch, user)
    if launch.deep_link:
        return reverse("lti:deep_link")
    chapter = Chapter.objects.get(slug=launch.chapter)
    if launch.ags and SCORE_SCOPE in launch.ags.get("scope", []) and launch.resource_link_id:
        ScoreLink.objects.update_or_create(
            platform_id=launch.platform_id,
            user=user,
            resource_link_id=launch.resource_link_id,
            defaults={
                "sub": launch.sub,
                "chapter": chapter,
                "lineitem": launch.ags["lineitem"],
                "scopes": launch.ags["scope"],
            },
        )
        from apps.lti.scores import score_changed

        score_changed(user_id=user.pk, chapter_id=chapter.pk)
    return chapter.get_absolute_url()
