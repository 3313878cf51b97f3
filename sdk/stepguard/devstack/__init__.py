"""The local development stack: OpenBao, moto (IAM enforced) and PostgreSQL on 127.0.0.1.

``stepguard dev up`` and the test suite's ``dev_stack`` fixture run the same code: :func:`up`
starts the services on free loopback ports, each in its own session so they outlive the CLI,
records their pids, configures Vault (transit, database engine, identity tokens, AppRole and JWT
auth, least-privilege policies) and moto (admin user, buckets, a web-identity role), and writes
an env file clients can ``source``. :func:`down` stops exactly those pids and removes the state.

Everything here is for development only: the env file holds the dev server's root token.

>>> import tempfile
>>> from pathlib import Path
>>> from stepguard import devstack
>>> with tempfile.TemporaryDirectory() as tmp:
...     print(devstack.status(Path(tmp) / "dev"))
None
"""

from __future__ import annotations

from stepguard.devstack._info import DevStackInfo, PostgresInfo
from stepguard.devstack._stack import (
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
    "down",
    "find_bao",
    "load_env",
    "resolve_state_dir",
    "status",
    "up",
]
