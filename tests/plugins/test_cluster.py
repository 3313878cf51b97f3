"""The example DAG on a real Airflow deployment: scheduler (LocalExecutor), DAG processor and API
server on a metadata DB in the dev stack's PostgreSQL (:mod:`stepguard_airflow.cluster`).

One cluster serves the module: the pipeline runs, every task in its own process, working
directory and state dir, receipts come back through XCom, the metadata DB and the logs hold no
secret; the tampered run stops at verification before training starts; stopping leaves no
process behind. The last test runs ``--cluster --tampered`` as the main job does, in a fresh
process, and looks for any process it left.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.airflow, pytest.mark.services, pytest.mark.sandbox, pytest.mark.slow]

STEPS = ("ingest", "verify_dataset", "train", "sign_and_publish", "gate", "deploy")


@pytest.fixture(scope="module")
def cluster(dev_stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if dev_stack.postgres is None:
        pytest.skip("PostgreSQL (initdb/postgres) not installed: no metadata DB for Airflow")
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed: the example trains in the sandbox")
    from stepguard_airflow.cluster import AirflowCluster, example_env
    from stepguard_airflow.example import EXAMPLE, _seed

    _seed(dev_stack.postgres)
    root = tmp_path_factory.mktemp("cluster")
    env, worker_env = example_env(root, dev_stack)
    with AirflowCluster(root / "cluster", dev_stack, dags=[EXAMPLE], env=env,
                        worker_env=worker_env, timeout=240) as c:
        yield c


@pytest.fixture(scope="module")
def good_run(cluster: Any) -> Any:
    return cluster.run_dag("secure_training")


def _secrets(cluster: Any, dev_stack: Any) -> dict[str, str]:
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(cluster.home / "airflow.cfg")
    return {
        "metadata DB password": cluster.metadata_dsn.split("password=")[1].split()[0],
        "API jwt secret": cfg["api_auth"]["jwt_secret"],
        "API secret key": cfg["api"]["secret_key"],
        "fernet key": cfg["core"]["fernet_key"],
        "AppRole secret id": Path(dev_stack.approle_secret_id_file).read_text().strip(),
        "PostgreSQL admin password": dev_stack.postgres.admin_password,
        "Vault root token": dev_stack.vault_root_token,
    }


def test_every_task_runs_in_its_own_process_and_directories(cluster, good_run, dev_stack):
    assert good_run.state == "success", good_run.states
    assert good_run.states == dict.fromkeys(STEPS, "success")
    workers = good_run.workers
    assert sorted(workers) == sorted(STEPS)
    services = set(cluster.service_pids.values())
    pids = {w["pid"] for w in workers.values()}
    assert len(pids) == len(STEPS) and not pids & (services | {os.getpid()})
    for task, w in workers.items():
        # The process that ran the task (as the API server reports it) is the one that moved
        # into the task's directory, in a process group of its own under the scheduler's session.
        assert good_run.instances[task]["pid"] == w["pid"], task
        assert w["pgid"] == w["pid"] and w["sid"] == cluster.service_pids["scheduler"]
        home = Path(w["cwd"]).parent
        assert home.parent.parent == cluster.workers_dir and home.name == task
        assert w["state_dir"] == str(home / "state")
    assert len({w["cwd"] for w in workers.values()}) == len(STEPS)
    # Data and manifests went through the object store, not a worker's disk; each step kept
    # its audit log in its own state dir and shipped its segment next to its receipt.
    ingest = good_run.xcom("ingest")
    out = ingest["outputs"][0]
    assert out["path"].startswith("s3://stepguard-data/cluster-"), out
    assert out["manifest"].startswith("s3://stepguard-data/cluster-"), out
    assert ingest["audit_segment"].startswith("s3://stepguard-data/cluster-")
    for task in STEPS:
        state = Path(workers[task]["state_dir"])
        assert (state / "audit" / "audit.jsonl").is_file(), task
        assert not (Path(workers[task]["cwd"]) / ".stepguard").exists(), task


def test_receipts_come_back_through_xcom_and_chain(good_run):
    receipts = {t: good_run.xcom(t) for t in STEPS}
    assert all(r is not None and r["status"] == "succeeded" for r in receipts.values())
    dataset = receipts["ingest"]["outputs"][0]["digest"]
    by_kind = {c["kind"]: c for c in receipts["ingest"]["credentials"]}
    assert by_kind["database"]["revoked"] is True
    # The object-store credential is web identity: it cannot be revoked, it expires.
    assert by_kind["aws_web_identity"]["revocable"] is False
    # Every receipt is signed by its producer, and every consumer verified the one it used.
    assert all(r.get("signature") for r in receipts.values())
    assert receipts["verify_dataset"]["inputs"][0]["digest"] == dataset
    assert receipts["train"]["inputs"][0]["digest"] == dataset
    assert receipts["train"]["isolation"]["mode"] == "sandbox"
    model = receipts["train"]["outputs"][0]["digest"]
    assert receipts["sign_and_publish"]["inputs"][0]["digest"] == model
    gate = good_run.xcom("gate", "gate")
    assert gate["policy"] == "release"
    assert gate["signer"] == receipts["sign_and_publish"]["outputs"][0]["published"]["signer"]
    assert receipts["deploy"]["inputs"][0]["digest"] == receipts["gate"]["outputs"][0]["digest"]
    # Each receipt was written by the task that the context names, in its own run.
    for task, receipt in receipts.items():
        assert receipt["context"]["step"] == task
        assert receipt["context"]["run_id"] == good_run.run_id


def test_metadata_db_and_logs_hold_receipts_never_secrets(cluster, good_run, dev_stack):
    import psycopg2

    conn = psycopg2.connect(cluster.metadata_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT task_id, key, value::text FROM xcom WHERE run_id = %s",
                        (good_run.run_id,))
            rows = cur.fetchall()
            cur.execute("SELECT rendered_fields::text FROM rendered_task_instance_fields")
            rendered = [r[0] for r in cur.fetchall()]
    finally:
        conn.close()
    keys = {(task, key) for task, key, _ in rows}
    assert {(t, "return_value") for t in STEPS} <= keys
    stored = "\n".join(value for _, _, value in rows) + "\n".join(rendered)
    assert json.loads(dict(((t, k), v) for t, k, v in rows)[("train", "return_value")])["step"] \
        == "train"
    secrets = _secrets(cluster, dev_stack)
    logs = [p for p in cluster.root.rglob("*") if p.is_file() and p.name != "airflow.cfg"]
    assert any(p.name == "scheduler.log" for p in logs) and len(logs) > 20
    blob = "".join(p.read_bytes().decode("latin-1") for p in logs)
    for name, value in secrets.items():
        assert len(value) >= 16, name
        # pytest.fail, not a bare assert: a failure must not print the secret either.
        if value in stored:
            pytest.fail(f"{name} in the metadata DB")
        if value in blob:
            pytest.fail(f"{name} in a log or state file")
    assert '"password"' not in stored


def test_tampered_run_stops_at_verification(cluster):
    run = cluster.run_dag("secure_training_tampered")
    assert run.state == "failed"
    assert run.states["attacker_poisons_data_lake"] == "success"
    assert run.states["verify_dataset"] == "failed"
    for task in ("train", "sign_and_publish", "gate", "deploy"):
        assert run.states[task] == "upstream_failed", run.states
    # Training never started: no process ever ran it, no directory, no receipt.
    assert "train" not in run.workers and run.xcom("train") is None
    assert not (cluster.workers_dir / Path(run.workers["ingest"]["cwd"]).parent.parent.name
                / "train").exists()
    failed = run.xcom("verify_dataset", "stepguard_failed_receipt")
    assert failed["error"]["type"] == "IntegrityError"
    assert "churn.csv" in json.dumps(failed["error"])


def test_stop_leaves_no_process_and_no_database(cluster, dev_stack):
    import psycopg2

    from stepguard.testing.devstack import pid_alive, session_members

    services = cluster.service_pids
    assert sorted(services) == ["api-server", "dag-processor", "scheduler"]
    db = cluster.metadata_dsn.split("dbname=")[1].split()[0]
    problems = cluster.stop()
    assert not [p for p in problems if "outlived" in p], problems
    assert cluster.service_pids == {}
    for name, pid in services.items():
        assert not pid_alive(pid), name
        assert session_members(pid) == [], name
    pg = dev_stack.postgres
    conn = psycopg2.connect(host=pg.host, port=pg.port, dbname="postgres", user=pg.admin_user,
                            password=pg.admin_password)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (db,))
            assert cur.fetchone() == (0,)
            cur.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (db,))
            assert cur.fetchone() == (0,)
    finally:
        conn.close()
    assert cluster.stop() == []  # a second stop is harmless


def _processes_of(home: Path) -> list[int]:
    """Live processes whose environment names ``home`` as AIRFLOW_HOME."""
    needle = f"AIRFLOW_HOME={home}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.timeout(480)  # the pod image may need building first (about a minute cold)
def test_main_job_cluster_tampered_reports_and_leaves_nothing(dev_stack, tmp_path):
    """``--cluster --tampered`` in a fresh process, as ``bash scripts/main.sh`` runs it."""
    if dev_stack.postgres is None:
        pytest.skip("PostgreSQL (initdb/postgres) not installed: no metadata DB for Airflow")
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed: the example trains in the sandbox")
    r = subprocess.run([sys.executable, "-m", "stepguard_airflow.example", "--cluster",
                        "--tampered", "--workdir", str(tmp_path), "--dev-dir",
                        str(dev_stack.state_dir)],
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "tampered data was refused; training never started" in r.stdout
    from stepguard.testing.podman import unavailable

    # With podman, train is a pod and the poisoning comes after verify_dataset: the pod's own
    # check stops it before the body; without podman, verify_dataset stops it.
    where = "verify    STOPPED" if unavailable() else "train     STOPPED in the pod"
    assert f"{where}: IntegrityError" in r.stdout and "churn.csv" in r.stdout
    assert "(none shared)" in r.stdout and "chains intact" in r.stdout
    assert "  train     sandbox" not in r.stdout and "  model " not in r.stdout
    assert _processes_of(tmp_path / "cluster" / "airflow") == []
    # The report and the progress lines show no credential of the stack, and no secret of the
    # cluster (its airflow.cfg is left behind, 0600, for inspection).
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(tmp_path / "cluster" / "airflow" / "airflow.cfg")
    assert oct((tmp_path / "cluster" / "airflow" / "airflow.cfg").stat().st_mode & 0o777) == "0o600"
    conn = cfg["database"]["sql_alchemy_conn"]
    secrets = [conn.split(":")[2].split("@")[0], cfg["api_auth"]["jwt_secret"],
               cfg["api"]["secret_key"], cfg["core"]["fernet_key"],
               Path(dev_stack.approle_secret_id_file).read_text().strip(),
               dev_stack.postgres.admin_password, dev_stack.vault_root_token]
    for value in secrets:
        if value in r.stdout + r.stderr:
            pytest.fail("a secret in the demo's output")
