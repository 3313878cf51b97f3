"""Airflow: how much a failing secured task writes to the log.

    .venv/bin/python benchmarks/bench_failure_logs.py [LOG_FILE]

Runs, in a fresh interpreter and a throwaway AIRFLOW_HOME, a DAG of ten ``SecureStepOperator``
tasks whose bodies each raise ``ValueError`` through ``dag.test()``, and prints the number of
log lines the run wrote and the number of tracebacks among them. The log is kept in LOG_FILE
(default ``/tmp/stepguard-failure-logs.txt``). Figures: docs/reference/airflow.md (Failures).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

DAG = """
import pendulum
from airflow.sdk import DAG
from stepguard_airflow.operators import SecureStepOperator

def boom(i):
    raise ValueError(f"feature column {i} has NaN")

with DAG("fail10", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
    for i in range(10):
        SecureStepOperator(task_id=f"fit{i}", python_callable=boom, op_args=[i])
"""


def main(log_file: Path) -> tuple[int, int]:
    """Run the failing DAG; return (log lines, tracebacks)."""
    home = Path(tempfile.mkdtemp(prefix="sg-failure-logs-"))
    env = dict(os.environ, AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(home / "dags"),
               AIRFLOW__CORE__LOAD_EXAMPLES="False", AIRFLOW__CORE__UNIT_TEST_MODE="True",
               AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home}/airflow.db",
               STEPGUARD_STATE_DIR=str(home / "state"), STEPGUARD_AUDIT_EXPORTER="jsonl",
               STEPGUARD_AUDIT_PATH=str(home / "audit.jsonl"))
    for key in [k for k in env if k.startswith("VAULT_")]:
        env.pop(key)
    (home / "dags").mkdir()
    dag_file = home / "dags" / "fail10.py"
    dag_file.write_text(DAG)
    runner = textwrap.dedent(f"""
        import importlib.util
        from airflow.utils import db
        db.initdb()
        spec = importlib.util.spec_from_file_location("fail10", {str(dag_file)!r})
        m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
        print("=====START=====", flush=True)
        m.dag.test()
    """)
    r = subprocess.run([sys.executable, "-c", runner], env=env, capture_output=True, text=True,
                       cwd=str(home), check=False)
    body = (r.stdout + r.stderr).split("=====START=====", 1)[-1]
    log_file.write_text(body)
    return len(body.splitlines()), body.count("Traceback (most recent call last)")


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/stepguard-failure-logs.txt")
    lines, tracebacks = main(out)
    print(f"10 failed tasks: {lines} log lines, {tracebacks} tracebacks (log: {out})")
