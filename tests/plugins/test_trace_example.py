"""``stepguard trace`` on what the example DAG (``dags_examples/secure_training.py``) really
leaves behind, on the real dev stack: the model it published traced in all three formats on one
machine and through the object store, the JIT database password found in none of them, and a
tampered audit log or segment reported with the record that breaks it."""

from __future__ import annotations

import base64
import json
import shutil
import urllib.parse
import uuid
from pathlib import Path

import pytest

from stepguard.cli import main

pytestmark = [pytest.mark.airflow, pytest.mark.services, pytest.mark.sandbox, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "dags_examples" / "secure_training.py"
STEPS = ["ingest", "verify_dataset", "train", "sign_and_publish", "gate", "deploy"]


@pytest.fixture
def pipeline_env(airflow_run, stepguard_env, dev_stack, dev_postgres, monkeypatch):
    """The example's deployment: a settings file, AppRole login from the environment."""
    from stepguard.testing.examples import seed_customers

    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed")
    pg = dev_postgres
    seed_customers(host=pg.host, port=pg.port, dbname=pg.database, user=pg.admin_user,
                   password=pg.admin_password)
    root = stepguard_env
    (root / "stepguard.yaml").write_text(f"""
vault: {{addr: "{dev_stack.vault_addr}", auth: approle}}
registry: {{url: "file://{root / 'registry'}"}}
policies:
  release: {{kind: transit, key: stepguard-signing, min_version: 1}}
""")
    monkeypatch.setenv("STEPGUARD_CONFIG", str(root / "stepguard.yaml"))
    monkeypatch.setenv("VAULT_ADDR", dev_stack.vault_addr)
    monkeypatch.setenv("VAULT_ROLE_ID", dev_stack.approle_role_id)
    monkeypatch.setenv("VAULT_SECRET_ID_FILE", str(dev_stack.approle_secret_id_file))
    monkeypatch.setenv("STEPGUARD_SERVING_DIR", str(root / "serving"))
    monkeypatch.setenv("AIRFLOW_CONN_CHURN_DB", f"postgresql://{pg.host}:{pg.port}/{pg.database}")
    return root


def _run(airflow_run, capfd):
    """The example DAG with the minted database password recorded (the canary)."""
    module = airflow_run.load(EXAMPLE, "secure_training_trace")
    dag = module.secure_training
    seen: dict[str, str] = {}
    ingest = dag.task_dict["ingest"]
    real_fetch = ingest.fetch

    def spy(step_env, dest):
        seen["password"] = step_env.credentials["db"].reveal("password")
        return real_fetch(step_env, dest)

    ingest.fetch = spy
    dr = dag.test()
    out = capfd.readouterr().out
    assert airflow_run.states(dr) == dict.fromkeys(STEPS, "success"), out[-3000:]
    receipts = {s: airflow_run.xcom_of(dr, s) for s in STEPS}
    return receipts, seen["password"]


def _trace(capfd, *args):
    code = main(["trace", *args])
    out = capfd.readouterr()
    return code, out.out, out.err


def _no_canary(password, *texts):
    forms = {password, password.upper(), base64.b64encode(password.encode()).decode(),
             urllib.parse.quote(password)}
    for text in texts:
        for form in forms:
            assert form not in text


def test_trace_the_published_model_in_three_formats(airflow_run, pipeline_env, capfd):
    r, password = _run(airflow_run, capfd)
    published = r["sign_and_publish"]["outputs"][0]["published"]
    model = f"{published['name']}@{published['version']}"

    code, out, err = _trace(capfd, model, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["intact"] is True
    assert doc["model"]["digest"] == r["train"]["outputs"][0]["digest"]
    assert [d["digest"] for d in doc["data"]] == [r["ingest"]["outputs"][0]["digest"]]
    assert {s["step"]: s["stage"] for s in doc["steps"]} == {
        "ingest": "data", "verify_dataset": "data", "train": "train",
        "sign_and_publish": "signature", "gate": "gate", "deploy": "deploy"}
    assert [(c["kind"], c["verdict"]) for c in doc["chain"]] == [
        (k, "pass") for k in ("data", "train", "model", "signature", "gate", "deploy")]
    [cred] = [c for s in doc["steps"] for c in s["credentials"]]
    lease = r["ingest"]["credentials"][0]
    assert (cred["kind"], cred["lease_hash"], cred["state"]) == ("database", lease["lease"],
                                                                  "revoked")
    assert doc["signature"]["signer"] == published["signer"]
    assert doc["signature"]["signer"].startswith("transit:")
    assert doc["signature"]["bundle_matches"] is True
    assert doc["gate"]["verdict"] == "pass" and doc["gate"]["step"] == "gate"
    [log] = doc["audit"]
    assert log["intact"] and set(log["anchored_by"]) == set(STEPS)
    checks = [c for s in doc["steps"] for c in s["checks"]]
    assert all(c["passed"] for c in checks) and len(checks) >= 8
    assert any(c["name"] == "credentials.revoked" for c in checks)

    code, text, _ = _trace(capfd, model)
    assert code == 0 and "record intact" in text
    assert f"signer      {published['signer']}" in text
    assert "db (database)" in text and ": revoked" in text
    code, page, _ = _trace(capfd, model, "--html")
    assert code == 0 and page.startswith("<!DOCTYPE html>") and "<svg" in page
    assert page.count('data-verdict="pass"') == 6
    for banned in ("<script", "src=", "<link", "https://"):
        assert banned not in page
    _no_canary(password, out, text, page)

    # One byte of the audit log edited, then one record dropped: reported, with the record.
    log_path = pipeline_env / "audit.jsonl"
    original = log_path.read_bytes()
    lines = original.splitlines(keepends=True)
    victim = next(i for i, line in enumerate(lines) if b'"credentials.revoked"' in line)
    lines[victim] = lines[victim].replace(b"database", b"databasf", 1)
    log_path.write_bytes(b"".join(lines))
    code, out, err = _trace(capfd, model, "--json")
    assert code == 5
    [log] = json.loads(out)["audit"]
    assert not log["intact"] and log["where"] == f"line {victim + 1} (record {victim})"
    assert "edited" in log["error"] and str(log_path) in err
    lines = original.splitlines(keepends=True)
    del lines[victim]
    log_path.write_bytes(b"".join(lines))
    code, text, err = _trace(capfd, model)
    assert code == 5 and "TAMPERED" in text and "deleted" in text
    assert f"line {victim + 1}" in err


@pytest.fixture
def store_env(pipeline_env, dev_stack, monkeypatch):
    """The example in cluster shape: data, model and gate output through the object store, an
    S3 registry, signed receipts; the workers hold no AWS keys."""
    root = pipeline_env
    store = f"s3://stepguard-data/trace-{uuid.uuid4().hex[:8]}"
    (root / "stepguard.yaml").write_text(f"""
vault: {{addr: "{dev_stack.vault_addr}", auth: approle}}
registry: {{url: "{store}/registry"}}
receipts: {{signer: transit, key: stepguard-signing, policy: steps}}
policies:
  release: {{kind: transit, key: stepguard-signing, min_version: 1}}
  steps: {{kind: transit, key: stepguard-signing, min_version: 1}}
""")
    monkeypatch.setenv("STEPGUARD_EXAMPLE_STORE", store)
    monkeypatch.setenv("STEPGUARD_WEB_IDENTITY_ROLE_ARN", dev_stack.web_identity_role_arn)
    monkeypatch.setenv("AWS_ENDPOINT_URL", dev_stack.moto_endpoint)
    monkeypatch.setenv("AWS_REGION", dev_stack.aws_region)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    return store


def test_trace_through_the_object_store(airflow_run, pipeline_env, store_env, dev_stack,
                                        aws_admin_session, capfd, monkeypatch):
    r, password = _run(airflow_run, capfd)
    published = r["sign_and_publish"]["outputs"][0]["published"]
    model = f"{published['name']}@{published['version']}"
    # The investigator reads the store with their own credentials.
    creds = aws_admin_session.get_credentials()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds.secret_key)
    store = ["--receipts", store_env, "--receipts", str(pipeline_env / "state")]

    code, out, err = _trace(capfd, model, *store, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["model"]["registry"] == f"{store_env}/registry"
    assert doc["data"][0]["uri"].startswith(store_env + "/")
    assert doc["data"][0]["digest"] == r["ingest"]["outputs"][0]["digest"]
    stored = [s for s in doc["steps"] if s["receipt"].startswith(store_env)]
    assert {s["step"] for s in stored} == {"ingest", "train", "gate"}
    # Every receipt's signature verified under the settings' receipts policy (Transit).
    assert all(s["receipt_signed"] and s["receipt_verified"] for s in doc["steps"])
    lake = [c for s in doc["steps"] for c in s["credentials"] if c["name"] == "lake"]
    assert lake and {c["state"] for c in lake} <= {"expiring", "expired"}
    assert all(not c["revocable"] for c in lake)
    segments = {s["location"]: s for s in doc["audit"]}
    wanted = {r[s]["audit_segment"] for s in ("ingest", "train", "gate")}
    assert wanted <= set(segments) and all(segments[w]["intact"] for w in wanted)
    # The worker's own log holds the same spans as the segments: each check counts once.
    assert str(pipeline_env / "audit.jsonl") in segments
    ingest = next(s for s in doc["steps"] if s["step"] == "ingest")
    assert [c["name"] for c in ingest["checks"]].count("integrity.hashed") == 1
    code, page, _ = _trace(capfd, model, *store, "--html")
    code2, text, _ = _trace(capfd, model, *store)
    assert code == code2 == 0
    _no_canary(password, out, page, text)

    # From the training receipt alone, the walk finds the data's receipt beside the data.
    empty = pipeline_env / "nothing-here"
    empty.mkdir()
    train_receipt = r["train"]["outputs"][0]["path"].removesuffix("data/") + "receipt.json"
    code, out, err = _trace(capfd, train_receipt, "--receipts", str(empty), "--json")
    assert code == 0, err
    doc = json.loads(out)
    ingest = next(s for s in doc["steps"] if s["step"] == "ingest")
    assert ingest["receipt"].startswith(store_env) and ingest["stage"] == "data"
    assert doc["data"][0]["digest"] == r["ingest"]["outputs"][0]["digest"]

    # A stored receipt edited after it was signed: refused, named, and the record not intact.
    s3 = aws_admin_session.client("s3", endpoint_url=dev_stack.moto_endpoint)
    gate_key = r["gate"]["outputs"][0]["path"].removesuffix("data/")[len("s3://"):] \
        + "receipt.json"
    bucket, _, gate_key = gate_key.partition("/")
    signed = s3.get_object(Bucket=bucket, Key=gate_key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=gate_key,
                  Body=signed.replace(b'"status": "succeeded"', b'"status": "failed"', 1))
    code, out, err = _trace(capfd, model, *store, "--json")
    assert code == 5
    assert any("receipt of step gate" in p and "changed after it was signed" in p
               for p in json.loads(out)["problems"]), out[-2000:]
    assert "receipt of step gate" in err
    s3.put_object(Bucket=bucket, Key=gate_key, Body=signed)

    # One segment in the store edited, then one record dropped from it.
    uri = r["train"]["audit_segment"]
    bucket, _, key = uri[len("s3://"):].partition("/")
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=key, Body=body.replace(b'"sandbox"', b'"sandbax"', 1))
    code, out, err = _trace(capfd, model, *store, "--json")
    assert code == 5
    seg = {s["location"]: s for s in json.loads(out)["audit"]}[uri]
    assert not seg["intact"] and "edited" in seg["error"]
    assert seg["where"].startswith("line ") and seg["anchored_by"] == ["train"]
    assert uri in err
    lines = body.splitlines(keepends=True)
    s3.put_object(Bucket=bucket, Key=key, Body=b"".join(lines[:1] + lines[2:]))
    code, text, err = _trace(capfd, model, *store)
    assert code == 5 and "TAMPERED" in text and uri in err


def test_the_main_jobs_report_names_a_trace_that_works(tmp_path, dev_stack, dev_postgres):
    """``bash scripts/main.sh`` ends with the next command: it traces the model it published."""
    import os
    import shlex
    import subprocess
    import sys

    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed")
    run = subprocess.run([sys.executable, "-m", "stepguard_airflow.example", "--workdir",
                          str(tmp_path), "--dev-dir", str(dev_stack.state_dir)],
                         capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [nxt] = [ln.split("next", 1)[1].strip() for ln in run.stdout.splitlines()
             if ln.strip().startswith("next ")]
    assert nxt.startswith("stepguard trace churn-model@")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPGUARD_")}
    traced = subprocess.run([sys.executable, "-m", "stepguard.cli", *shlex.split(nxt)[1:]],
                            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert traced.returncode == 0, traced.stderr
    assert "record intact" in traced.stdout and "[PASS] gate" in traced.stdout
    assert ": revoked" in traced.stdout


def test_trace_of_a_run_stopped_by_tampered_data(airflow_run, pipeline_env, capfd):
    """The tampered variant: the trace shows where the run stopped, the failed check naming the
    file, and the attacker's task that ran without stepguard. The record itself is intact."""
    dag = airflow_run.load(EXAMPLE, "secure_training_trace_tampered").secure_training_tampered
    dr = dag.test()
    capfd.readouterr()
    assert airflow_run.states(dr)["verify_dataset"] == "failed"
    code, out, err = _trace(capfd, "--run", dr.run_id, "--json")
    assert code == 0, err
    doc = json.loads(out)
    chain = {c["kind"]: c["verdict"] for c in doc["chain"]}
    assert chain["data"] == "fail" and chain["train"] == chain["model"] == "not recorded"
    verify = next(s for s in doc["steps"] if s["step"] == "verify_dataset")
    assert verify["status"] == "failed" and verify["error"].startswith("IntegrityError")
    [failed] = [c for c in verify["checks"] if not c["passed"]]
    # the FAIL verdict the integrity control recorded, naming the file
    assert failed["name"] == "integrity.verified" and "churn.csv" in json.dumps(failed["details"])
    assert doc["unsecured"] == ["attacker_poisons_data_lake"]
    code, text, _ = _trace(capfd, "--run", dr.run_id)
    assert "[FAIL] data" in text and "attacker_poisons_data_lake  ran WITHOUT stepguard" in text
