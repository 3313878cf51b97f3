"""``stepguard exec`` and ``stepguard config``.

``exec`` is the step runner: the whole lifecycle around a command, the receipt on stdout; SIGTERM
unwinds through cleanup. ``config`` shows or checks the effective settings.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

from stepguard.errors import ConfigurationError, StepguardError

__all__ = ["register"]

def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``exec`` and ``config``."""
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
    p.add_argument("--receipt-line", action="store_true",
                   help="print the receipt as one last line 'stepguard-receipt: {...}', also "
                        "when the step fails (how a pod hands its receipt back)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    p.set_defaults(func=_cmd_exec)

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


def _load_settings(path: str | None):  # type: ignore[no-untyped-def]
    from stepguard.settings import Settings

    return Settings.load(path if path else "auto")


def _cmd_exec(args: argparse.Namespace) -> int:
    from stepguard._private.signals import unwind_on
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
    # The step runner owns its process: SIGTERM (pod deletion, a cancelled run) unwinds through
    # every `finally`, so leases are revoked and sandboxes removed before it exits with 143.
    with unwind_on(signal.SIGTERM, take_over=True):
        try:
            receipt = run_step(spec, command=cmd, context=context, settings=settings)
        except StepguardError as err:
            failed = getattr(err, "receipt", None)
            if args.receipt_line and failed is not None:
                print(f"stepguard-receipt: {failed.to_json()}", flush=True)
            raise
    text = receipt.to_json(indent=2)
    if args.receipt_out:
        Path(args.receipt_out).write_text(text + "\n")
    if args.receipt_line:
        print(f"stepguard-receipt: {receipt.to_json()}", flush=True)
    else:
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
