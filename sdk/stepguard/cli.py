"""The ``stepguard`` command line.

Every expected failure is one line on stderr -- ``stepguard: error: <what>: <which>`` -- followed
by its findings and a hint, and an exit status by family: 2 bad input, 3 security verdict,
4 malformed manifest, 5 operational failure, 6 the step body failed. No tracebacks for those.

>>> from stepguard.cli import main
>>> main(["config", "check", "--no-probe", "--settings", "/nonexistent.yaml"])
2
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from stepguard import __version__
from stepguard.errors import ConfigurationError, StepguardError

__all__ = ["main"]

# Command groups contributed by each area, in the order they appear in --help.
_AREA_MODULES = (
    "stepguard._private.cli_manifest",
    "stepguard.credentials._cli",
    "stepguard._private.cli_signing",
    "stepguard._private.cli_pod",
    "stepguard._private.cli_audit",
    "stepguard._private.cli_lint",
    "stepguard._private.cli_dev",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepguard",
        description="Secured ML pipeline steps: JIT credentials, verified data, isolated runs, "
        "signed models, audit trail.",
    )
    parser.add_argument("--version", action="version", version=f"stepguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("exec", help="run a command as a secured step (the step runner)")
    p.add_argument("--spec", required=True, help="step spec (YAML or JSON)")
    p.add_argument("--settings",
                   help="settings file (default: $STEPGUARD_CONFIG or ./stepguard.yaml)")
    p.add_argument("--pipeline", default=os.environ.get("STEPGUARD_PIPELINE", "adhoc"))
    p.add_argument("--run-id", default=os.environ.get("STEPGUARD_RUN_ID"))
    p.add_argument("--step-id", default=None, help="step id (default: the spec name)")
    p.add_argument("--try-number", type=int, default=1)
    p.add_argument("--orchestrator", choices=("cli", "airflow", "kfp", "python"),
                   default=os.environ.get("STEPGUARD_ORCHESTRATOR", "cli"),
                   help="what launched this step (recorded in the receipt and spans)")
    p.add_argument("--receipt-out", help="also write the receipt JSON to this file")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    p.set_defaults(func=_cmd_exec)

    p = sub.add_parser("demo", help="run the secured example pipeline end to end and report")
    p.add_argument("--engine", choices=("airflow", "sdk"), default="airflow",
                   help="airflow: the example DAG under Airflow (default); sdk: the same "
                        "pipeline through the SDK alone, without Airflow")
    p.add_argument("--workdir", default=None,
                   help="where to put the demo run (default: .stepguard/demo)")
    p.add_argument("--tampered", action="store_true",
                   help="tamper with the dataset after it was published: the pipeline must stop")
    p.add_argument("--keep-services", action="store_true", help="leave the dev stack running")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("config", help="show or check the effective settings")
    csub = p.add_subparsers(dest="config_cmd", metavar="ACTION")
    csub.required = True
    for name, helptext in (("show", "print the effective settings"),
                           ("check", "validate settings and probe Vault")):
        c = csub.add_parser(name, help=helptext)
        c.add_argument("--settings", help="settings file")
        if name == "check":
            c.add_argument("--no-probe", action="store_true", help="do not contact Vault")
        c.set_defaults(func=_cmd_config)

    for module in _AREA_MODULES:
        _register(module, sub)
    return parser


def _register(module: str, sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        # Only tolerate the command module itself being absent (a trimmed install); a missing
        # dependency inside it is a real error. tests/sdk/core checks every module is present.
        if exc.name != module:
            raise
        return
    mod.register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = _parser().parse_args(argv)
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


def _load_settings(path: str | None):  # type: ignore[no-untyped-def]
    from stepguard.settings import Settings

    return Settings.load(path if path else "auto")


def _terminate_as_exit(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds through every `finally`: leases are revoked, sandboxes removed.
    raise SystemExit(128 + signum)


def _cmd_exec(args: argparse.Namespace) -> int:
    from stepguard.spec import RunContext, StepSpec
    from stepguard.step import run_step

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise ConfigurationError("no command given", subject="exec",
                                 hint="stepguard exec --spec step.yaml -- python train.py")
    spec = StepSpec.from_file(args.spec)
    settings = _load_settings(args.settings)
    ctx_kwargs: dict[str, object] = {
        "pipeline": args.pipeline, "step": args.step_id or spec.name,
        "try_number": args.try_number, "orchestrator": args.orchestrator,
    }
    if args.run_id:
        ctx_kwargs["run_id"] = args.run_id
    context = RunContext(**ctx_kwargs)  # type: ignore[arg-type]
    previous = signal.signal(signal.SIGTERM, _terminate_as_exit)
    try:
        receipt = run_step(spec, command=cmd, context=context, settings=settings)
    finally:
        signal.signal(signal.SIGTERM, previous)
    text = receipt.to_json(indent=2)
    if args.receipt_out:
        Path(args.receipt_out).write_text(text + "\n")
    print(text)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    settings = _load_settings(args.settings)
    if args.config_cmd == "show":
        print(json.dumps(settings.to_dict(), indent=2, sort_keys=True))
        return 0
    if not args.no_probe:
        from stepguard.wiring import probe_vault

        probe_vault(settings)
    print("stepguard: settings OK")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.engine == "airflow":
        try:
            from stepguard_airflow.example import main as airflow_example
        except ImportError as exc:
            raise ConfigurationError(
                "the Airflow demo needs the airflow extra", subject="demo --engine airflow",
                hint="pip install 'stepguard[airflow]', or run: stepguard demo --engine sdk",
            ) from exc
        argv = ["--workdir", args.workdir or ".stepguard/demo"]
        argv += ["--tampered"] if args.tampered else []
        argv += ["--keep-services"] if args.keep_services else []
        status: int = airflow_example(argv)
        return status
    from stepguard._private.demo import run_demo

    return run_demo(workdir=args.workdir, tampered=args.tampered,
                    keep_services=args.keep_services)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
