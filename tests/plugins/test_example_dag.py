"""The example DAG end to end through ``dag.test()`` on the real dev stack (OpenBao, PostgreSQL),
the tampered variant, and the canary: the JIT database password minted during the run is found
nowhere -- task logs, XCom, rendered template fields (the whole metadata DB file), spans,
receipts.
"""

from __future__ import annotations

import base64
import shutil
import urllib.parse
from pathlib import Path

import pytest

pytestmark = [pytest.mark.airflow, pytest.mark.services, pytest.mark.sandbox, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "dags_examples" / "secure_training.py"


def _seed(pg):
    from stepguard.testing.examples import seed_customers

    seed_customers(host=pg.host, port=pg.port, dbname=pg.database, user=pg.admin_user,
                   password=pg.admin_password)


@pytest.fixture
def pipeline_env(airflow_run, stepguard_env, dev_stack, dev_postgres, monkeypatch):
    """Settings as an operator would deploy them: a settings file, AppRole login from the env."""
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed")
    _seed(dev_postgres)
    root = stepguard_env
    cfg = root / "stepguard.yaml"
    cfg.write_text(f"""
vault: {{addr: "{dev_stack.vault_addr}", auth: approle}}
registry: {{url: "file://{root / 'registry'}"}}
policies:
  release: {{kind: transit, key: stepguard-signing, min_version: 1}}
""")
    monkeypatch.setenv("STEPGUARD_CONFIG", str(cfg))
    monkeypatch.setenv("VAULT_ADDR", dev_stack.vault_addr)
    monkeypatch.setenv("VAULT_ROLE_ID", dev_stack.approle_role_id)
    monkeypatch.setenv("VAULT_SECRET_ID_FILE", str(dev_stack.approle_secret_id_file))
    monkeypatch.setenv("STEPGUARD_SERVING_DIR", str(root / "serving"))
    monkeypatch.setenv("AIRFLOW_CONN_CHURN_DB",
                       f"postgresql://{dev_postgres.host}:{dev_postgres.port}/"
                       f"{dev_postgres.database}")
    return root


def _load(airflow_run, dag_id):
    module = airflow_run.load(EXAMPLE, "secure_training_example")
    return getattr(module, dag_id)


def test_example_pipeline_end_to_end_and_canary(airflow_run, pipeline_env, dev_postgres, pg_roles,
                                                capfd):
    dag = _load(airflow_run, "secure_training")
    seen = {}
    ingest = dag.task_dict["ingest"]
    real_fetch = ingest.fetch

    def spy(step_env, dest):  # records the canary, then runs the real body
        seen["user"] = step_env.credentials["db"].reveal("username")
        seen["password"] = step_env.credentials["db"].reveal("password")
        return real_fetch(step_env, dest)

    ingest.fetch = spy
    before = pg_roles()
    dr = dag.test()
    out = capfd.readouterr()
    states = airflow_run.states(dr)
    assert states == dict.fromkeys(
        ["ingest", "verify_dataset", "train", "sign_and_publish", "gate", "deploy"], "success"
    ), out.out[-4000:]

    r_ingest = airflow_run.xcom_of(dr, "ingest")
    r_verify = airflow_run.xcom_of(dr, "verify_dataset")
    r_train = airflow_run.xcom_of(dr, "train")
    r_pub = airflow_run.xcom_of(dr, "sign_and_publish")
    r_gate = airflow_run.xcom_of(dr, "gate")
    r_deploy = airflow_run.xcom_of(dr, "deploy")
    dataset = r_ingest["outputs"][0]["digest"]
    # the JIT database user existed only for the ingest task
    [lease] = r_ingest["credentials"]
    assert lease["kind"] == "database" and lease["revoked"] is True
    assert lease["lease"].startswith("sha256:")
    assert seen["user"] not in pg_roles()
    assert pg_roles() == before
    # chain of custody: each step verified its input against its producer's receipt
    assert r_verify["inputs"][0]["digest"] == dataset and r_verify["inputs"][0]["verified"]
    assert r_train["inputs"][0]["digest"] == dataset
    assert r_train["isolation"]["mode"] == "sandbox"
    model = r_train["outputs"][0]["digest"]
    assert r_pub["inputs"][0]["digest"] == model
    published = r_pub["outputs"][0]["published"]
    assert published["signer"].startswith("transit:")
    gate = airflow_run.xcom_of(dr, "gate", "gate")
    assert gate["policy"] == "release" and gate["signer"] == published["signer"]
    assert r_gate["outputs"][0]["digest"] == r_pub["outputs"][0]["digest"]
    assert r_deploy["inputs"][0]["digest"] == r_gate["outputs"][0]["digest"]
    serving = Path(r_deploy["outputs"][0]["path"])
    assert serving.is_relative_to(pipeline_env / "serving")
    assert (serving / "weights.json").is_file() and (serving / "metrics.json").is_file()

    # the audit trail: a span for every task, all secured
    audit = (pipeline_env / "audit.jsonl").read_text()
    assert audit.count('"name":"stepguard.task"') >= 6
    assert '"stepguard.secured":false' not in audit
    _audit_trail_alone_answers(pipeline_env / "audit.jsonl", dr, published, r_ingest, r_gate)

    # the canary: the minted password is nowhere
    pw = seen["password"]
    forms = {pw, pw.upper(), base64.b64encode(pw.encode()).decode(), urllib.parse.quote(pw)}
    files = [p for p in pipeline_env.rglob("*") if p.is_file()]
    files += [p for p in (airflow_run.home / "logs").rglob("*") if p.is_file()]
    files.append(airflow_run.home / "airflow.db")  # XCom, rendered fields, task state...
    blob = out.out + out.err + "".join(p.read_bytes().decode("latin-1") for p in files)
    assert len(files) > 10
    for form in forms:
        assert form not in blob


def _audit_trail_alone_answers(log, dr, published, r_ingest, r_gate):
    """After the run the audit trail alone names the signer (Transit key and version), the gate's
    policy verdict, carries artifact.* digests and hashed lease ids, in one trace for the run; and
    every span is as docs/reference/audit.md documents it."""
    from stepguard import audit
    from stepguard.testing.spans import check_spans, read_span_table, records_from_log

    spans = records_from_log(log)
    problems = check_spans(spans, read_span_table(REPO / "docs" / "reference" / "audit.md"))
    assert problems == [], "\n".join(sorted(set(problems)))
    trace_id, root = audit.run_trace_ids("airflow", "secure_training", str(dr.run_id))
    assert {s["trace_id"] for s in spans} == {trace_id}
    assert {s["parent_span_id"] for s in spans if s["name"] == "stepguard.task"} == {root}
    by_name: dict[str, list] = {}
    for s in spans:
        by_name.setdefault(s["name"], []).append(s["attributes"])
    signs = by_name["stepguard.signing.sign"]
    assert {a["stepguard.signing.signer"] for a in signs} == {published["signer"]}
    assert all(a["stepguard.signing.key"] == "transit:transit/stepguard-signing" and
               a["stepguard.signing.key.version"] >= 1 for a in signs)
    assert published["bundle_digest"] in {a["artifact.attestation.hash"] for a in signs}
    [gate] = [a for a in by_name["stepguard.signing.verify"] if a["stepguard.kind"] == "gate"]
    assert gate["stepguard.signing.policy"] == "release"
    assert gate["stepguard.signing.signer"] == published["signer"]
    assert r_gate["verifications"][0]["signer"] == published["signer"]
    hashes = {a.get("artifact.hash") for group in by_name.values() for a in group}
    assert r_ingest["outputs"][0]["digest"] in hashes and published is not None
    [acquire] = by_name["stepguard.credentials.acquire"]
    assert acquire["stepguard.credentials.lease_ids"] == [r_ingest["credentials"][0]["lease"]]
    text = audit.show(log)
    assert f"signer {published['signer']}" in text
    assert "PASS signing.verified  policy=release" in text
    assert "PASS credentials.revoked" in text


def test_tampered_data_stops_at_verification(airflow_run, pipeline_env, capfd):
    dag = _load(airflow_run, "secure_training_tampered")
    dr = dag.test()
    out = capfd.readouterr().out
    states = airflow_run.states(dr)
    assert states["attacker_poisons_data_lake"] == "success"
    assert states["verify_dataset"] == "failed"
    for task in ("train", "sign_and_publish", "gate", "deploy"):
        assert states[task] == "upstream_failed", states
    assert airflow_run.xcom_of(dr, "train") is None
    assert not (pipeline_env / "serving").exists() or not any((pipeline_env / "serving").rglob("*"))
    # one clear message naming the step, the verdict and the file
    assert "stepguard step 'verify_dataset' failed: IntegrityError" in out
    assert "churn.csv" in out


def test_minted_credentials_are_registered_with_airflows_masker(airflow_run, pipeline_env):
    """On the operator path every value minted for the step is registered with Airflow's secrets
    masker (which redacts task logs and rendered fields), derived forms included.

    Checked with ``airflow.sdk.log.redact`` inside the running task: ``dag.test()``'s in-process
    console output itself does not run the masker on Airflow 3.3.2 (even for values given to
    Airflow's own ``mask_secret``), so it cannot be the sink under test.
    """
    seen_file = pipeline_env / "seen.json"
    dag, _ = airflow_run.write(f"""
        import base64, json, pendulum
        from airflow.sdk import DAG
        from stepguard_airflow.operators import SecureStepOperator

        def careless(step_env):
            from airflow.sdk.log import redact

            pw = step_env.credentials["db"].reveal("password")
            b64 = base64.b64encode(pw.encode()).decode()
            open({str(seen_file)!r}, "w").write(json.dumps({{
                "pw": pw, "redacted": redact(f"dsn=postgresql://u:{{pw}}@db/x"),
                "redacted_b64": redact(f"auth={{b64}}"),
                "redacted_upper": redact(pw.upper())}}))

        with DAG("{{dag_id}}", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
            SecureStepOperator(task_id="careless", python_callable=careless, spec={{
                "credentials": [{{"name": "db", "kind": "database", "role": "stepguard-step"}}]}})
    """)
    dr = dag.test()
    assert airflow_run.states(dr) == {"careless": "success"}
    import json

    seen = json.loads(seen_file.read_text())
    seen_file.unlink()
    pw = seen["pw"]
    assert pw not in seen["redacted"] and "***" in seen["redacted"]
    assert "***" in seen["redacted_b64"] and "***" in seen["redacted_upper"]
    receipt = airflow_run.xcom_of(dr, "careless")
    assert pw not in json.dumps(receipt)
    assert receipt["credentials"][0]["revoked"] is True


def test_example_runner_prints_the_report(dev_stack, dev_postgres, tmp_path):
    """``python -m stepguard_airflow.example`` (the main job): fresh process, own AIRFLOW_HOME."""
    import subprocess
    import sys

    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed")
    r = subprocess.run([sys.executable, "-m", "stepguard_airflow.example", "--workdir",
                        str(tmp_path), "--dev-dir", str(dev_stack.state_dir)],
                       capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "signed    by transit:" in r.stdout
    assert "chain intact" in r.stdout
    assert ": revoked" in r.stdout


@pytest.fixture
def store_env(pipeline_env, dev_stack, monkeypatch):
    """The example in cluster shape: data and model through the object store, an S3 registry,
    receipts signed with Transit and verified by every consumer; no AWS keys on the worker."""
    import uuid

    root = pipeline_env
    store = f"s3://stepguard-data/example-{uuid.uuid4().hex[:8]}"
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


def test_example_through_the_object_store(airflow_run, pipeline_env, store_env, capfd):
    dag = _load(airflow_run, "secure_training")
    dr = dag.test()
    out = capfd.readouterr().out
    steps = ["ingest", "verify_dataset", "train", "sign_and_publish", "gate", "deploy"]
    assert airflow_run.states(dr) == dict.fromkeys(steps, "success"), out[-4000:]
    r = {s: airflow_run.xcom_of(dr, s) for s in steps}
    for producer in ("ingest", "train", "gate"):
        rec = r[producer]["outputs"][0]
        assert rec["path"].startswith(store_env + "/") and rec["manifest"].startswith(store_env)
        assert r[producer]["audit_segment"].startswith(store_env + "/")
    for step in steps:
        assert r[step]["signature"]  # every receipt signed; every consumer verified one
    assert r["train"]["inputs"][0]["path"] == r["ingest"]["outputs"][0]["path"]
    assert r["train"]["inputs"][0]["digest"] == r["ingest"]["outputs"][0]["digest"]
    assert r["sign_and_publish"]["outputs"][0]["published"]["uri"].startswith(
        store_env + "/registry")
    assert r["deploy"]["inputs"][0]["digest"] == r["gate"]["outputs"][0]["digest"]


def test_example_through_the_object_store_stops_tampered_data(airflow_run, pipeline_env,
                                                              store_env, capfd):
    dag = _load(airflow_run, "secure_training_tampered")
    dr = dag.test()
    out = capfd.readouterr().out
    states = airflow_run.states(dr)
    assert states["attacker_poisons_data_lake"] == "success", out[-3000:]
    assert states["verify_dataset"] == "failed" and states["train"] == "upstream_failed"
    assert "stepguard step 'verify_dataset' failed: IntegrityError" in out
    assert "churn.csv" in out
