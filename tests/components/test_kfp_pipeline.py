"""The example KFP pipeline (dags_examples/kfp_secure_training.py) end to end through
kfp.local's SubprocessRunner on the real dev stack (OpenBao for the credential and Transit
signing, a local registry), with the training body in the real bubblewrap sandbox.
"""

import base64
import hashlib
import importlib.util
import json
import shutil
import sys
import urllib.parse
from pathlib import Path

import pytest

pytest.importorskip("kfp")
pytestmark = [
    pytest.mark.kfp, pytest.mark.services, pytest.mark.sandbox, pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:You may be attemping:RuntimeWarning"),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed"),
]

ROOT = Path(__file__).resolve().parents[2]
CANARY = "kfp-tracking-canary-5d1f0c"


def _example():
    spec = importlib.util.spec_from_file_location(
        "kfp_secure_training", ROOT / "dags_examples" / "kfp_secure_training.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def example():
    return _example()


@pytest.fixture
def env(dev_stack, pods_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Settings and Vault login for the component processes, exactly as a pod would get them."""
    import hvac
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    root_client = hvac.Client(url=dev_stack.vault_addr, token=dev_stack.vault_root_token)
    root_client.secrets.kv.v2.create_or_update_secret(
        path="stepguard/tracking", secret={"token": CANARY}, mount_point="secret")
    other = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "other-team.pub").write_bytes(other)
    settings = {
        "vault": {"addr": dev_stack.vault_addr, "auth": "approle"},
        "registry": {"url": f"file://{tmp_path / 'registry'}"},
        "audit": {"exporter": "jsonl", "path": str(tmp_path / "audit" / "audit.jsonl")},
        "policies": {
            "release": {"kind": "transit", "key": "stepguard-signing", "min_version": 1},
            "other-team": {"kind": "key", "public_keys": [str(tmp_path / "other-team.pub")]},
        },
        "state_dir": str(tmp_path / "state"),
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


def _dataset(root: Path) -> tuple[Path, Path]:
    from stepguard.integrity import create_manifest

    data = root / "dataset"
    data.mkdir()
    lines = ["id,tenure,monthly,churned"]
    for i in range(120):
        tenure, monthly = (i * 37) % 72 + 1, 20 + (i * 53) % 100
        lines.append(f"{i},{tenure},{monthly},{int(monthly / 120 - tenure / 72 > 0.1)}")
    (data / "churn.csv").write_text("\n".join(lines) + "\n")
    manifest = root / "dataset.manifest.json"
    manifest.write_text(create_manifest(data).to_json())
    return data, manifest


def _args(example, data: Path, manifest: Path, **over):
    args = {"dataset_path": str(data), "manifest_path": str(manifest),
            "model_name": "churn-model", "model_version": "1",
            "train_command": [sys.executable, "-c", example.TRAIN_CODE]}
    args.update(over)
    return args


def _receipts(state: Path, step: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(state.glob(f"runs/*/{step}/receipt.json"))]


def _assert_no_canary(*roots: Path) -> None:
    forms = {CANARY, CANARY.upper(), base64.b64encode(CANARY.encode()).decode(),
             urllib.parse.quote(CANARY)}
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                blob = path.read_bytes()
                for form in forms:
                    assert form.encode() not in blob, f"credential leaked into {path}"


def test_pipeline_runs_to_success_and_receipts_chain(example, env: Path, capfd) -> None:
    from stepguard.receipt import Receipt

    data, manifest = _dataset(env)
    gate = Receipt.from_json(example.run_local(env / "kfp-root", **_args(example, data, manifest)))
    assert gate.status == "succeeded" and gate.context.orchestrator == "kfp"

    state = env / "state"
    (verify,) = _receipts(state, "verify-dataset")
    (train,) = _receipts(state, "train")
    (publish,) = _receipts(state, "sign-and-publish")
    dataset_digest = verify["inputs"][0]["digest"]
    # Chain of custody: train re-verified the very digest verify saw; publish re-verified the
    # trained model; the gate fetched exactly the published bytes.
    assert train["inputs"][0]["digest"] == dataset_digest and train["inputs"][0]["verified"]
    model_digest = train["outputs"][0]["digest"]
    assert publish["inputs"][0]["digest"] == model_digest
    assert publish["outputs"][0]["digest"] == model_digest
    assert gate.output("model").digest == model_digest
    assert publish["outputs"][0]["published"]["signer"].startswith("transit:")
    # kfp.local ignores platform settings; ours do not: the body ran in the sandbox.
    assert train["isolation"]["mode"] == "sandbox"
    assert train["context"]["orchestrator"] == "kfp"
    # The credential was minted for the train step only and reached the body.
    assert [c["name"] for c in train["credentials"]] == ["tracking"]
    assert verify["credentials"] == [] and publish["credentials"] == []
    metrics = json.loads((Path(gate.output("model").path) / "metrics.json").read_text())
    assert metrics["tracking_token_sha256"] == hashlib.sha256(CANARY.encode()).hexdigest()
    # Receipts, artifacts, audit log and task logs never carry the credential.
    out, err = capfd.readouterr()
    assert CANARY not in out + err
    _assert_no_canary(env / "kfp-root", state, env / "audit", env / "registry")
    # The gate reports the signer its policy accepted; the audit trail alone names the signer
    # and the verdict, in one trace for the whole KFP run, every span as documented.
    [check] = gate.verifications
    assert (check.kind, check.policy) == ("gate", "release")
    assert check.signer == publish["outputs"][0]["published"]["signer"]
    from stepguard import audit
    from stepguard.testing.spans import check_spans, read_span_table, records_from_log

    spans = records_from_log(env / "audit" / "audit.jsonl")
    problems = check_spans(spans, read_span_table(ROOT / "docs" / "reference" / "audit.md"))
    assert problems == [], "\n".join(sorted(set(problems)))
    trace_id, root = audit.run_trace_ids("kfp", gate.context.pipeline, gate.context.run_id)
    assert {s["trace_id"] for s in spans} == {trace_id}
    # Each component's step is a child of the run root (a runner inside a sandbox joins its
    # launcher's span through TRACEPARENT instead).
    children = {s["attributes"]["stepguard.step"] for s in spans
                if s["name"] == "stepguard.step" and s["parent_span_id"] == root}
    assert children == {"verify-dataset", "train", "sign-and-publish", "verify-model"}
    text = audit.show(env / "audit" / "audit.jsonl")
    assert f"signer {check.signer}" in text and "PASS signing.verified  policy=release" in text


def test_tampered_dataset_stops_at_verification_and_training_never_runs(
        example, env: Path) -> None:
    data, manifest = _dataset(env)
    csv_path = data / "churn.csv"
    lines = csv_path.read_text().splitlines()
    head, label = lines[5].rsplit(",", 1)
    lines[5] = f"{head},{1 - int(label)}"  # flip one label: poisoning
    csv_path.write_text("\n".join(lines) + "\n")

    with pytest.raises(RuntimeError, match="verify-dataset"):
        example.run_local(env / "kfp-root", **_args(example, data, manifest))
    (verify,) = _receipts(env / "state", "verify-dataset")
    assert verify["status"] == "failed" and verify["error"]["type"] == "IntegrityError"
    assert _receipts(env / "state", "train") == []
    # The training body's marker (its model files) was never created anywhere.
    assert not list(env.rglob("weights.json")) and not list(env.rglob("metrics.json"))
    assert not (env / "registry").exists() or not list((env / "registry").rglob("*"))


def test_gate_refuses_a_model_whose_signature_does_not_match_the_policy(
        example, env: Path) -> None:
    data, manifest = _dataset(env)
    with pytest.raises(RuntimeError, match="verify-model"):
        example.run_local(env / "kfp-root",
                          **_args(example, data, manifest, signature_policy="other-team"))
    (publish,) = _receipts(env / "state", "sign-and-publish")
    assert publish["status"] == "succeeded"  # it was signed -- by a key the policy refuses
    (gate,) = _receipts(env / "state", "verify-model")
    assert gate["status"] == "failed" and gate["error"]["type"] == "SignatureError"
    # Nothing reached the serving side.
    served = [p for p in (env / "kfp-root").rglob("*")
              if "verify-model" in p.parts and p.is_file() and p.name == "weights.json"]
    assert served == []
