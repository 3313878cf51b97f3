"""The component runtime without KFP in between: re-verification at the point of use (a dataset
changed after the verify task, a swapped manifest), the container entrypoint, and the gate's
refusal to run without a named policy. Real sandbox, no services (no credentials requested).
"""

import json
import shutil
import sys
from pathlib import Path

import pytest

MARKER_CODE = (
    "import os, pathlib; "
    "pathlib.Path(os.environ['STEPGUARD_OUTPUT_MODEL'], 'trained.marker').write_text('ran')"
)
SPEC = json.dumps({"name": "train", "deadline_s": 60, "isolation": {"mode": "pod"}})


def sandbox(test):
    """Needs bubblewrap: marked ``sandbox``, skipped where bwrap is not installed."""
    skip = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
    return pytest.mark.sandbox(skip(test))


@pytest.fixture
def verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A dataset, its manifest and the receipt of the verify-dataset step."""
    from stepguard.integrity import create_manifest
    from stepguard_kfp._runtime import verify_dataset_step

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STEPGUARD_CONFIG", raising=False)
    monkeypatch.setenv("STEPGUARD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("STEPGUARD_AUDIT_EXPORTER", "none")
    for var in ("KFP_POD_NAME", "KFP_POD_UID"):
        monkeypatch.delenv(var, raising=False)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text("x,y\n1,0\n2,1\n")
    manifest = tmp_path / "data.manifest.json"
    manifest.write_text(create_manifest(data).to_json())
    receipt = verify_dataset_step(dataset_path=str(data), manifest_path=str(manifest),
                                  manifest_out=str(tmp_path / "handed" / "manifest.json"))
    return data, tmp_path / "handed" / "manifest.json", receipt


def _train(tmp_path: Path, data: Path, manifest: Path, receipt: str):
    from stepguard_kfp._runtime import secure_train_step

    return secure_train_step(
        step_spec=SPEC, command=[sys.executable, "-c", MARKER_CODE], dataset_path=str(data),
        dataset_manifest=str(manifest), dataset_receipt=receipt,
        model_dir=str(tmp_path / "model"), manifest_out=str(tmp_path / "model.manifest.json"))


@sandbox
def test_train_runs_sandboxed_with_the_dataset_pinned(verified, tmp_path: Path) -> None:
    from stepguard.receipt import Receipt

    data, manifest, receipt = verified
    out = Receipt.from_json(_train(tmp_path, data, manifest, receipt))
    assert out.isolation["mode"] == "sandbox"
    assert out.inputs[0].digest == Receipt.from_json(receipt).inputs[0].digest
    assert (tmp_path / "model" / "trained.marker").read_text() == "ran"
    handed = json.loads((tmp_path / "model.manifest.json").read_text())
    assert handed == json.loads(Path(out.output("model").manifest).read_text())


@sandbox
def test_dataset_changed_after_verification_is_refused_before_training(
        verified, tmp_path: Path) -> None:
    data, manifest, receipt = verified
    (data / "extra.csv").write_text("poison\n")  # added between the verify and train tasks
    with pytest.raises(SystemExit) as info:
        _train(tmp_path, data, manifest, receipt)
    assert info.value.code == 3  # VerificationError family
    assert not (tmp_path / "model" / "trained.marker").exists()


@sandbox
def test_swapped_manifest_does_not_match_the_receipt(verified, tmp_path: Path, capfd) -> None:
    from stepguard.integrity import create_manifest

    data, manifest, receipt = verified
    (data / "train.csv").write_text("x,y\n1,1\n2,1\n")
    # The attacker re-made the manifest to match the poisoned data; the receipt pins the digest.
    manifest.write_text(create_manifest(data).to_json())
    with pytest.raises(SystemExit) as info:
        _train(tmp_path, data, manifest, receipt)
    assert info.value.code == 3
    assert "pinned digest" in capfd.readouterr().err
    assert not (tmp_path / "model" / "trained.marker").exists()


def test_failed_or_unverified_producer_receipt_is_refused(verified, tmp_path: Path) -> None:
    import dataclasses

    from stepguard.receipt import Receipt

    data, manifest, receipt = verified
    failed = dataclasses.replace(Receipt.from_json(receipt), status="failed").to_json()
    with pytest.raises(SystemExit) as info:
        _train(tmp_path, data, manifest, failed)
    assert info.value.code == 3
    r = Receipt.from_json(receipt)
    unverified = dataclasses.replace(
        r, inputs=(dataclasses.replace(r.inputs[0], verified=False),)).to_json()
    with pytest.raises(SystemExit):
        _train(tmp_path, data, manifest, unverified)
    assert not (tmp_path / "model").exists()


@sandbox
def test_container_entrypoint_writes_receipt_and_manifest(verified, tmp_path: Path) -> None:
    from stepguard.receipt import Receipt
    from stepguard_kfp.train import main

    data, manifest, receipt = verified
    rc = main(["--step-spec", SPEC, "--command-json", json.dumps([sys.executable, "-c",
                                                                 MARKER_CODE]),
               "--dataset-path", str(data), "--dataset-manifest", str(manifest),
               "--dataset-receipt", receipt, "--model-dir", str(tmp_path / "model"),
               "--manifest-out", str(tmp_path / "out" / "m.json"),
               "--receipt-out", str(tmp_path / "out" / "receipt"), "--run-id", "r-9"])
    assert rc == 0
    out = Receipt.from_json((tmp_path / "out" / "receipt").read_text())
    assert out.context.run_id == "r-9" and out.status == "succeeded"
    assert (tmp_path / "out" / "m.json").is_file()


def test_spec_may_not_redeclare_the_component_managed_names() -> None:
    from stepguard.errors import ConfigurationError
    from stepguard_kfp._runtime import build_train_spec

    spec = json.dumps({"name": "train", "outputs": [{"name": "model", "path": "/x"}]})
    with pytest.raises(ConfigurationError, match="must not declare"):
        build_train_spec(spec, dataset_path="/d", dataset_manifest="/m",
                         dataset_digest="sha256:" + "0" * 64, model_dir="/o")


def test_in_a_kfp_pod_the_pod_is_the_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    from stepguard_kfp._runtime import build_train_spec

    monkeypatch.setenv("KFP_POD_NAME", "p")
    monkeypatch.setenv("KFP_POD_UID", "u")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    spec = build_train_spec(SPEC, dataset_path="/d", dataset_manifest="/m",
                            dataset_digest="sha256:" + "0" * 64, model_dir="/o")
    assert spec.isolation.mode == "process"


def test_gate_without_a_named_policy_refuses_before_fetching(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from stepguard.receipt import OutputRecord, Receipt
    from stepguard.spec import RunContext
    from stepguard_kfp._runtime import verify_model_step

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STEPGUARD_CONFIG", raising=False)
    publish = Receipt(step="sign-and-publish", context=RunContext(), status="succeeded",
                      outputs=(OutputRecord(name="model", path="/m", digest="sha256:" + "1" * 64,
                                            manifest="/m.json"),)).to_json()
    for policy, needle in (("", "signature policy is required"),
                           ("release", "no such verification policy")):
        with pytest.raises(SystemExit) as info:
            verify_model_step(publish_receipt=publish, model_name="m", model_version="1",
                              signature_policy=policy, out_dir=str(tmp_path / "out"),
                              registry=f"file://{tmp_path}/reg")
        assert info.value.code == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@sandbox
def test_sigterm_reaches_the_runner_which_stops_the_body(verified, tmp_path: Path) -> None:
    """A cancelled KFP run / deleted pod: SIGTERM to the component process is forwarded to the
    step runner, which stops the sandboxed body and writes a failed receipt before exiting."""
    import os
    import signal
    import subprocess
    import time
    import uuid

    data, manifest, receipt = verified
    token = f"sleeper-{uuid.uuid4().hex[:8]}"
    body = ("import os, pathlib, time; "
            "pathlib.Path(os.environ['STEPGUARD_OUTPUT_MODEL'], 'started').write_text('1'); "
            f"time.sleep(120)  # {token}")
    (tmp_path / "receipt.json").write_text(receipt)
    driver = (
        "import sys, pathlib; from stepguard_kfp._runtime import secure_train_step; "
        f"secure_train_step(step_spec={SPEC!r}, command=[sys.executable, '-c', {body!r}], "
        f"dataset_path={str(data)!r}, dataset_manifest={str(manifest)!r}, "
        f"dataset_receipt=pathlib.Path({str(tmp_path / 'receipt.json')!r}).read_text(), "
        f"model_dir={str(tmp_path / 'model')!r}, manifest_out={str(tmp_path / 'mm.json')!r}, "
        "run_id='sigterm-run')")
    proc = subprocess.Popen([sys.executable, "-c", driver], env=dict(os.environ))
    started = tmp_path / "model" / "started"
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert started.exists(), "body never started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) != 0
    (path,) = (tmp_path / "state" / "runs" / "sigterm-run").glob("*/receipt.json")
    assert json.loads(path.read_text())["status"] == "failed"
    time.sleep(0.5)
    leftovers = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if token.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    leftovers.append(pid)
            except OSError:
                pass
    assert leftovers == [], "the body outlived the cancelled task"
