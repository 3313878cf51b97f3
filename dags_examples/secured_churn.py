"""The churn pipeline of ``stock_churn.py``, secured: the "after" of
docs/guides/converting-a-dag.md.

Each ``@task`` became ``@task.stepguard``, plus the arguments that name what the task produces
(``outputs``: hashed into a manifest, recorded in the receipt) and the credentials it needs.
Inputs need nothing: a parameter that receives a secured task's value, named like one of the
step's inputs, is verified against the producer's receipt before the body runs. The function
bodies are unchanged; downstream tasks still get the functions' values.
"""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pendulum
from airflow.sdk import dag, task

LAKE = os.environ.get("CHURN_LAKE", "/tmp/churn-lake")


def out(name: str) -> dict[str, list[dict[str, str]]]:
    """A step that produces ``LAKE/<ds_nodash>/<name>``."""
    return {"outputs": [{"name": name, "path": LAKE + "/{{ ds_nodash }}/" + name}]}


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False,
     params={"threshold_step": 0.05}, tags=["example"])
def secured_churn() -> None:
    @task.stepguard(spec=out("raw"))
    def extract(ds_nodash: str | None = None) -> str:
        out = Path(LAKE, f"{ds_nodash}", "raw")
        out.mkdir(parents=True, exist_ok=True)
        rng = random.Random(7)
        with open(out / "customers.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["customer_id", "tenure_months", "tickets", "churned"])
            for i in range(400):
                tenure, tickets = rng.randint(1, 72), rng.randint(0, 9)
                w.writerow([i, tenure, tickets, int(tickets * 8 > tenure + rng.randint(0, 20))])
        return str(out)

    @task.stepguard(spec={"inputs": [{"name": "raw"}]})
    def validate(raw: str) -> int:
        rows = list(csv.DictReader(Path(raw, "customers.csv").read_text().splitlines()))
        if not rows or any(r["churned"] not in ("0", "1") for r in rows):
            raise ValueError(f"bad extract: {len(rows)} rows")
        return len(rows)

    @task.stepguard(spec={"inputs": [{"name": "raw"}], **out("features")})
    def featurize(raw: str, ds_nodash: str | None = None) -> str:
        out = Path(LAKE, f"{ds_nodash}", "features")
        out.mkdir(parents=True, exist_ok=True)
        rows = list(csv.DictReader(Path(raw, "customers.csv").read_text().splitlines()))
        feats = [[int(r["tickets"]) / max(int(r["tenure_months"]), 1), int(r["churned"])]
                 for r in rows]
        (out / "features.json").write_text(json.dumps(feats))
        return str(out)

    @task.stepguard(spec={"inputs": [{"name": "features"}], **out("model")})
    def train(features: str, params: dict | None = None, ds_nodash: str | None = None) -> str:
        feats = json.loads(Path(features, "features.json").read_text())
        step = (params or {}).get("threshold_step", 0.05)
        candidates = [i * step for i in range(1, int(1 / step))]
        best = max(candidates, key=lambda t: sum((x > t) == bool(y) for x, y in feats))
        out = Path(LAKE, f"{ds_nodash}", "model")
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.json").write_text(json.dumps({"threshold": best}))
        return str(out)

    @task.stepguard(spec={"inputs": [{"name": "model"}, {"name": "features"}]})
    def evaluate(model: str, features: str) -> float:
        threshold = json.loads(Path(model, "model.json").read_text())["threshold"]
        feats = json.loads(Path(features, "features.json").read_text())
        return round(sum((x > threshold) == bool(y) for x, y in feats) / len(feats), 4)

    @task.stepguard
    def report(accuracy: float, rows: int) -> str:
        return f"churn model: accuracy {accuracy} on {rows} customers"

    raw = extract()
    rows = validate(raw)
    features = featurize(raw)
    model = train(features)
    report(evaluate(model, features), rows)


dag = secured_churn()
