"""The audit trail of a real ``dag.test()`` run: one trace for the whole DAG run (every task a
child of the run root derived from the run id), task spans ended OK/ERROR from the outcome,
mapped instances named with their index, and every span as docs/reference/audit.md documents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.airflow]

DOC = Path(__file__).resolve().parents[2] / "docs" / "reference" / "audit.md"


def test_a_dag_run_is_one_trace_with_named_mapped_instances(airflow_run, stepguard_env):
    from stepguard import audit
    from stepguard.testing.spans import check_spans, read_span_table, records_from_log

    dag, dag_id = airflow_run.write("""
        import pendulum
        from airflow.sdk import DAG, task
        from airflow.providers.standard.operators.python import PythonOperator

        def boom():
            raise RuntimeError("plain task failed")

        with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
            @task.stepguard(spec={"outputs": [{"name": "data", "path": "lake/{step}"}]})
            def ingest(part: int, step_env):
                (step_env.outputs["data"] / "rows.csv").write_text(str(part))

            ingest.expand(part=[0, 1, 2])
            PythonOperator(task_id="plain", python_callable=lambda: None)
            PythonOperator(task_id="broken", python_callable=boom)
    """)
    dr = dag.test()
    states = airflow_run.states(dr)
    assert states["ingest"] == "success" and states["broken"] == "failed"
    log = stepguard_env / "audit.jsonl"
    spans = records_from_log(log)
    trace_id, root = audit.run_trace_ids("airflow", dag_id, str(dr.run_id))
    assert {s["trace_id"] for s in spans} == {trace_id}
    tasks = [s for s in spans if s["name"] == "stepguard.task"]
    steps = [s for s in spans if s["name"] == "stepguard.step"]
    assert len(tasks) == 5 and len(steps) == 3
    assert {t["parent_span_id"] for t in tasks} == {root}
    task_ids = {t["span_id"] for t in tasks}
    assert all(s["parent_span_id"] in task_ids for s in steps)
    status = {(t["attributes"]["cicd.pipeline.task.name"],
               t["attributes"].get("stepguard.map_index")): t["status"] for t in tasks}
    assert status == {("ingest", 0): "OK", ("ingest", 1): "OK", ("ingest", 2): "OK",
                      ("plain", None): "OK", ("broken", None): "ERROR"}
    assert sorted(s["attributes"]["stepguard.step.name"] for s in steps) == [
        "ingest.0", "ingest.1", "ingest.2"]
    problems = check_spans(spans, read_span_table(DOC))
    assert problems == [], "\n".join(sorted(set(problems)))
    text = audit.show(log)
    for i in range(3):
        assert f"task ingest.{i}  OK" in text and f"step ingest.{i}  OK" in text
    assert "step ingest  " not in text and "task ingest  " not in text
    receipts = [json.loads((p).read_text()) for p in
                (stepguard_env / "state" / "runs").rglob("receipt.json")]
    assert {r["trace_id"] for r in receipts} == {trace_id}
