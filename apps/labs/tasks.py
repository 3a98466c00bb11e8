"""Celery tasks for sandboxes: each takes ids, calls a service, and retries when the
engine is briefly unavailable. Launch and stop are late-acknowledged (settings), so a
worker dying mid-way gets the task redelivered, and the services adopt what exists."""

from __future__ import annotations

from celery import shared_task

from apps.labs import experiments, services
from apps.labs.engine import EngineError, EngineUnavailable


@shared_task(
    name="apps.labs.tasks.sandbox_launch_task",
    autoretry_for=(EngineUnavailable,),
    retry_backoff=2,
    max_retries=5,
)
def sandbox_launch_task(sandbox_id: str) -> str:
    try:
        return services.sandbox_start(sandbox_id=sandbox_id).state
    except (EngineError, TimeoutError):
        return "failed"  # recorded on the sandbox by the service


@shared_task(
    name="apps.labs.tasks.sandbox_stop_task",
    autoretry_for=(EngineUnavailable,),
    retry_backoff=2,
    max_retries=10,
)
def sandbox_stop_task(sandbox_id: str) -> str:
    return services.sandbox_teardown(sandbox_id=sandbox_id).state


@shared_task(
    name="apps.labs.tasks.fault_revert_task",
    autoretry_for=(EngineUnavailable,),
    retry_backoff=1,
    max_retries=10,
)
def fault_revert_task(fault_id: int) -> None:
    try:
        services.fault_revert(fault_id=fault_id)
    except EngineUnavailable:
        raise  # retried with backoff
    except EngineError:
        pass  # the fault stays active and shown; housekeeping retries it (fault_revert_due)


@shared_task(name="apps.labs.tasks.sandbox_reap_task")
def sandbox_reap_task() -> dict[str, int]:
    services.fault_revert_due()
    report = services.sandbox_reap()
    return {name: len(value) for name, value in report.__dict__.items()}


@shared_task(
    name="apps.labs.tasks.experiment_step_task",
    autoretry_for=(EngineUnavailable,),
    retry_backoff=1,
    max_retries=3,
)
def experiment_step_task(run_id: int, index: int) -> None:
    experiments.experiment_step(run_id=run_id, index=index)


@shared_task(
    name="apps.labs.tasks.experiment_check_task",
    autoretry_for=(experiments.CheckNotReady,),
    retry_kwargs={"countdown": experiments.CHECK_RETRY_S},
    max_retries=60,
)
def experiment_check_task(run_id: int) -> str | None:
    run = experiments.experiment_check(run_id=run_id)
    return run.state if run is not None else None
