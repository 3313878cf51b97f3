"""The conversion guide's two DAGs (docs/guides/converting-a-dag.md) run through ``dag.test()``:
same values downstream, and the secured one leaves a verified chain of receipts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = [pytest.mark.airflow]

REPO = Path(__file__).resolve().parents[2]
STOCK = REPO / "dags_examples" / "stock_churn.py"
SECURED = REPO / "dags_examples" / "secured_churn.py"
TASKS = ("extract", "validate", "featurize", "train", "evaluate", "report")


def _run(airflow_run, path, name, lake, monkeypatch):
    monkeypatch.setenv("CHURN_LAKE", str(lake))
    module = airflow_run.load(path, name)
    dag = next(v for v in vars(module).values() if type(v).__name__ == "DAG")
    dr = dag.test()
    return dr


def test_stock_and_secured_churn_give_the_same_values(airflow_run, stepguard_env, monkeypatch):
    stock = _run(airflow_run, STOCK, "stock_churn", stepguard_env / "lake-stock", monkeypatch)
    secured = _run(airflow_run, SECURED, "secured_churn", stepguard_env / "lake-secured",
                   monkeypatch)
    assert airflow_run.states(stock) == dict.fromkeys(TASKS, "success")
    assert airflow_run.states(secured) == dict.fromkeys(TASKS, "success")
    for task in ("validate", "evaluate", "report"):
        assert airflow_run.xcom_of(secured, task) == airflow_run.xcom_of(stock, task)
    assert airflow_run.xcom_of(secured, "report").startswith("churn model: accuracy ")
    receipts = {t: airflow_run.xcom_of(secured, t, "stepguard_receipt") for t in TASKS}
    assert all(r["status"] == "succeeded" for r in receipts.values())
    raw = receipts["extract"]["outputs"][0]
    for consumer in ("validate", "featurize"):
        got = receipts[consumer]["inputs"][0]
        assert (got["name"], got["digest"], got["verified"]) == ("raw", raw["digest"], True)
    features = receipts["featurize"]["outputs"][0]["digest"]
    assert {i["name"]: i["digest"] for i in receipts["evaluate"]["inputs"]} == {
        "model": receipts["train"]["outputs"][0]["digest"], "features": features}


def test_conversion_touches_only_decorators():
    """Per task, only the decorator changed: the function bodies and the wiring are equal."""
    def shape(path):
        tree = ast.parse(path.read_text())
        fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef)
                  and n.name.endswith("_churn"))
        for inner in ast.walk(fn):
            if isinstance(inner, ast.FunctionDef):
                inner.decorator_list = []
        fn.name = "churn"
        return ast.dump(fn)

    assert shape(STOCK) == shape(SECURED)


def test_tampered_lake_stops_the_secured_run(airflow_run, stepguard_env, monkeypatch):
    """The lake file is changed between extract and its consumers: they fail, no retry."""
    lake = stepguard_env / "lake"
    monkeypatch.setenv("CHURN_LAKE", str(lake))
    source = SECURED.read_text().replace(
        "    rows = validate(raw)\n",
        "    rows = validate(raw)\n    tamper(raw) >> [rows]\n").replace(
        "    @task.stepguard\n    def report(",
        "    @task\n    def tamper(raw: str) -> None:\n"
        "        p = Path(raw, 'customers.csv')\n"
        "        p.write_text(p.read_text().replace(',1\\n', ',0\\n', 1))\n\n"
        "    @task.stepguard\n    def report(")
    path = stepguard_env / "secured_tampered.py"
    path.write_text(source)
    module = airflow_run.load(path, "secured_churn_tampered")
    dag = next(v for v in vars(module).values() if type(v).__name__ == "DAG")
    dr = dag.test()
    states = airflow_run.states(dr)
    assert states["extract"] == "success" and states["tamper"] == "success"
    assert states["validate"] == "failed"
