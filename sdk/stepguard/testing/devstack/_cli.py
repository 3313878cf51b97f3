"""``stepguard dev``: start, inspect and stop the local development stack."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stepguard.errors import ConfigurationError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``dev`` command group (up, down, status, env)."""
    dev = sub.add_parser(
        "dev",
        help="local OpenBao + moto + PostgreSQL for development and tests",
        description="Start, inspect and stop the local dev stack (127.0.0.1, free ports).",
    )
    dev.set_defaults(func=_no_command(dev))
    actions = dev.add_subparsers(dest="dev_command", metavar="{up,down,status,env}")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help_text, description=help_text)
        parser.add_argument(
            "--state-dir", type=Path, default=None,
            help="state directory (default: $STEPGUARD_DEV_DIR or ./.stepguard/dev)",
        )
        return parser

    up = add("up", "start and configure the dev stack")
    up.add_argument("--no-postgres", action="store_true", help="do not start PostgreSQL")
    up.add_argument("--json", action="store_true", help="print the endpoints as JSON")
    up.set_defaults(func=_up)

    down = add("down", "stop everything 'dev up' started and remove its state")
    down.set_defaults(func=_down)

    status = add("status", "say whether a dev stack runs, and where")
    status.add_argument("--json", action="store_true", help="print the endpoints as JSON")
    status.set_defaults(func=_status)

    env = add("env", "print the path of the env file to source")
    env.set_defaults(func=_env)


def _no_command(parser: argparse.ArgumentParser) -> object:
    def handler(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return handler


def _summary(info: object) -> str:
    from stepguard.testing.devstack import DevStackInfo

    assert isinstance(info, DevStackInfo)
    pg = info.postgres
    lines = [
        f"OpenBao     {info.vault_addr}  (dev server, root token in the env file)",
        f"moto (AWS)  {info.moto_endpoint}  (IAM enforced; admin key {info.aws_access_key_id})",
        "PostgreSQL  "
        + (f"{pg.host}:{pg.port}/{pg.database}" if pg else "not started"),
        f"state       {info.state_dir}",
        f"env file    {info.env_file}",
        f"use it:     . {info.env_file}",
    ]
    return "\n".join(lines)


def _up(args: argparse.Namespace) -> int:
    from stepguard.testing import devstack

    info = devstack.up(args.state_dir, postgres=False if args.no_postgres else None)
    print(json.dumps(info.public_summary(), indent=2) if args.json else _summary(info))
    return 0


def _down(args: argparse.Namespace) -> int:
    from stepguard.testing import devstack

    sdir = devstack.resolve_state_dir(args.state_dir)
    was = (sdir / "processes.json").exists()
    devstack.down(sdir)
    print("dev stack stopped" if was else f"no dev stack in {sdir}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from stepguard.testing import devstack

    info = devstack.status(args.state_dir)
    if info is None:
        if args.json:
            print(json.dumps({"running": False}))
        else:
            print(f"no dev stack running in {devstack.resolve_state_dir(args.state_dir)}")
        return 1
    if args.json:
        print(json.dumps({"running": True, **info.public_summary()}, indent=2))
    else:
        print(_summary(info))
    return 0


def _env(args: argparse.Namespace) -> int:
    from stepguard.testing import devstack

    sdir = devstack.resolve_state_dir(args.state_dir)
    path = sdir / "env"
    if not path.is_file():
        raise ConfigurationError(
            "no dev stack env file", subject=str(path), hint="run 'stepguard dev up' first"
        )
    print(path)
    return 0
