"""The env file works when sourced, and dev-stack secrets stay out of reprs and summaries."""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import urllib.parse
from dataclasses import replace

import pytest

from stepguard.testing import devstack
from stepguard.testing.devstack import DevStackInfo

pytestmark = pytest.mark.services


def secret_values(info: DevStackInfo) -> list[str]:
    values = [info.vault_root_token, info.aws_secret_access_key]
    if info.postgres is not None:
        values.append(info.postgres.admin_password)
    return values


def forms(value: str) -> list[str]:
    return [
        value, value.upper(), base64.b64encode(value.encode()).decode(),
        urllib.parse.quote(value, safe=""),
    ]


def test_env_file_is_private_and_sources_in_a_shell(dev_stack: DevStackInfo) -> None:
    mode = stat.S_IMODE(dev_stack.env_file.stat().st_mode)
    assert mode == 0o600
    text = dev_stack.env_file.read_text()
    assert "ROOT token" in text and "local development only" in text
    out = subprocess.run(
        ["bash", "-c", f'. "{dev_stack.env_file}" && echo "$VAULT_ADDR|$BAO_ADDR|'
         '$AWS_ENDPOINT_URL|$AWS_DEFAULT_REGION|${STEPGUARD_PG_PORT:-none}"'],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    pg_port = str(dev_stack.postgres.port) if dev_stack.postgres else "none"
    assert out == (
        f"{dev_stack.vault_addr}|{dev_stack.vault_addr}|{dev_stack.moto_endpoint}|"
        f"{dev_stack.aws_region}|{pg_port}"
    )
    env = devstack.load_env(dev_stack.state_dir)
    assert env["VAULT_TOKEN"] == dev_stack.vault_root_token
    assert env["AWS_ACCESS_KEY_ID"] == dev_stack.aws_access_key_id
    if dev_stack.postgres is not None:
        assert env["STEPGUARD_PG_DSN"] == dev_stack.postgres.admin_dsn


def test_env_clients_work(dev_stack: DevStackInfo) -> None:
    """What a user gets by sourcing the env file: boto3 and hvac configured by environment."""
    code = (
        "import boto3, hvac; "
        "assert hvac.Client().is_authenticated(); "
        "print(sorted(b['Name'] for b in boto3.client('s3').list_buckets()['Buckets'])[0])"
    )
    import sys

    out = subprocess.run(
        ["bash", "-c", f'. "{dev_stack.env_file}" && "{sys.executable}" -c "{code}"'],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "stepguard-data"


def test_secrets_absent_from_repr_summary_and_status_output(dev_stack: DevStackInfo) -> None:
    from stepguard.testing.devstack import _cli as cli_dev

    shown = [repr(dev_stack), str(dev_stack), json.dumps(dev_stack.public_summary())]
    if dev_stack.postgres is not None:
        shown.append(repr(dev_stack.postgres))
    import argparse
    import contextlib
    import io

    parser = argparse.ArgumentParser()
    cli_dev.register(parser.add_subparsers())
    for argv in (["dev", "status"], ["dev", "status", "--json"], ["dev", "env"]):
        args = parser.parse_args([*argv, "--state-dir", str(dev_stack.state_dir)])
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert args.func(args) == 0
        shown.append(buf.getvalue())
    for value in secret_values(dev_stack):
        for form in forms(value):
            for text in shown:
                assert form not in text


def test_state_file_round_trips(dev_stack: DevStackInfo) -> None:
    from stepguard.testing.devstack._info import DevStackInfo as Info

    assert Info.from_json(dev_stack.to_json()) == dev_stack
    assert replace(dev_stack, vault_root_token="x") != dev_stack
    assert stat.S_IMODE((dev_stack.state_dir / "state.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(dev_stack.state_dir.stat().st_mode) == 0o700
    # The dev server prints its root token at start: its log is private too.
    assert dev_stack.vault_root_token in (dev_stack.state_dir / "logs" / "openbao.log").read_text()
    for log in (dev_stack.state_dir / "logs").iterdir():
        assert stat.S_IMODE(log.stat().st_mode) == 0o600, log.name
