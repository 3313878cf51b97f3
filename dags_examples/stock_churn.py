"""A stock Airflow churn pipeline: the "before" of docs/guides/converting-a-dag.md.

extract -> validate -> featurize -> train -> evaluate -> report, plain ``@task`` functions passing
paths and numbers through XCom. ``secured_churn.py`` is the same file converted to stepguard; the
function bodies are identical. The data lake is ``$CHURN_LAKE`` (default ``/tmp/churn-lake``);
``extract`` stands in for a warehouse query with a deterministic synthetic table.
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


@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False,
     params={"threshold_step": 0.05}, tags=["example"])
def stock_churn() -> None:
    @task
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

    @task
    def validate(raw: str) -> int:
        rows = list(csv.DictReader(Path(raw, "customers.csv").read_text().splitlines()))
        if not rows or any(r["churned"] not in ("0", "1") for r in rows):
            raise ValueError(f"bad extract: {len(rows)} rows")
        return len(rows)

    @task
    def featurize(raw: str, ds_nodash: str | None = None) -> str:
        out = Path(LAKE, f"{ds_nodash}", "features")
        out.mkdir(parents=True, exist_ok=True)
        rows = list(csv.DictReader(Path(raw, "customers.csv").read_text().splitlines()))
        feats = [[int(r["tickets"]) / max(int(r["tenure_months"]), 1), int(r["churned"])]
                 for r in rows]
        (out / "features.json").write_text(json.dumps(feats))
        return str(out)

    @task
    def train(features: str, params: dict | None = None, ds_nodash: str | None = None) -> str:
        feats = json.loads(Path(features, "features.json").read_text())
        step = (params or {}).get("threshold_step", 0.05)
        candidates = [i * step for i in range(1, int(1 / step))]
        best = max(candidates, key=lambda t: sum((x > t) == bool(y) for x, y in feats))
        out = Path(LAKE, f"{ds_nodash}", "model")
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.json").write_text(json.dumps({"threshold": best}))
        return str(out)

    @task
    def evaluate(model: str, features: str) -> float:
        threshold = json.loads(Path(model, "model.json").read_text())["threshold"]
        feats = json.loads(Path(features, "features.json").read_text())
        return round(sum((x > threshold) == bool(y) for x, y in feats) / len(feats), 4)

    @task
    def report(accuracy: float, rows: int) -> str:
        return f"churn model: accuracy {accuracy} on {rows} customers"

    raw = extract()
    rows = validate(raw)
    features = featurize(raw)
    model = train(features)
    report(evaluate(model, features), rows)


dag = stock_churn()
