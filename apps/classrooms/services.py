"""Writes for classrooms: creating one, its instructors, schedule and join codes,
learners joining, leaving and being removed (their progress always stays theirs)."""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from apps.accounts.models import User
from apps.classrooms.models import Classroom, JoinCode, Membership, ScheduleEntry
from apps.classrooms.selectors import join_code_find
from apps.courses.models import Chapter

NOT_AN_INSTRUCTOR = "Only instructors can create classrooms."
NAME_REQUIRED = "Give the classroom a name."
NAME_TOO_LONG = "A classroom's name is at most 120 characters."
BAD_QUOTA = "The sandbox quota must be a whole number from 0 to {max}, or empty for the default."
UNKNOWN_CODE = "No class has the code {code!r}. Check it with your instructor."
REVOKED_CODE = "The code {code!r} was revoked. Ask your instructor for a new one."
EXPIRED_CODE = (
    "The code {code!r} expired on {when:%Y-%m-%d %H:%M} UTC. Ask your instructor for a new one."
)
INSTRUCTOR_CANNOT_JOIN = "You teach {classroom}: instructors do not join their own class."
ALREADY_MEMBER = "You are already in {classroom}."
UNKNOWN_USERNAME = "No user named {username!r}."
CO_INSTRUCTOR_NOT_INSTRUCTOR = (
    "{username} is not an instructor: ask an admin to make them one first."
)
ALREADY_INSTRUCTOR = "{username} already teaches this classroom."
OWNER_STAYS = "The owner always teaches their classroom."
BAD_EXPIRY = "A code lasts from 1 to {max} days, or leave it empty for no expiry."
NOT_A_MEMBER = "{username} is not in this classroom."

MAX_QUOTA = 20
MAX_CODE_DAYS = 365
# No 0/O, 1/I/L: a code read aloud or off a projector is typed right the first time.
CODE_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
CODE_LENGTH = 8


class ClassroomError(ValueError):
    """A request that cannot be done; the message is for the person who asked."""


def _clean_name(name: str) -> str:
    name = " ".join(name.split())
    if not name:
        raise ClassroomError(NAME_REQUIRED)
    if len(name) > 120:
        raise ClassroomError(NAME_TOO_LONG)
    return name


def _check_quota(quota: int | None) -> int | None:
    if quota is not None and not 0 <= quota <= MAX_QUOTA:
        raise ClassroomError(BAD_QUOTA.format(max=MAX_QUOTA))
    return quota


@transaction.atomic
def classroom_create(*, owner: User, name: str, sandbox_quota: int | None = None) -> Classroom:
    """A new classroom owned by ``owner``, with a first join code."""
    if not (owner.is_instructor or owner.is_staff):
        raise ClassroomError(NOT_AN_INSTRUCTOR)
    classroom = Classroom.objects.create(
        owner=owner, name=_clean_name(name), sandbox_quota=_check_quota(sandbox_quota)
    )
    join_code_create(classroom=classroom, by=owner)
    return classroom


def classroom_update(*, classroom: Classroom, name: str, sandbox_quota: int | None) -> Classroom:
    classroom.name = _clean_name(name)
    classroom.sandbox_quota = _check_quota(sandbox_quota)
    classroom.save(update_fields=["name", "sandbox_quota"])
    return classroom


def classroom_instructor_add(*, classroom: Classroom, username: str) -> User:
    user = User.objects.filter(username=username.strip()).first()
    if user is None:
        raise ClassroomError(UNKNOWN_USERNAME.format(username=username.strip()))
    if not user.is_instructor:
        raise ClassroomError(CO_INSTRUCTOR_NOT_INSTRUCTOR.format(username=user.username))
    if user.pk == classroom.owner_id or classroom.co_instructors.filter(pk=user.pk).exists():
        raise ClassroomError(ALREADY_INSTRUCTOR.format(username=user.username))
    classroom.co_instructors.add(user)
    return user


def classroom_instructor_remove(*, classroom: Classroom, user_id: int) -> None:
    if user_id == classroom.owner_id:
        raise ClassroomError(OWNER_STAYS)
    classroom.co_instructors.remove(user_id)


def classroom_schedule_set(
    *, classroom: Classroom, chapter: Chapter, scheduled: bool, due_at: datetime | None
) -> ScheduleEntry | None:
    """Put a chapter on the schedule (with an optional due date), or take it off."""
    if not scheduled:
        ScheduleEntry.objects.filter(classroom=classroom, chapter=chapter).delete()
        return None
    entry, _ = ScheduleEntry.objects.update_or_create(
        classroom=classroom, chapter=chapter, defaults={"due_at": due_at}
    )
    return entry


def join_code_create(
    *, classroom: Classroom, by: User, expires_in_days: int | None = None
) -> JoinCode:
    if expires_in_days is not None and not 1 <= expires_in_days <= MAX_CODE_DAYS:
        raise ClassroomError(BAD_EXPIRY.format(max=MAX_CODE_DAYS))
    expires_at = None
    if expires_in_days is not None:
        expires_at = timezone.now() + timedelta(days=expires_in_days)
    for _ in range(10):
        code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
        try:
            with transaction.atomic():
                return JoinCode.objects.create(
                    classroom=classroom, code=code, created_by=by, expires_at=expires_at
                )
        except IntegrityError:  # the same code twice: draw again
            continue
    raise RuntimeError("could not draw a free join code")


def join_code_revoke(*, classroom: Classroom, code_id: int) -> JoinCode:
    code = JoinCode.objects.get(classroom=classroom, pk=code_id)
    if code.revoked_at is None:
        code.revoked_at = timezone.now()
        code.save(update_fields=["revoked_at"])
    return code


def join_code_check(*, code: str) -> JoinCode:
    """The join code a learner typed or followed, if it can be used now."""
    shown = code.strip()[:40]
    found = join_code_find(code=code)
    if found is None:
        raise ClassroomError(UNKNOWN_CODE.format(code=shown))
    if found.revoked_at is not None:
        raise ClassroomError(REVOKED_CODE.format(code=shown))
    if found.expires_at is not None and found.expires_at <= timezone.now():
        raise ClassroomError(EXPIRED_CODE.format(code=shown, when=found.expires_at))
    return found


@transaction.atomic
def classroom_join(*, user: User, code: str) -> Membership:
    """``user`` joins the classroom of ``code`` (again, if they had left)."""
    classroom = join_code_check(code=code).classroom
    if classroom.owner_id == user.pk or classroom.co_instructors.filter(pk=user.pk).exists():
        raise ClassroomError(INSTRUCTOR_CANNOT_JOIN.format(classroom=classroom.name))
    membership, created = Membership.objects.select_for_update().get_or_create(
        classroom=classroom, user=user
    )
    if not created:
        if membership.left_at is None:
            raise ClassroomError(ALREADY_MEMBER.format(classroom=classroom.name))
        membership.left_at = None
        membership.joined_at = timezone.now()
        membership.save(update_fields=["left_at", "joined_at"])
    return membership


def membership_end(*, classroom: Classroom, user_id: int) -> Membership:
    """A learner leaves (or is removed from) a classroom. Only the membership ends: what
    they read, answered and ran stays theirs, and comes back into view if they rejoin."""
    membership = Membership.objects.filter(
        classroom=classroom, user_id=user_id, left_at__isnull=True
    ).first()
    if membership is None:
        username = User.objects.filter(pk=user_id).values_list("username", flat=True).first()
        raise ClassroomError(NOT_A_MEMBER.format(username=username or "That user"))
    membership.left_at = timezone.now()
    membership.save(update_fields=["left_at"])
    return membership


INVITES_PER_HOUR = 500  # emails per classroom
TOO_MANY_INVITES = "At most {n} invitations an hour per classroom: send the rest later."
INVITE_SUBJECT = "Join {classroom} on Distlab"
INVITE_BODY = """{inviter} invites you to the class "{classroom}" on Distlab, a course on
distributed-systems design patterns you can break.

Join it here: {link}

If you have no account yet, the link lets you create one, then asks before joining.
If you did not expect this email, ignore it: nothing happens until you open the link.
"""


def classroom_invite(
    *, classroom: Classroom, by: User, emails: list[str], site: str
) -> tuple[JoinCode, int]:
    """Email the classroom's join link to each address (``site``: the scheme and host the
    links start with). Uses the newest live join code, or makes one. Returns the code and
    how many emails were sent."""
    from django.conf import settings
    from django.core.mail import send_mass_mail

    from apps.accounts.throttle import Limit

    limit = Limit("invites", INVITES_PER_HOUR, 3600)
    key = str(classroom.pk)
    if limit.used(key) + len(emails) > INVITES_PER_HOUR:
        raise ClassroomError(TOO_MANY_INVITES.format(n=INVITES_PER_HOUR))
    code = next((c for c in classroom.codes.order_by("-created_at", "-pk") if c.is_usable), None)
    if code is None:
        code = join_code_create(classroom=classroom, by=by)
    link = site.rstrip("/") + code.get_absolute_url()
    inviter = by.get_full_name() or by.username
    subject = INVITE_SUBJECT.format(classroom=classroom.name)
    body = INVITE_BODY.format(inviter=inviter, classroom=classroom.name, link=link)
    sent = send_mass_mail(
        [(subject, body, settings.DEFAULT_FROM_EMAIL, [address]) for address in emails],
        fail_silently=False,
    )
    for _ in range(sent):
        limit.hit(key)
    return code, sent
