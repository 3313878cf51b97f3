"""The churn example used by ``stepguard demo``, the example Airflow DAG and the tests.

A small customers table in PostgreSQL, read by an ingest step with a just-in-time database
user, and a training body (plain Python logistic regression) that runs in the sandbox with no
network and sees only its verified input and its output directory.

>>> import pathlib, subprocess, sys, tempfile
>>> from stepguard.testing.examples import TRAIN_SCRIPT, write_csv, customer_rows
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> (d / "data").mkdir(); (d / "model").mkdir()
>>> _ = write_csv(d / "data", customer_rows(50))
>>> env = {"STEPGUARD_INPUT_DATASET": str(d / "data"), "STEPGUARD_OUTPUT_MODEL": str(d / "model")}
>>> _ = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT], env=env, check=True)
>>> sorted(p.name for p in (d / "model").iterdir())
['metrics.json', 'weights.json']
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "TRAIN_SCRIPT", "customer_rows", "export_customers", "seed_customers",
           "write_csv"]

COLUMNS = ("id", "tenure", "monthly", "churned")

#: The training body, for ``[sys.executable, "-c", TRAIN_SCRIPT]``: reads
#: ``$STEPGUARD_INPUT_DATASET/churn.csv``, writes ``weights.json`` and ``metrics.json`` into
#: ``$STEPGUARD_OUTPUT_MODEL``.
TRAIN_SCRIPT = r"""
import csv, json, math, os, pathlib
src = pathlib.Path(os.environ["STEPGUARD_INPUT_DATASET"]) / "churn.csv"
out = pathlib.Path(os.environ["STEPGUARD_OUTPUT_MODEL"])
rows = list(csv.DictReader(src.open()))
xs = [[1.0, float(r["tenure"]) / 72, float(r["monthly"]) / 120] for r in rows]
ys = [float(r["churned"]) for r in rows]
w = [0.0, 0.0, 0.0]
for _ in range(200):
    g = [0.0, 0.0, 0.0]
    for x, y in zip(xs, ys):
        p = 1 / (1 + math.exp(-sum(a * b for a, b in zip(w, x))))
        for i in range(3):
            g[i] += (p - y) * x[i]
    w = [wi - 0.5 * gi / len(xs) for wi, gi in zip(w, g)]
acc = sum((1 / (1 + math.exp(-sum(a * b for a, b in zip(w, x)))) > 0.5) == (y == 1)
          for x, y in zip(xs, ys)) / len(xs)
(out / "weights.json").write_text(json.dumps({"w": w}))
(out / "metrics.json").write_text(json.dumps({"accuracy": round(acc, 4), "rows": len(rows)}))
"""


def customer_rows(n: int = 400) -> list[tuple[int, int, int, int]]:
    """Deterministic demo customers: (id, tenure in months, monthly charge, churned 0/1)."""
    rows = []
    for i in range(n):
        tenure = (i * 37) % 72 + 1
        monthly = 20 + (i * 53) % 100
        churned = int(monthly / 120 - tenure / 72 + ((i * 7) % 10 - 5) / 40 > 0.1)
        rows.append((i, tenure, monthly, churned))
    return rows


def seed_customers(*, host: str, port: int, dbname: str, user: str, password: str) -> None:
    """Create and fill the ``customers`` table once (an administrator's job, not a step's)."""
    from stepguard.testing import dev_import

    psycopg2 = dev_import("psycopg2")

    conn = psycopg2.connect(host=host, port=port, dbname=dbname, user=user, password=password,
                            connect_timeout=5)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS customers "
                        "(id int PRIMARY KEY, tenure int, monthly numeric, churned int)")
            cur.execute("SELECT count(*) FROM customers")
            row = cur.fetchone()
            if row is not None and row[0] == 0:
                cur.executemany("INSERT INTO customers VALUES (%s,%s,%s,%s)", customer_rows())
    finally:
        conn.close()


def export_customers(dest: Path, *, credentials: Any, host: str, port: int,
                     dbname: str) -> Path:
    """The ingest body: read the table as the step's JIT database user into ``dest/churn.csv``.

    ``credentials`` is the step's ``SecretMapping`` for the database credential; its values are
    revealed only to hand them to the driver.
    """
    from stepguard.testing import dev_import

    psycopg2 = dev_import("psycopg2")

    conn = psycopg2.connect(host=host, port=port, dbname=dbname,
                            user=credentials.reveal("username"),
                            password=credentials.reveal("password"), connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id, tenure, monthly, churned FROM customers ORDER BY id")
            rows: Sequence[Sequence[Any]] = cur.fetchall()
    finally:
        conn.close()
    return write_csv(dest, rows)


def write_csv(dest: Path, rows: Iterable[Sequence[Any]]) -> Path:
    """Write ``rows`` as ``dest/churn.csv`` with the header."""
    path = dest / "churn.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return path
