"""Task-instance listener: one ``stepguard.task`` audit span for every task instance.

Secured or not, every task leaves a trace: tasks of stepguard operators are marked
``stepguard.secured=true``; any other task is ``true`` only if a stepguard step ran inside it,
else ``false`` -- which is how an audit finds the steps of a pipeline that still run unprotected.
The span is the current span while the task runs, so the step's own spans nest under it. Its
parent is the DAG run's root (:func:`stepguard.audit.run_context`: trace id and span id derived
from ``airflow``, the dag id and the run id), so every task of one DAG run -- on any worker, in
any process -- shares one trace. A mapped instance carries ``stepguard.map_index``.

The listener never fails a task: an audit problem is logged, the task goes on.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.listeners import hookimpl

log = logging.getLogger("stepguard.airflow.listener")

_open: dict[tuple[Any, ...], Any] = {}


def _key(ti: Any) -> tuple[Any, ...]:
    return (getattr(ti, "dag_id", None), getattr(ti, "run_id", None),
            getattr(ti, "task_id", None), getattr(ti, "map_index", -1),
            getattr(ti, "try_number", None))


def _enabled() -> bool:
    try:
        from airflow.sdk.configuration import conf

        return bool(conf.getboolean("stepguard", "listener_enabled", fallback=True))
    except Exception:
        return True


def _auditor() -> Any:
    from stepguard.audit import Auditor, setup_tracing
    from stepguard_airflow.hooks import StepguardHook

    settings = StepguardHook().get_settings()
    provider = setup_tracing(settings, install_signal_handlers=False)
    if provider is None:
        return None
    return Auditor(tracer_provider=provider)


def _secured(ti: Any) -> bool | None:
    task = getattr(ti, "task", None)
    if task is not None and getattr(type(task), "_stepguard_secured", False):
        return True
    # Unknown: decided at the end by whether a stepguard step ran inside the task.
    return None


@hookimpl
def on_task_instance_running(previous_state: Any, task_instance: Any) -> None:
    """Open the task span (Airflow calls this in the task's own process)."""
    if not _enabled():
        return
    try:
        auditor = _auditor()
        if auditor is None:
            return
        from stepguard.audit import pipeline_attributes, run_context, stepguard_attributes

        ti = task_instance
        map_index = getattr(ti, "map_index", -1)
        mapped = isinstance(map_index, int) and map_index >= 0
        attrs = pipeline_attributes(pipeline=str(ti.dag_id), run_id=str(ti.run_id),
                                    task=str(ti.task_id))
        attrs.update(stepguard_attributes(
            orchestrator="airflow", try_number=int(getattr(ti, "try_number", 1) or 1),
            operator=type(getattr(ti, "task", None)).__name__,
            map_index=map_index if mapped else None,
        ))
        # Every task of the DAG run is a child of the run root derived from the run's identity
        # (the same one the step inside computes), on whichever worker it runs.
        _open[_key(ti)] = auditor.begin_task(
            str(ti.task_id), secured=_secured(ti), attributes=attrs, activate=True,
            parent=run_context("airflow", str(ti.dag_id), str(ti.run_id)))
    except Exception as exc:
        log.warning("stepguard: could not open the audit span for this task (%s)",
                    type(exc).__name__)


def _close(task_instance: Any, state: str, error: Any = None) -> None:
    span = _open.pop(_key(task_instance), None)
    if span is None:
        return
    try:
        span.end(state, error)
    except Exception as exc:
        log.warning("stepguard: could not close the audit span for this task (%s)",
                    type(exc).__name__)


@hookimpl
def on_task_instance_success(previous_state: Any, task_instance: Any) -> None:
    """Close the task span as succeeded."""
    _close(task_instance, "success")


@hookimpl
def on_task_instance_failed(previous_state: Any, task_instance: Any, error: Any) -> None:
    """Close the task span as failed, with the error's type (never its text)."""
    _close(task_instance, "failed", type(error).__name__ if isinstance(error, BaseException)
           else "failed")


@hookimpl
def on_task_instance_skipped(previous_state: Any, task_instance: Any) -> None:
    """Close the task span as skipped."""
    _close(task_instance, "skipped")
