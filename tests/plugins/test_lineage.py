"""OpenLineage events of secured tasks, captured as a backend receives them.

Real ``dag.test()`` runs in a fresh process with the Airflow OpenLineage provider enabled
through its own configuration (``[openlineage] transport`` = the OpenLineage client's file
transport), so the provider's listener, extractor and client emit the events; the test reads
the JSON lines the client wrote and compares stepguard's facets with the receipts in XCom and
with the facets' JSON Schemas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = [pytest.mark.airflow, pytest.mark.slow]

RUN = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("dagfile", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session
from sqlalchemy import select
runs, xcoms = {}, {}
for dag_id in sys.argv[2:]:
    dr = getattr(module, dag_id).test()
    runs[dag_id] = dr.run_id
    with create_session() as session:
        for row in session.scalars(select(XComModel).where(
                XComModel.dag_id == dr.dag_id, XComModel.run_id == dr.run_id)):
            xcoms.setdefault(dag_id, {}).setdefault(row.task_id, {})[row.key] = \
                XComModel.deserialize_value(row)
print("RUNS=" + json.dumps(runs))
print("XCOMS=" + json.dumps(xcoms, default=str))
"""


def _own_metadata_db(home: Path, root: Path) -> dict[str, str]:
    """A copy of the session's migrated metadata DB for a run in another process: a second
    process writing the SQLite file the test process holds connections to corrupted it
    ("database disk image is malformed") after enough runs."""
    import sqlite3

    target = root / "airflow-subprocess.db"
    src, dst = sqlite3.connect(home / "airflow.db"), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    return {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{target}"}

DAGS = """
import pendulum
from pathlib import Path
from airflow.sdk import DAG
from airflow.providers.standard.operators.python import PythonOperator
from stepguard_airflow.operators import (IngestDatasetOperator, SecureStepOperator,
    SignAndPublishModelOperator, VerifyDatasetOperator, VerifyModelOperator)

def train(step_env):
    rows = (step_env.inputs["dataset"] / "churn.csv").read_text().splitlines()
    (step_env.outputs["model"] / "weights.json").write_text('{{"rows": %d}}' % len(rows))

def tamper(receipt):
    Path(receipt["outputs"][0]["path"], "churn.csv").write_text("id,churned\\n1,1\\n")

start = pendulum.datetime(2024, 1, 1)
with DAG("{dag_id}", schedule=None, start_date=start) as chain:
    ingest = IngestDatasetOperator(task_id="ingest", dataset="churn", version="1",
                                   source={source!r})
    verify = VerifyDatasetOperator(task_id="verify", dataset=ingest.output)
    fit = SecureStepOperator(task_id="train", python_callable=train,
                             spec={{"inputs": [{{"name": "dataset"}}],
                                   "outputs": [{{"name": "model", "path": "model"}}]}},
                             receipts={{"dataset": ingest.output}})
    publish = SignAndPublishModelOperator(task_id="publish", model=fit.output, name="churn",
                                          version="1", registry={registry!r},
                                          signing={{"signer": "key", "key": {key!r}}})
    gate = VerifyModelOperator(task_id="gate", model=publish.output, policy="release")
    ingest >> verify >> fit >> publish >> gate

with DAG("{dag_id}_tampered", schedule=None, start_date=start) as tampered:
    ingest = IngestDatasetOperator(task_id="ingest", dataset="churn", version="1",
                                   source={source!r})
    attack = PythonOperator(task_id="attack", python_callable=tamper, op_args=[ingest.output])
    verify = VerifyDatasetOperator(task_id="verify", dataset=ingest.output)
    ingest >> attack >> verify
"""


@pytest.fixture
def lineage_run(airflow_run, stepguard_env, monkeypatch):
    """Run DAGs of one file in a fresh process with OpenLineage on; return (events, runs)."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    root = stepguard_env
    key = ec.generate_private_key(ec.SECP256R1())
    (root / "k.pem").write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                                   ser.NoEncryption()))
    (root / "k.pub").write_bytes(key.public_key().public_bytes(
        ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    (root / "stepguard.yaml").write_text(
        f"policies:\n  release: {{kind: key, public_keys: [{root / 'k.pub'}]}}\n")
    monkeypatch.setenv("STEPGUARD_CONFIG", str(root / "stepguard.yaml"))
    source = root / "source"
    source.mkdir()
    (source / "churn.csv").write_text("id,churned\n1,0\n2,1\n3,0\n")
    events_file = root / "openlineage.jsonl"

    def run(*suffixes: str):
        dag, dag_id = airflow_run.write(DAGS.format(
            dag_id="{dag_id}", source=str(source), key=str(root / "k.pem"),
            registry=f"file://{root / 'registry'}"))
        env = {**os.environ, "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(events_file), "append": True}),
            **_own_metadata_db(airflow_run.home, root)}
        path = airflow_run.home / "dags" / f"{dag_id}.py"
        r = subprocess.run([sys.executable, "-c", RUN, str(path), *suffixes],
                           capture_output=True, text=True, timeout=600, env=env, cwd=root)
        assert r.returncode == 0, r.stderr[-3000:]
        runs = json.loads(r.stdout.rsplit("RUNS=", 1)[1].splitlines()[0])
        xcoms = json.loads(r.stdout.rsplit("XCOMS=", 1)[1].splitlines()[0])
        events = [json.loads(line) for line in events_file.read_text().splitlines()]
        return dag_id, runs, events, xcoms

    return run


def _task_event(events, dag_id, task_id, kind):
    found = [e for e in events if e["job"]["name"] == f"{dag_id}.{task_id}"
             and e["eventType"] == kind]
    assert len(found) == 1, [(e["job"]["name"], e["eventType"]) for e in events]
    return found[0]


def _schema_check(facet_key, facet):
    import jsonschema

    from stepguard_airflow import facets

    name = facets.FACET_KEYS[facet_key]
    assert facet["_schemaURL"] == facets.schema_url(name)
    assert facet["_producer"] == facets.PRODUCER
    schema = json.loads(facets.schema_path(name).read_text())
    body = schema["$defs"][name]["allOf"][1]
    jsonschema.validate(facet, body)


def _by_ns_name(datasets):
    return {(d["namespace"], d["name"]): d["facets"] for d in datasets}


def test_complete_events_carry_the_receipts_digests_signer_and_gate_verdict(
        airflow_run, lineage_run):
    dag_id, runs, events, xcoms = lineage_run("chain")
    run = SimpleNamespace(dag_id=dag_id, run_id=runs["chain"])
    receipts = {t: xcoms["chain"].get(t, {}).get("return_value")
                for t in ("ingest", "verify", "train", "publish", "gate")}
    assert all(r is not None for r in receipts.values()), receipts
    job = run.dag_id

    # ingest: the dataset it wrote, hashed, with the receipt's digest
    ev = _task_event(events, job, "ingest", "COMPLETE")
    out = receipts["ingest"]["outputs"][0]
    (ds,) = ev["outputs"]
    assert (ds["namespace"], ds["name"]) == ("file", out["path"])
    manifest = ds["facets"]["stepguard_manifest"]
    assert (manifest["digest"], manifest["manifestUri"], manifest["role"]) == (
        out["digest"], out["manifest"], "output")
    verdicts = ev["run"]["facets"]["stepguard_verdicts"]
    from stepguard.receipt import Receipt

    assert verdicts["receiptDigest"] == Receipt.from_dict(receipts["ingest"]).digest
    assert verdicts["status"] == "succeeded" and verdicts["traceId"]
    for key, facet in [("stepguard_manifest", manifest), ("stepguard_verdicts", verdicts)]:
        _schema_check(key, facet)

    # train: its input verified against ingest's digest -- the lineage edge carries it
    ev = _task_event(events, job, "train", "COMPLETE")
    (inp,) = ev["inputs"]
    assert (inp["namespace"], inp["name"]) == ("file", out["path"])
    assert inp["facets"]["stepguard_manifest"]["digest"] == out["digest"]
    assert inp["facets"]["stepguard_manifest"]["verified"] is True
    assert ev["run"]["facets"]["stepguard_verdicts"]["integrity"]["verdict"] == "pass"

    # publish: the registry's model, its signer and bundle digest as the receipt says
    ev = _task_event(events, job, "publish", "COMPLETE")
    published = receipts["publish"]["outputs"][0]["published"]
    datasets = _by_ns_name(ev["outputs"])
    facets_ = datasets[("file", published["uri"][len("file://"):].rstrip("/"))]
    sig = facets_["stepguard_signature"]
    assert sig["signer"] == published["signer"] and sig["signer"].startswith("key:sha256:")
    assert sig["bundleDigest"] == published["bundle_digest"]
    _schema_check("stepguard_signature", sig)

    # gate: the policy, the signer it accepted, its verdict
    ev = _task_event(events, job, "gate", "COMPLETE")
    gate = ev["run"]["facets"]["stepguard_verdicts"]["gate"]
    assert gate["policy"] == "release" and gate["verdict"] == "accepted"
    assert gate["signer"] == published["signer"]
    assert gate["digest"] == receipts["gate"]["outputs"][0]["digest"]
    gated = _by_ns_name(ev["inputs"])[("file", published["uri"][len("file://"):].rstrip("/"))]
    assert gated["stepguard_signature"]["policy"] == "release"
    _schema_check("stepguard_verdicts", ev["run"]["facets"]["stepguard_verdicts"])


def test_fail_event_names_the_integrity_verdict_and_the_file(airflow_run, lineage_run):
    dag_id, runs, events, xcoms = lineage_run("tampered")
    run = SimpleNamespace(dag_id=f"{dag_id}_tampered", run_id=runs["tampered"])
    failed = xcoms["tampered"]["verify"]["stepguard_failed_receipt"]
    ev = _task_event(events, run.dag_id, "verify", "FAIL")
    verdicts = ev["run"]["facets"]["stepguard_verdicts"]
    assert verdicts["status"] == "failed"
    assert verdicts["integrity"]["verdict"] == "fail"
    assert verdicts["error"]["type"] == "IntegrityError"
    assert verdicts["error"]["control"] == "integrity"
    assert "churn.csv" in json.dumps(verdicts["error"])
    from stepguard.receipt import Receipt

    assert verdicts["receiptDigest"] == Receipt.from_dict(failed).digest
    _schema_check("stepguard_verdicts", verdicts)


def test_parsing_the_asset_example_loads_no_openlineage(airflow_db):
    """Lineage and Assets cost nothing at parse time: neither the OpenLineage client nor the
    provider's extractors/listener are imported (Airflow itself reads every installed
    provider's ``get_provider_info``)."""
    example = Path(__file__).resolve().parents[2] / "dags_examples" / "asset_custody.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('ex', {str(example)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert m.producer.tasks[0].stepguard_assets\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'openlineage'\n"
        "             or n.startswith(('airflow.providers.openlineage.extractors',\n"
        "                              'airflow.providers.openlineage.plugins'))))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


ACROSS = """
import importlib.util, json, sys
from airflow.models import dagrun as dagrun_module
from airflow.models.asset import AssetEvent
from airflow.utils.session import create_session
from sqlalchemy import select

spec = importlib.util.spec_from_file_location("asset_custody", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
produced = module.producer.test()
with create_session() as session:
    ids = list(session.scalars(select(AssetEvent.id).where(
        AssetEvent.source_dag_id == produced.dag_id,
        AssetEvent.source_run_id == produced.run_id)))
original = dagrun_module.get_or_create_dagrun

def get_or_create_dagrun(*, dag, session, **kwargs):  # what the scheduler's asset run does
    dr = original(dag=dag, session=session, **kwargs)
    dr.consumed_asset_events.extend(
        session.scalars(select(AssetEvent).where(AssetEvent.id.in_(ids))).all())
    session.commit()
    return dr

dagrun_module.get_or_create_dagrun = get_or_create_dagrun
consumed = module.consumer.test()
print("STATES=" + json.dumps([str(produced.state), str(consumed.state)]))
"""


def test_lineage_links_the_consumer_dag_to_the_producer_dag_by_digest(airflow_run,
                                                                      stepguard_env):
    """The asset example with OpenLineage on: the consumer DAG's input is the producer DAG's
    output -- same dataset, same manifest digest -- in the events a backend receives."""
    example = Path(__file__).resolve().parents[2] / "dags_examples" / "asset_custody.py"
    path = airflow_run.home / "dags" / "asset_custody.py"
    path.write_text(example.read_text())
    events_file = stepguard_env / "openlineage.jsonl"
    env = {**os.environ, "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
        {"type": "file", "log_file_path": str(events_file), "append": True}),
        **_own_metadata_db(airflow_run.home, stepguard_env)}
    r = subprocess.run([sys.executable, "-c", ACROSS, str(path)], capture_output=True,
                       text=True, timeout=600, env=env, cwd=stepguard_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.rsplit("STATES=", 1)[1].splitlines()[0]) == [
        "success", "success"]
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    (out,) = _task_event(events, "churn_features_producer", "build_features",
                         "COMPLETE")["outputs"]
    for task in ("verify_features", "summarize"):
        (inp,) = _task_event(events, "churn_features_consumer", task, "COMPLETE")["inputs"]
        assert (inp["namespace"], inp["name"]) == (out["namespace"], out["name"])
        assert inp["facets"]["stepguard_manifest"]["digest"] == \
            out["facets"]["stepguard_manifest"]["digest"]
        assert inp["facets"]["stepguard_manifest"]["verified"] is True
        assert inp["facets"]["stepguard_manifest"]["source"].startswith("receipt:")
