"""The step runner as a pod/container entrypoint: credentials arrive as a single-use wrapped
token (minted and later revoked by the orchestrator) and are unwrapped inside, once.

No pod runs here (no Kubernetes API server): `stepguard exec` is started as the pod's command
would start it, with only the wrapping token and the Vault address in its environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from stepguard.credentials import AppRoleAuth, VaultConfig, open_session, wrap_for_delivery
from stepguard.spec import CredentialRequest, RunContext

pytestmark = [pytest.mark.services]

BODY = ('import os, pathlib\n'
        'ok = bool(os.environ.get("DB_USERNAME")) and bool(os.environ.get("DB_PASSWORD"))\n'
        'pathlib.Path(os.environ["STEPGUARD_OUTPUT_RESULT"], "ok").write_text(str(ok))\n')


def _runner(tmp_path, dev_stack, token, out):
    spec = tmp_path / "step.yaml"
    spec.write_text(json.dumps({"name": "train", "isolation": {"mode": "process"},
                                "outputs": [{"name": "result", "path": str(out)}]}))
    env = {"PATH": os.environ["PATH"], "VAULT_ADDR": dev_stack.vault_addr,
           "STEPGUARD_STATE_DIR": str(tmp_path / "state"), "STEPGUARD_AUDIT_EXPORTER": "none",
           "STEPGUARD_WRAPPED_CREDENTIALS": token}
    return subprocess.run([sys.executable, "-m", "stepguard.cli", "exec", "--spec", str(spec),
                           "--", sys.executable, "-c", BODY],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_wrapped_credentials_unwrap_once_inside_the_runner(tmp_path, dev_stack, dev_postgres):
    auth = AppRoleAuth(role_id=dev_stack.approle_role_id,
                       secret_id=dev_stack.approle_secret_id_file.read_text().strip())
    cfg = VaultConfig(addr=dev_stack.vault_addr, auth=auth)
    req = CredentialRequest(name="db", kind="database", role="stepguard-step")
    with open_session([req], settings=cfg, context=RunContext(step="train"), ttl_s=120) as s:
        token = wrap_for_delivery(s).token.get_secret_value()
        password = s.values["db"].reveal("password")

        first = _runner(tmp_path, dev_stack, token, tmp_path / "out1")
        assert first.returncode == 0, first.stderr
        assert (tmp_path / "out1" / "ok").read_text() == "True"
        receipt = json.loads(first.stdout)
        assert receipt["credentials"] == []  # the orchestrator's session owns those leases

        # Someone replays the token: refused as intercepted, the body never runs.
        second = _runner(tmp_path, dev_stack, token, tmp_path / "out2")
        assert second.returncode == 5
        assert "wrapped credentials refused" in second.stderr
        assert not (tmp_path / "out2" / "ok").exists()
        for proc in (first, second):
            assert password not in proc.stdout + proc.stderr
            assert token not in proc.stdout + proc.stderr
