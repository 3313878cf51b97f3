"""``stepguard credentials check`` against the dev stack: issues, revokes, prints no value."""

from __future__ import annotations

import argparse
import json

import pytest

from stepguard.cli._credentials import register

pytestmark = pytest.mark.services


def _run(argv):
    parser = argparse.ArgumentParser(prog="stepguard")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_check_issues_revokes_and_prints_no_value(dev_stack, tmp_path, monkeypatch, capsys,
                                                  probes):
    spec = tmp_path / "step.yaml"
    spec.write_text("name: train\npolicies: [stepguard-step]\ncredentials:\n"
                    "  - {name: db, kind: database, role: stepguard-step}\n")
    settings = tmp_path / "stepguard.yaml"
    settings.write_text(f"vault:\n  addr: {dev_stack.vault_addr}\n  auth: approle\n")
    monkeypatch.setenv("VAULT_ROLE_ID", dev_stack.approle_role_id)
    monkeypatch.setenv("VAULT_SECRET_ID_FILE", str(dev_stack.approle_secret_id_file))
    before = probes.dynamic_roles()
    assert _run(["credentials", "check", "--spec", str(spec), "--settings", str(settings),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["revocation_ok"] and out["credentials"][0]["revoked"]
    assert out["credentials"][0]["lease_id_hash"].startswith(("sha256:", "hmac-sha256:"))
    assert probes.dynamic_roles() <= before  # the user it made is gone again
    assert _run(["credentials", "check", "--spec", str(spec), "--settings", str(settings)]) == 0
    text = capsys.readouterr().out
    assert "revoked" in text and "password" not in text.lower()
