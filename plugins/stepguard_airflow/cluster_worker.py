"""Each task instance on its own disk: a worker-side listener for the cluster harness.

On a deployment with several workers (Celery, Kubernetes executors), consecutive tasks of one run
land on different hosts or pods: each starts in its own working directory with its own,
initially empty, stepguard state dir, and nothing reaches it from the producer's disk. With
LocalExecutor on one machine every task process would inherit the scheduler's working directory
and share one ``.stepguard``; this listener takes that sharing away so the one-machine run has
the shape of the multi-worker one.

It is enabled by ``$STEPGUARD_CLUSTER_WORKERS_DIR`` in the worker's environment (the harness of
:mod:`stepguard_airflow.cluster` sets it for the scheduler, whose LocalExecutor runs the tasks)
and is loaded from the private ``AIRFLOW_HOME``'s ``plugins/`` folder, never by the stepguard
plugin itself. In the task's own process, before any stepguard code runs (``tryfirst``: before
the stepguard audit listener opens the task span), it

* creates ``<workers dir>/<run id>/<task id>[-<map index>][-try<n>]/`` with ``work/`` and
  ``state/`` in it, fresh for every task instance (a retry gets its own, as it would land on
  another worker);
* makes ``work/`` the process's working directory and ``state/`` its stepguard state dir
  (``STEPGUARD_STATE_DIR``), with the audit log inside it (``STEPGUARD_AUDIT_PATH``);
* writes ``worker.json`` beside them: pid, process group, working and state dir, the task
  instance's keys -- how the harness and its tests prove every task ran apart.

Without the variable it does nothing.

>>> from types import SimpleNamespace
>>> ti = SimpleNamespace(run_id="manual__2026-01-01T00:00:00+00:00", task_id="train",
...                      map_index=-1, try_number=1)
>>> task_dir_name(ti)
'train'
>>> task_dir_name(SimpleNamespace(task_id="t", map_index=2, try_number=3))
't-2-try3'
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from airflow.listeners import hookimpl

from stepguard_airflow.cluster import ENV_WORKERS_DIR, WORKER_FILE, safe_name

__all__ = ["on_task_instance_running", "task_dir_name"]

log = logging.getLogger("stepguard.airflow.cluster")


def task_dir_name(ti: Any) -> str:
    """``<task id>[-<map index>][-try<n>]`` for a task instance."""
    name = safe_name(str(ti.task_id))
    map_index = getattr(ti, "map_index", -1)
    if map_index is not None and map_index >= 0:
        name += f"-{map_index}"
    try_number = getattr(ti, "try_number", 1) or 1
    if try_number > 1:
        name += f"-try{try_number}"
    return name


@hookimpl(tryfirst=True)
def on_task_instance_running(previous_state: Any, task_instance: Any) -> None:
    """Move this task process into its own working and state directory (see the module)."""
    base = os.environ.get(ENV_WORKERS_DIR)
    if not base:
        return
    ti = task_instance
    home = Path(base) / safe_name(str(ti.run_id)) / task_dir_name(ti)
    work, state = home / "work", home / "state"
    for d in (work, state):
        # A fresh directory: an existing one would mean two task instances share a disk.
        d.mkdir(parents=True, exist_ok=False, mode=0o700)
    os.chdir(work)
    os.environ["STEPGUARD_STATE_DIR"] = str(state)
    os.environ["STEPGUARD_AUDIT_PATH"] = str(state / "audit" / "audit.jsonl")
    record = {
        "pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0), "sid": os.getsid(0),
        "cwd": os.getcwd(), "state_dir": str(state), "dag_id": ti.dag_id,
        "run_id": ti.run_id, "task_id": ti.task_id, "map_index": ti.map_index,
        "try_number": ti.try_number,
    }
    (home / WORKER_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log.info("stepguard cluster: task %s runs in %s (state dir %s)", ti.task_id, work, state)
