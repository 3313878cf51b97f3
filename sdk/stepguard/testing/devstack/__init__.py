"""The local development stack: OpenBao, moto (IAM enforced) and PostgreSQL on 127.0.0.1.

``stepguard dev up`` and the test suite's ``dev_stack`` fixture run the same code: :func:`up`
starts the services on free loopback ports, each in its own session so they outlive the CLI,
records their pids, configures Vault (transit, database engine, identity tokens, AppRole and JWT
auth, least-privilege policies) and moto (admin user, buckets, a web-identity role), and writes
an env file clients can ``source``. :func:`down` stops exactly those pids and removes the state.

The process supervision the stack uses is public for other harnesses that start services (the
Airflow cluster harness): :class:`ProcessTable` (start detached in a session of its own, record
the pid at once, wait for readiness, stop with the service's signal then SIGKILL),
:func:`session_members`, :func:`pid_alive`, :func:`reap`, :func:`free_port`,
:func:`http_responds`, :func:`log_tail` and :func:`redact_in_logs` (values no log tail shows).

Everything here is for development only: the env file holds the dev server's root token.

>>> import tempfile
>>> from pathlib import Path
>>> from stepguard.testing import devstack
>>> with tempfile.TemporaryDirectory() as tmp:
...     print(devstack.status(Path(tmp) / "dev"))
None
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stepguard.testing.devstack._info import DevStackInfo, PostgresInfo
    from stepguard.testing.devstack._procs import (
        ProcessTable,
        free_port,
        http_responds,
        log_tail,
        pid_alive,
        reap,
        redact_in_logs,
        session_members,
    )
    from stepguard.testing.devstack._stack import (
        DEFAULT_DIR,
        ENV_DIR_VARIABLE,
        down,
        find_bao,
        load_env,
        resolve_state_dir,
        status,
        up,
    )

__all__ = [
    "DEFAULT_DIR",
    "ENV_DIR_VARIABLE",
    "DevStackInfo",
    "PostgresInfo",
    "ProcessTable",
    "down",
    "find_bao",
    "free_port",
    "http_responds",
    "load_env",
    "log_tail",
    "pid_alive",
    "reap",
    "redact_in_logs",
    "resolve_state_dir",
    "session_members",
    "status",
    "up",
]

_PROCS = ("ProcessTable", "free_port", "http_responds", "log_tail", "pid_alive", "reap",
          "redact_in_logs", "session_members")

# Resolved on first use, so that ``stepguard --help`` (which lists ``stepguard dev``) and
# importing this package stay light.
_LAZY = {name: "stepguard.testing.devstack._info" for name in ("DevStackInfo", "PostgresInfo")}
_LAZY.update({name: "stepguard.testing.devstack._procs" for name in _PROCS})
_LAZY.update({name: "stepguard.testing.devstack._stack" for name in __all__ if name not in _LAZY})


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
