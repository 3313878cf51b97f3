"""How the lifecycle hands minted credentials to a command body, per isolation mode, against
real OpenBao: env or 0400 files on the sandbox's private tmpfs; and never values into a pod."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from stepguard.settings import PodSettings, Settings
from stepguard.spec import RunContext, StepSpec
from stepguard.step import run_step

pytestmark = [pytest.mark.services]

CANARY = "FileCanary/+=7-secret"


@pytest.fixture
def approle_env(dev_stack, monkeypatch, vault_client, tmp_path):
    vault_client.secrets.kv.v2.create_or_update_secret(
        path="stepguard/delivery-canary", secret={"token": CANARY}, mount_point="secret")
    monkeypatch.setenv("VAULT_ROLE_ID", dev_stack.approle_role_id)
    monkeypatch.setenv("VAULT_SECRET_ID_FILE", str(dev_stack.approle_secret_id_file))
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    return Settings.from_dict({"vault": {"addr": dev_stack.vault_addr, "auth": "approle"},
                               "audit": {"exporter": "none"},
                               "state_dir": str(tmp_path / "state")})


def _spec(tmp_path, mode, delivery):
    return StepSpec.from_dict({
        "name": "train", "isolation": {"mode": mode},
        "credentials": [{"name": "api", "kind": "kv", "path": "stepguard/delivery-canary",
                         "delivery": delivery}],
        "outputs": [{"name": "out", "path": str(tmp_path / "out" / "{run_id}")}],
    })


BODY = r"""
import json, os, pathlib, stat
out = pathlib.Path(os.environ["STEPGUARD_OUTPUT_OUT"])
path = os.environ.get("API_TOKEN_FILE")
info = {"env_has_value": any("FileCanary" in v for v in os.environ.values())}
if path:
    p = pathlib.Path(path)
    info.update(matches=p.read_text() == %r, mode=oct(stat.S_IMODE(p.stat().st_mode)))
(out / "seen.json").write_text(json.dumps(info))
"""


@pytest.mark.sandbox
@pytest.mark.parametrize("mode", ["sandbox", "process"])
def test_file_delivery_reaches_the_body_as_a_0400_file_not_env(tmp_path, approle_env, mode):
    if mode == "sandbox" and shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed")
    receipt = run_step(_spec(tmp_path, mode, "file"),
                       command=[sys.executable, "-c", BODY % CANARY], settings=approle_env,
                       context=RunContext(run_id=f"file-{mode}", step="train"))
    seen = json.loads((Path(receipt.output("out").path) / "seen.json").read_text())
    assert seen == {"env_has_value": False, "matches": True, "mode": "0o400"}
    assert CANARY not in receipt.to_json()


def test_pod_mode_hands_over_a_wrapped_token_never_values(tmp_path, approle_env, monkeypatch,
                                                          dev_stack):
    """No Kubernetes API server runs here: run_isolated is replaced at the pod boundary by a
    stand-in that records what the pod would receive, and unwraps the token as the pod's step
    runner would (real OpenBao)."""
    import stepguard.isolation as isolation
    from stepguard.credentials import VaultConfig, unwrap_delivery
    from stepguard.isolation import RunResult

    seen = {}

    def pod_boundary(command, spec, **kw):
        seen.update(env=dict(kw["env"]), wrapped=dict(kw["wrapped_token_env"] or {}))
        token = seen["wrapped"]["STEPGUARD_WRAPPED_CREDENTIALS"]
        delivered = unwrap_delivery(token, settings=VaultConfig(addr=dev_stack.vault_addr,
                                                                auth=None))
        seen["unwrapped"] = delivered.values["api"].reveal("token")
        # What the step runner in the pod prints last: its receipt.
        from stepguard.receipt import Receipt

        done = Receipt(step="train", context=RunContext(run_id="pod-1", step="train"),
                       status="succeeded")
        kw["stdout"].write(f"stepguard-receipt: {done.to_json()}\n".encode())
        return RunResult(exit_code=0, duration_s=0.0, mode="pod")

    monkeypatch.setattr(isolation, "run_isolated", pod_boundary)
    spec = StepSpec.from_dict({
        "name": "train", "isolation": {"mode": "pod", "network": []},
        "credentials": [{"name": "api", "kind": "kv", "path": "stepguard/delivery-canary"}]})
    settings = approle_env.with_overrides(
        pods=PodSettings(image="localhost/stepguard-runtime@sha256:" + "1" * 64))
    receipt = run_step(spec, command=["python", "-c", "pass"], settings=settings,
                       context=RunContext(run_id="pod-1", step="train"))
    assert receipt.status == "succeeded"
    assert seen["unwrapped"] == CANARY          # the pod's runner gets the value ...
    assert CANARY not in json.dumps(seen["env"])  # ... but no value is in the pod's env/spec
    assert not any(k.startswith("API_") for k in seen["env"])
