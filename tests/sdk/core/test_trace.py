"""``stepguard trace`` on a pipeline run here for real (key-signed, no services): the walk from
the published model back to its data, the gate, every format, a tampered audit log, older and
newer audit records, and what is missing named by a typed error. The example pipeline on the
dev stack (Transit, database credentials, the object store) is traced in
tests/plugins/test_trace_example.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stepguard.cli import main
from stepguard.errors import EvidenceNotFound
from stepguard.settings import Settings
from stepguard.spec import RunContext, StepSpec
from stepguard.step import run_step

RUN = "run-trace-1"
DATA_RUN = "run-data-0"


@pytest.fixture
def pipeline(tmp_path, keys, monkeypatch):
    """ingest -> train (published, key-signed) -> gate (fetch verified under 'release'), all
    sharing one state dir and one audit log."""
    from stepguard.wiring import fetch_verified

    monkeypatch.chdir(tmp_path)
    for var in ("STEPGUARD_CONFIG", "STEPGUARD_STATE_DIR", "STEPGUARD_AUDIT_PATH"):
        monkeypatch.delenv(var, raising=False)
    cfg = {"state_dir": str(tmp_path / "state"),
           "audit": {"exporter": "jsonl", "path": str(tmp_path / "audit" / "audit.jsonl")},
           "registry": {"url": f"file://{tmp_path / 'registry'}"},
           "policies": {"release": {"kind": "key", "public_keys": [str(keys.public)]}}}
    (tmp_path / "stepguard.yaml").write_text(json.dumps(cfg))
    settings = Settings.from_dict(cfg)

    def ctx(step):
        return RunContext(pipeline="p", run_id=RUN, step=step)

    ingest = run_step(StepSpec.from_dict({
        "name": "ingest", "isolation": {"mode": "process"},
        "outputs": [{"name": "dataset", "path": str(tmp_path / "dataset")}]}),
        body=lambda env: (env.outputs["dataset"] / "churn.csv").write_text("a,b\n1,0\n"),
        settings=settings,  # the data came from an earlier run: found by walking back
        context=RunContext(pipeline="ingest", run_id=DATA_RUN, step="ingest"))
    (tmp_path / "ingest.receipt.json").write_text(ingest.to_json())
    train = run_step(StepSpec.from_dict({
        "name": "train", "isolation": {"mode": "process"},
        "inputs": [{"name": "dataset", "path": str(tmp_path / "dataset"),
                    "receipt": str(tmp_path / "ingest.receipt.json")}],
        "outputs": [{"name": "model", "path": str(tmp_path / "model"),
                     "publish": {"name": "churn-model", "version": "1.0"}}],
        "signing": {"signer": "key", "key": str(keys.private)}}),
        body=lambda env: (env.outputs["model"] / "weights.json").write_text('{"w": [1]}'),
        settings=settings, context=ctx("train"))
    gate = run_step(StepSpec.from_dict({
        "name": "gate", "isolation": {"mode": "process"},
        "outputs": [{"name": "serving", "path": str(tmp_path / "serving")}]}),
        body=lambda env: fetch_verified(settings, "churn-model", "1.0", policy="release",
                                        dest=env.outputs["serving"] / "churn-model"),
        settings=settings, context=ctx("gate"))
    return {"root": tmp_path, "settings": settings, "ingest": ingest, "train": train,
            "gate": gate}


def _trace(capsys, *args):
    code = main(["trace", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_trace_walks_from_the_model_back_to_its_data(pipeline, capsys):
    code, out, err = _trace(capsys, "churn-model@1.0", "--json")
    assert code == 0, err
    doc = json.loads(out)
    ingest, train = pipeline["ingest"], pipeline["train"]
    assert doc["schema"] == "https://stepguard.dev/trace/v1"
    assert doc["intact"] is True and doc["problems"] == []
    assert doc["model"]["digest"] == train.output("model").digest
    assert doc["run_ids"] == [DATA_RUN, RUN]
    assert [d["digest"] for d in doc["data"]] == [ingest.output("dataset").digest]
    assert {s["step"]: s["stage"] for s in doc["steps"]} == {
        "ingest": "data", "train": "train", "gate": "gate"}
    assert [c["kind"] for c in doc["chain"]] == [
        "data", "train", "model", "signature", "gate", "deploy"]
    published = train.output("model").published
    assert doc["signature"]["signer"] == published.signer
    assert doc["signature"]["bundle_matches"] is True
    assert doc["gate"]["step"] == "gate" and doc["gate"]["verdict"] == "pass"
    [log] = doc["audit"]
    assert log["intact"] and set(log["anchored_by"]) == {"ingest", "train", "gate"}
    checks = {(c["step"], c["name"]) for c in doc["steps"][1]["checks"]}
    assert ("train", "integrity.verified") in checks


def test_text_and_html(pipeline, capsys):
    code, text, _ = _trace(capsys, "churn-model@1.0")
    assert code == 0
    assert "record intact" in text
    assert pipeline["ingest"].output("dataset").digest in text
    assert "[PASS] gate" in text
    code, page, _ = _trace(capsys, "churn-model@1.0", "--html")
    assert code == 0 and page.startswith("<!DOCTYPE html>")
    assert page.count('class="stage"') == 6 and "<svg" in page
    for banned in ("<script", "src=", "<link", "http://", "https://"):
        assert banned not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


@pytest.mark.parametrize("damage", ["edit-a-byte", "drop-a-record"])
def test_a_tampered_audit_log_is_reported(pipeline, capsys, damage):
    log = Path(pipeline["settings"].audit_path)
    lines = log.read_bytes().splitlines(keepends=True)
    victim = next(i for i, line in enumerate(lines) if b'"integrity.verified"' in line)
    if damage == "edit-a-byte":
        lines[victim] = lines[victim].replace(b"integrity.verified", b"integrity.verifiet", 1)
    else:
        del lines[victim]
    log.write_bytes(b"".join(lines))
    code, out, err = _trace(capsys, "churn-model@1.0", "--json")
    assert code == 5
    [seg] = json.loads(out)["audit"]
    assert seg["intact"] is False and seg["location"] == str(log)
    assert seg["where"] == f"line {victim + 1} (record {victim})"
    assert ("edited" if damage == "edit-a-byte" else "deleted") in seg["error"]
    assert f"{log} at line {victim + 1}" in err
    code, text, _ = _trace(capsys, "churn-model@1.0")
    assert code == 5 and "TAMPERED" in text and "RECORD NOT INTACT" in text


def test_a_run_or_a_receipt_as_the_starting_point(pipeline, capsys):
    code, out, _ = _trace(capsys, "--run", RUN, "--json")
    assert code == 0
    assert [s["step"] for s in json.loads(out)["steps"]] == ["ingest", "train", "gate"]
    receipt = pipeline["root"] / "state" / "runs" / RUN / "train" / "receipt.json"
    code, out, _ = _trace(capsys, str(receipt), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["subject"] == f"receipt {receipt}"
    assert doc["model"]["name"] == "churn-model" and doc["signature"]["signer"]


def test_the_gate_policy_and_signer_come_from_the_audit_trail(pipeline, capsys):
    """The gate's policy, accepted signer and verdict are read from the signing.verify span the
    lifecycle itself wrote into the audit log (not from the receipt or the registry)."""
    log_path = pipeline["settings"].audit_path
    spans = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert any('"stepguard.signing.verify"' in json.dumps(s) for s in spans)
    signer = pipeline["train"].output("model").published.signer
    code, out, _ = _trace(capsys, "churn-model@1.0", "--json")
    assert code == 0
    gate = json.loads(out)["gate"]
    assert (gate["policy"], gate["signer"], gate["verdict"]) == ("release", signer, "pass")
    code, text, _ = _trace(capsys, "churn-model@1.0")
    assert "policy not recorded" not in text and "release" in text


def test_what_is_missing_is_named(pipeline, capsys, tmp_path):
    code, _, err = _trace(capsys, "churn-model@9.9")
    assert code == EvidenceNotFound.exit_code == 2
    assert "churn-model@9.9" in err and "model.sig" in err
    code, _, err = _trace(capsys, str(tmp_path / "gone" / "receipt.json"))
    assert code == 2 and "receipt not found" in err and str(tmp_path / "gone") in err
    code, _, err = _trace(capsys, "--run", "no-such-run")
    assert code == 2 and "no receipts of this run" in err and "no-such-run" in err
    code, _, err = _trace(capsys, "churn-model@1.0", "--registry",
                          f"file://{tmp_path / 'empty'}")
    assert code == 2 and "not in the registry" in err


def _loaded_after(argv, watch):
    import subprocess
    import sys

    code = ("import sys\nfrom stepguard.cli import main\ntry:\n"
            f"    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"print('loaded:' + ','.join(m for m in {watch!r} if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    return [m for m in proc.stdout.strip().splitlines()[-1].removeprefix("loaded:").split(",")
            if m]


def test_start_up_stays_lazy(tmp_path):
    heavy = ("boto3", "hvac", "airflow", "model_signing", "stepguard.integrity")
    assert _loaded_after(["trace", "--help"], (*heavy, "stepguard.forensics")) == []
    # A trace on this machine's disk loads no object-store or Vault client.
    assert _loaded_after(["trace", "m@1", "--registry", f"file://{tmp_path}",
                          "--receipts", str(tmp_path)], heavy) == []
    assert "trace" in _loaded_after(["trace", "--help"], ("stepguard.cli._trace",))[0]
