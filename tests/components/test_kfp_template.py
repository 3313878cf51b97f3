"""The example's pipeline template (dags_examples/templates/training.yaml) compiled to KFP: the
same controls as its Airflow rendering, run end to end through kfp.local's SubprocessRunner on
the real dev stack (OpenBao for the instance's credential and Transit signing), and the floor in
the pod's settings enforced by the step runner.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("kfp")
pytestmark = [
    pytest.mark.kfp, pytest.mark.services, pytest.mark.sandbox, pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:You may be attemping:RuntimeWarning"),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed"),
]

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "dags_examples" / "templates" / "training.yaml"
CANARY = "kfp-template-canary-93be"


def _train_code() -> str:
    spec = importlib.util.spec_from_file_location(
        "kfp_secure_training", ROOT / "dags_examples" / "kfp_secure_training.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return str(mod.TRAIN_CODE)


def _instance(template, root: Path, region: str, **over):
    from stepguard.integrity import create_manifest
    from stepguard.testing.examples import customer_rows, write_csv

    data = root / f"churn-{region}"
    data.mkdir()
    write_csv(data, customer_rows(90))
    manifest = root / f"churn-{region}.manifest.json"
    manifest.write_text(create_manifest(data).to_json())
    return template.instantiate(
        name=f"churn_{region}", model_name=f"churn-{region}", dataset=str(data),
        manifest=str(manifest), train_command=[sys.executable, "-c", _train_code()],
        credentials=[{"name": "tracking", "kind": "kv",
                      "path": f"stepguard/tracking/churn-{region}"}], **over)


@pytest.fixture
def env(dev_stack, pods_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import hvac

    from stepguard.template import PipelineTemplate

    client = hvac.Client(url=dev_stack.vault_addr, token=dev_stack.vault_root_token)
    client.secrets.kv.v2.create_or_update_secret(
        path="stepguard/tracking/churn-us", secret={"token": CANARY}, mount_point="secret")
    floor = PipelineTemplate.from_file(TEMPLATE).floor.to_dict()
    settings = {
        "vault": {"addr": dev_stack.vault_addr, "auth": "approle"},
        "registry": {"url": f"file://{tmp_path / 'registry'}"},
        "audit": {"exporter": "jsonl", "path": str(tmp_path / "audit" / "audit.jsonl")},
        "policies": {"release": {"kind": "transit", "key": "stepguard-signing",
                                 "min_version": 1}},
        "state_dir": str(tmp_path / "state"),
        "floor": floor,
    }
    (tmp_path / "stepguard.yaml").write_text(json.dumps(settings))
    monkeypatch.chdir(tmp_path)
    for var in ("VAULT_TOKEN", "BAO_TOKEN", "STEPGUARD_STATE_DIR", "STEPGUARD_AUDIT_EXPORTER",
                "STEPGUARD_AUDIT_PATH", "STEPGUARD_REGISTRY_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("STEPGUARD_CONFIG", str(tmp_path / "stepguard.yaml"))
    monkeypatch.setenv("VAULT_ADDR", dev_stack.vault_addr)
    monkeypatch.setenv("VAULT_ROLE_ID", dev_stack.approle_role_id)
    monkeypatch.setenv("VAULT_SECRET_ID_FILE", str(dev_stack.approle_secret_id_file))
    return tmp_path


def _receipts(state: Path, step: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(state.glob(f"runs/*/{step}/receipt.json"))]


def _run_local(pipeline, root: Path) -> str:
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               raise_on_error=True)
    return str(pipeline().output)


def _constant(node, name: str):
    """The compile-time constant given to parameter ``name`` anywhere in a pipeline IR."""
    if isinstance(node, dict):
        param = node.get("parameters", {}).get(name) if isinstance(
            node.get("parameters"), dict) else None
        if isinstance(param, dict) and "runtimeValue" in param:
            return param["runtimeValue"]["constant"]
        for value in node.values():
            found = _constant(value, name)
            if found is not None:
                return found
    if isinstance(node, list):
        for value in node:
            found = _constant(value, name)
            if found is not None:
                return found
    return None


@pytest.mark.usefixtures("pods_image")
def test_template_compiles_with_the_same_controls(tmp_path: Path) -> None:
    from kfp import compiler

    from stepguard.template import PipelineTemplate
    from stepguard_kfp.template import build_pipeline

    template = PipelineTemplate.from_file(TEMPLATE)
    names = set()
    for region in ("us", "eu"):
        pipeline = build_pipeline(_instance(template, tmp_path, region))
        out = tmp_path / f"{region}.yaml"
        compiler.Compiler().compile(pipeline, str(out))
        text = out.read_text()
        names.add(pipeline.name)
        # the training step as the template says, with this instance's own credential path
        ir = next(yaml.safe_load_all(text))
        train = json.loads(_constant(ir, "step_spec"))
        assert train["isolation"]["mode"] == "pod" and train["isolation"]["network"] == "none"
        assert train["deadline_s"] == 900
        assert train["credentials"][0]["path"] == f"stepguard/tracking/churn-{region}"
        assert _constant(ir, "signature_policy") == "release"
        assert _constant(ir, "signing_key") == "stepguard-signing"
    assert names == {"training-churn-us", "training-churn-eu"}


def test_template_instance_runs_locally(env: Path, capfd) -> None:
    from stepguard.receipt import Receipt
    from stepguard.template import PipelineTemplate
    from stepguard_kfp.template import build_pipeline

    pi = _instance(PipelineTemplate.from_file(TEMPLATE), env, "us")
    gate = Receipt.from_json(_run_local(build_pipeline(pi), env / "kfp-root"))
    assert gate.status == "succeeded" and gate.context.orchestrator == "kfp"
    (train,) = _receipts(env / "state", "train")
    (publish,) = _receipts(env / "state", "sign-and-publish")
    assert train["isolation"]["mode"] == "sandbox"  # kfp.local: the sandbox stands in for the pod
    assert [c["name"] for c in train["credentials"]] == ["tracking"]
    assert publish["outputs"][0]["published"]["name"] == "churn-us"
    assert gate.output("model").digest == train["outputs"][0]["digest"]
    metrics = json.loads((Path(gate.output("model").path) / "metrics.json").read_text())
    assert metrics["tracking_token_sha256"] == hashlib.sha256(CANARY.encode()).hexdigest()
    out, err = capfd.readouterr()
    assert CANARY not in out + err


def test_the_pods_floor_refuses_a_weakened_train_step(env: Path, monkeypatch) -> None:
    """An instance built against a laxer copy of the template (here: egress allowed) passes
    its own check, and the step runner refuses it against the floor in the pod's settings."""
    from dataclasses import replace

    from stepguard.floor import Floor
    from stepguard.template import PipelineTemplate
    from stepguard_kfp.template import build_pipeline

    lax = replace(PipelineTemplate.from_file(TEMPLATE), floor=Floor())
    pi = _instance(lax, env, "us", isolation={"network": ["pypi.org:443"]})
    with pytest.raises(RuntimeError, match="train"):
        _run_local(build_pipeline(pi), env / "kfp-root")
    (train,) = _receipts(env / "state", "train")
    assert train["status"] == "failed" and train["error"]["type"] == "PolicyViolation"
    assert train["error"]["message"].startswith("floor rule 'no-egress' violated")
    assert train["credentials"] == []
    assert _receipts(env / "state", "sign-and-publish") == []
