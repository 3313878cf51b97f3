"""Chain of custody across DAGs on the real deployment shape: the cluster harness's scheduler
triggers the example consumer (``dags_examples/asset_custody.py``) from the producer's asset
event, on separate worker processes sharing nothing but Vault, the object store and the
metadata DB (data in S3, receipts signed with Transit and verified by every consumer)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.airflow, pytest.mark.services, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "dags_examples" / "asset_custody.py"
CONSUMER = "churn_features_consumer"


@pytest.fixture(scope="module")
def cluster(dev_stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if dev_stack.postgres is None:
        pytest.skip("PostgreSQL (initdb/postgres) not installed: no metadata DB for Airflow")
    from stepguard_airflow.cluster import AirflowCluster, example_env

    root = tmp_path_factory.mktemp("cluster-assets")
    env, worker_env = example_env(root, dev_stack)
    with AirflowCluster(root / "cluster", dev_stack, dags=[EXAMPLE], env=env,
                        worker_env=worker_env, timeout=240) as c:
        yield c


@pytest.fixture(scope="module")
def runs(cluster: Any) -> dict[str, Any]:
    cluster.set_paused(CONSUMER, False)
    known = cluster.run_ids(CONSUMER)
    produced = cluster.run_dag("churn_features_producer")
    assert produced.state == "success", produced.states
    return {"producer": produced, "consumer": cluster.wait_for_run(CONSUMER, known=known)}


def test_the_scheduler_triggers_the_consumer_which_verifies_against_the_event(runs):
    out = runs["producer"].xcom("build_features")["outputs"][0]
    assert out["path"].startswith("s3://")
    consumer = runs["consumer"]
    assert consumer.run_id.startswith("asset_triggered__")
    assert consumer.states == {"verify_features": "success", "summarize": "success"}
    for task in ("verify_features", "summarize"):
        (inp,) = consumer.xcom(task)["inputs"]
        assert inp["verified"] is True and inp["digest"] == out["digest"]
        assert inp["path"] == out["path"]
    assert consumer.xcom("summarize", "result") == 200
    # Different workers: the consumer read the producer's data from the object store only.
    assert consumer.workers["summarize"]["cwd"] != runs["producer"].workers["build_features"]["cwd"]


def test_data_changed_after_the_event_fails_the_rerun(cluster, runs, aws_admin_session,
                                                      dev_stack):
    out = runs["producer"].xcom("build_features")["outputs"][0]
    bucket, _, prefix = out["path"][len("s3://"):].partition("/")
    key = prefix.rstrip("/") + "/churn.csv"
    s3 = aws_admin_session.client("s3", endpoint_url=dev_stack.moto_endpoint)
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    s3.put_object(Bucket=bucket, Key=key, Body=body.replace("\n5,", "\n5,9", 1).encode())

    again = cluster.rerun(runs["consumer"])  # same run, same triggering event
    assert again.states == {"verify_features": "failed", "summarize": "upstream_failed"}
    failed = again.xcom("verify_features", "stepguard_failed_receipt")
    assert failed["error"]["type"] == "IntegrityError"
    assert "churn.csv" in json.dumps(failed["error"])
