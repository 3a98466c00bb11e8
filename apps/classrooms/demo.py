"""Demo data for `make run`: a classroom for the demo instructor and learner, and
(`manage.py demo_class`) a few more learners with progress, so the dashboard is filled."""

from __future__ import annotations

import random
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from apps.accounts.models import User
from apps.classrooms.models import Classroom, Membership
from apps.classrooms.services import classroom_create
from apps.courses.selectors import chapter_list_live
from apps.courses.services import chapter_mark_read, content_sync_if_changed, quiz_submit
from apps.labs.experiments import judge, pattern_values
from apps.labs.models import ExperimentRun
from apps.labs.patterns import PatternError, load_pattern

DEMO_CLASSROOM = "Demo class"
DEMO_LEARNERS = ("ada", "grace", "linus", "barbara", "edsger", "radia")


@transaction.atomic
def demo_classroom_ensure() -> Classroom | None:
    """The demo instructor's demo classroom, with the demo learner in it (made once)."""
    instructor = User.objects.filter(username="instructor").first()
    if instructor is None:
        return None
    classroom = Classroom.objects.filter(owner=instructor, name=DEMO_CLASSROOM).first()
    if classroom is None:
        classroom = classroom_create(owner=instructor, name=DEMO_CLASSROOM)
        learner = User.objects.filter(username="learner").first()
        if learner is not None:
            Membership.objects.get_or_create(classroom=classroom, user=learner)
    return classroom


@transaction.atomic
def demo_class_seed(*, seed: int = 12) -> tuple[Classroom, list[User]]:
    """Seed the demo classroom with learners who have read, answered and experimented
    (through the same services learners use). Idempotent: learners made before are kept."""
    content_sync_if_changed()
    classroom = demo_classroom_ensure()
    if classroom is None:
        raise LookupError("Run `manage.py demo_users` first: the demo instructor is missing.")
    rng = random.Random(seed)
    chapters = chapter_list_live()
    now = timezone.now()
    made = []
    for index, name in enumerate(DEMO_LEARNERS):
        user, created = User.objects.get_or_create(
            username=f"demo-{name}",
            defaults={"first_name": name.capitalize(), "email": f"demo-{name}@example.invalid"},
        )
        Membership.objects.get_or_create(classroom=classroom, user=user)
        if not created:
            continue
        user.set_unusable_password()
        user.last_login = now - timedelta(minutes=rng.randint(5, 60 * 24 * 3))
        user.save(update_fields=["password", "last_login"])
        made.append(user)
        reach = max(1, len(chapters) - 2 * index)  # some learners are further along
        for chapter in chapters[: rng.randint(1, reach)]:
            chapter_mark_read(user=user, chapter=chapter)
            for _ in range(rng.randint(1, 2)):
                answers = {
                    q["id"]: list(q["answers"])
                    if rng.random() < 0.7
                    else [next(o["id"] for o in q["options"] if o["id"] not in q["answers"])]
                    for q in chapter.quiz
                }
                quiz_submit(user=user, chapter=chapter, answers=answers)
            _seed_experiments(user=user, pattern_id=chapter.sandbox, rng=rng)
    return classroom, made


def _seed_experiments(*, user: User, pattern_id: str, rng: random.Random) -> None:
    try:
        experiments = load_pattern(pattern_id).experiments
    except PatternError:
        return
    values = pattern_values(pattern_id)
    for experiment in experiments:
        if rng.random() < 0.4:
            continue
        prediction = experiment.prediction
        if prediction.options:
            guess: object = rng.choice(prediction.options).id
        else:
            guess = float(rng.randint(int(prediction.min or 0), int(prediction.max or 100)))
        measured = {name: round(rng.uniform(0, 50), 1) for name in experiment.check.outputs}
        started = timezone.now() - timedelta(minutes=rng.randint(10, 600))
        try:
            verdict = judge(experiment, guess, measured, values)
        except (KeyError, ValueError, TypeError):
            continue
        ExperimentRun.objects.create(
            user=user,
            pattern=pattern_id,
            experiment=experiment.id,
            prediction=guess,
            state=ExperimentRun.State.CHECKED,
            started_at=started,
            finished_at=started + timedelta(seconds=experiment.duration_s),
            measured=measured,
            correct=verdict.correct,
            explanation=verdict.explanation,
        )
