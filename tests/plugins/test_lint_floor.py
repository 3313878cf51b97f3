"""``stepguard lint --floor``: DAG files checked against the same policy floor the template and the
step runner enforce (SG020), statically."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from stepguard_airflow._lint_floor import load_floor
from stepguard_airflow.lint import lint_paths, lint_source

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "dags_examples" / "templates" / "training.yaml"
EXAMPLE = REPO / "dags_examples" / "templated_training.py"

HAND_WRITTEN = '''
import pendulum
from airflow.sdk import DAG, task
from stepguard_airflow.operators import SecureStepOperator, VerifyModelOperator

with DAG("hand", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
    train = SecureStepOperator(task_id="train", python_callable=print)
    tuned = SecureStepOperator(task_id="tune", command="x", spec={
        "name": "train", "isolation": {"mode": "sandbox", "network": ["pypi.org:443"]}})
    long = SecureStepOperator(task_id="prep", command="x", spec={
        "deadline_s": 7200, "credentials": [{"name": "db", "kind": "database", "role": "r"}],
        "inputs": [{"name": "raw", "path": "raw", "unsafe_unverified": True}]})
    gate = VerifyModelOperator(task_id="gate", model=train.output, policy="dev")
    fine = SecureStepOperator(task_id="score", python_callable=print)

    @task.stepguard
    def train():
        return 1

    @task.stepguard(task_id="train_fast", shell=True)
    def train_fast():
        return "echo"
'''


def _floor_findings(findings):
    return [(f.line, f.message.split(":")[0]) for f in findings if f.rule == "SG020"]


def test_the_examples_keep_the_floor() -> None:
    floor = load_floor(TEMPLATE)
    assert floor.rules() == ("isolated", "no-egress", "signed", "credential-ttl",
                             "inputs-verified")
    found = lint_paths([EXAMPLE, REPO / "dags_examples" / "secure_training.py"], floor)
    assert [f for f in found if f.rule == "SG020"] == []


def test_a_weakening_instance_in_a_dag_file_is_found(tmp_path: Path) -> None:
    source = EXAMPLE.read_text().replace(
        '"params": {"region": region}}',
        '"params": {"region": region}, "isolation": {"network": ["pypi.org:443"]},\n'
        '     "signature_policy": "dev"}')
    found = lint_source(source, "weak.py", load_floor(TEMPLATE))
    lines = source.splitlines()
    iso = next(n for n, text in enumerate(lines, 1) if '"isolation": {"network"' in text)
    assert _floor_findings(found) == [(iso, "floor rule 'no-egress'"),
                                      (iso + 1, "floor rule 'signed'")]
    # the same file without a floor: no SG020
    assert [f for f in lint_source(source, "weak.py") if f.rule == "SG020"] == []


def test_hand_written_tasks_that_weaken_the_floor_are_found() -> None:
    found = lint_source(HAND_WRITTEN, "hand.py", load_floor(TEMPLATE))
    rules = _floor_findings(found)
    lines = HAND_WRITTEN.splitlines()

    def at(text: str) -> int:
        return next(n for n, line in enumerate(lines, 1) if text in line)

    assert rules == sorted([
        (at('task_id="train", python_callable'), "floor rule 'isolated'"),
        (at('task_id="tune"'), "floor rule 'no-egress'"),
        (at('task_id="prep"'), "floor rule 'credential-ttl'"),
        (at('"unsafe_unverified": True'), "floor rule 'inputs-verified'"),
        (at('policy="dev"'), "floor rule 'signed'"),
        (at("@task.stepguard") , "floor rule 'isolated'"),
    ])
    assert not any("'score'" in f.message or "train_fast" in f.message for f in found
                   if f.rule == "SG020")


def test_cli_with_a_floor_file(tmp_path: Path) -> None:
    dag = tmp_path / "hand.py"
    dag.write_text(textwrap.dedent(HAND_WRITTEN))
    r = subprocess.run([sys.executable, "-m", "stepguard.cli", "lint", "--select", "SG020",
                        "--floor", str(TEMPLATE), str(dag)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "SG020 floor rule 'isolated': step 'train' runs in isolation mode 'process'" in r.stdout
    r = subprocess.run([sys.executable, "-m", "stepguard.cli", "lint", "--select", "SG020",
                        str(dag)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
