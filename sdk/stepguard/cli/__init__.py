"""The ``stepguard`` command line.

Every expected failure is one line on stderr -- ``stepguard: error: <what>: <which>`` -- followed
by its findings and a hint, and an exit status by family: 2 bad input, 3 security verdict,
4 malformed manifest, 5 operational failure, 6 the step body failed. No tracebacks for those.

>>> from stepguard.cli import main
>>> main(["config", "check", "--no-probe", "--settings", "/nonexistent.yaml"])
2

Command groups and start-up
---------------------------

``stepguard exec`` is the entrypoint of every secured step and pod, so start-up is kept small:
only the module of the command being run is imported (``_CORE_GROUPS`` maps each core command
to its module). The full set -- every core group, then every group an installed package adds --
is built only for ``stepguard --help`` and for commands the core does not know.

A package adds a command through the ``stepguard.cli_groups`` entry-point group: the entry
point's name is the command, its value a function ``register(sub)`` that adds that command to
the :class:`argparse` subparsers and sets ``func(args) -> int`` as its handler. The Airflow
adapter adds ``lint`` this way and the dev stack (:mod:`stepguard.testing`) adds ``dev``::

    [project.entry-points."stepguard.cli_groups"]
    lint = "stepguard_airflow.lint:register"

``stepguard demo`` runs the example pipeline through the SDK alone (``--engine sdk``); an
adapter adds an engine through the ``stepguard.demo_engines`` group (see
:mod:`stepguard.cli._demo_command`). The core imports no adapter: it finds them through these
entry points.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from stepguard import __version__
from stepguard.errors import StepguardError

__all__ = ["main"]

if TYPE_CHECKING:
    _Sub = argparse._SubParsersAction[argparse.ArgumentParser]

#: Core command -> the module whose ``register(sub)`` adds it, in ``--help`` order.
_CORE_GROUPS: dict[str, str] = {
    "exec": "stepguard.cli._core",
    "demo": "stepguard.cli._demo_command",
    "config": "stepguard.cli._core",
    "manifest": "stepguard.cli._manifest",
    "credentials": "stepguard.cli._credentials",
    "sign": "stepguard.cli._signing",
    "verify": "stepguard.cli._signing",
    "registry": "stepguard.cli._signing",
    "pod": "stepguard.cli._pod",
    "audit": "stepguard.cli._audit",
    "trace": "stepguard.cli._trace",
}
#: The entry-point group through which installed packages add command groups.
_GROUPS_ENTRY_POINT = "stepguard.cli_groups"


def _entry_points(group: str) -> list[Any]:
    """The entry points of ``group`` from every installed distribution, first one per name.

    >>> [ep.name for ep in _entry_points("stepguard.no_such_group")]
    []
    """
    from importlib.metadata import entry_points as installed

    seen: set[str] = set()
    out: list[Any] = []
    for ep in installed(group=group):
        if ep.name not in seen:
            seen.add(ep.name)
            out.append(ep)
    return out


def _command_word(argv: Sequence[str]) -> tuple[str | None, bool]:
    """The command named in ``argv`` and whether top-level help was asked for before it."""
    for arg in argv:
        if arg in ("-h", "--help"):
            return None, True
        if not arg.startswith("-"):
            return arg, False
    return None, False


def _parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepguard",
        description="Secured ML pipeline steps: JIT credentials, verified data, isolated runs, "
        "signed models, audit trail.",
    )
    parser.add_argument("--version", action="version", version=f"stepguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    command, top_help = _command_word(argv)
    if command in _CORE_GROUPS:
        _register_module(_CORE_GROUPS[command], sub)
    elif command is not None or top_help:
        for module in dict.fromkeys(_CORE_GROUPS.values()):
            _register_module(module, sub)
        added = _entry_points(_GROUPS_ENTRY_POINT)
        chosen = [ep for ep in added if ep.name == command]
        # A command nobody adds: register every group, so the error lists every choice.
        for ep in chosen or added:
            _register_entry_point(ep, sub)
    # No command and no help: argparse answers --version, or says a command is required.
    return parser


def _register_module(module: str, sub: _Sub) -> None:
    importlib.import_module(module).register(sub)


def _load_entry_point(ep: Any) -> Any:
    """The object ``ep`` names; ``None`` when its own module is absent (a trimmed install)."""
    try:
        return ep.load()
    except ModuleNotFoundError as exc:
        # A missing dependency inside the module is a real error, not a trimmed install.
        # tests/sdk/core checks that every installed group loads.
        missing = exc.name or ""
        if not missing or not (ep.module == missing or ep.module.startswith(missing + ".")):
            raise
        return None


def _register_entry_point(ep: Any, sub: _Sub) -> None:
    register: Callable[[_Sub], None] | None = _load_entry_point(ep)
    if register is not None:
        register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = _parser(args_list).parse_args(args_list)
    try:
        status: int = args.func(args)
        return status
    except StepguardError as err:
        _print_error(err)
        return err.exit_code
    except KeyboardInterrupt:
        print("stepguard: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _print_error(err: StepguardError) -> None:
    print(f"stepguard: error: {err}", file=sys.stderr)
    for line in err.details[:50]:
        print(f"  - {line}", file=sys.stderr)
    if len(err.details) > 50:
        print(f"  ... and {len(err.details) - 50} more", file=sys.stderr)
    if err.hint:
        print(f"hint: {err.hint}", file=sys.stderr)
