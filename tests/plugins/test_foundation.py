"""A DAG with one secured step runs to success through ``dag.test()``; the receipt is in XCom."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.airflow]


def test_secured_step_runs_and_receipt_lands_in_xcom(airflow_run, stepguard_env):
    dag, dag_id = airflow_run.write("""
        import pendulum
        from airflow.sdk import DAG
        from stepguard_airflow.operators import SecureStepOperator

        def fit(step_env):
            (step_env.outputs["model"] / "weights.txt").write_text("w=1")
            return "fitted"

        with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
            SecureStepOperator(
                task_id="fit",
                spec={"outputs": [{"name": "model", "path": "model"}]},
                python_callable=fit,
            )
    """)
    dr = dag.test()
    assert airflow_run.states(dr) == {"fit": "success"}
    receipt = airflow_run.xcom_of(dr, "fit")
    assert receipt["status"] == "succeeded"
    assert receipt["step"] == "fit"
    assert receipt["context"]["pipeline"] == dag_id
    assert receipt["context"]["orchestrator"] == "airflow"
    out = receipt["outputs"][0]
    assert out["name"] == "model" and out["files"] == 1
    assert out["digest"].startswith("sha256:")
    # The output lives in the per-try directory under the state dir, and its manifest matches.
    assert Path(out["path"]).is_relative_to(stepguard_env / "state")
    assert (Path(out["path"]) / "weights.txt").read_text() == "w=1"
    assert json.loads(Path(out["manifest"]).read_text())
    assert airflow_run.xcom_of(dr, "fit", "result") == "fitted"
