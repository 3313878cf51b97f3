"""``stepguard lint DAGS_DIR``: findings with file:line, secret values never printed, CI exit codes."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stepguard_airflow.lint import lint_paths, lint_source

REPO = Path(__file__).resolve().parents[2]
CANARY = "Zq9-canary-Pw-71x"

INSECURE_DAG = f'''
import pendulum
from airflow.sdk import DAG, task
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.standard.operators.bash import BashOperator as Bash

DB_PASSWORD = "{CANARY}"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"

with DAG("insecure", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
    train = KubernetesPodOperator(task_id="train", image="python:3.11", cmds=["python"])
    sh = Bash(task_id="sh", bash_command="curl -u admin:x https://x", env={{"api_token": "{CANARY}"}})

    @task
    def prep():
        uri = "postgresql://etl:{CANARY}@db:5432/prod"
        return 1

    @task.bash
    def run():
        return "echo"
'''

SECURE_DAG = '''
import pendulum
from airflow.sdk import DAG, task
from stepguard_airflow.operators import SecureStepOperator
from stepguard_airflow.operators.kubernetes import SecureKubernetesPodOperator

IMAGE = "registry.example/train@sha256:''' + "ab" * 32 + '''"
with DAG("secure", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
    SecureKubernetesPodOperator(task_id="train", image=IMAGE, cmds=["python"],
                                credentials=[{"name": "db", "kind": "database", "role": "r"}])
    SecureStepOperator(task_id="s", command="echo {{ ds }}", env={"password_file": "/run/x",
                       "token": "{{ conn.vault.password }}"})

    @task.stepguard(shell=True)
    def run():
        return "echo"
'''


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_insecure_dag_findings_name_file_and_line(tmp_path):
    path = _write(tmp_path, "insecure.py", INSECURE_DAG)
    findings = lint_paths([tmp_path])
    got = {(f.rule, f.line) for f in findings}
    lines = path.read_text().splitlines()

    def line_of(text):
        return next(i for i, line in enumerate(lines, 1) if text in line)

    assert ("SG004", line_of("DB_PASSWORD")) in got
    assert ("SG004", line_of("AKIA")) in got
    assert ("SG001", line_of("train = KubernetesPodOperator")) in got
    assert ("SG002", line_of("train = KubernetesPodOperator")) in got
    assert ("SG003", line_of("train = KubernetesPodOperator")) in got
    assert ("SG001", line_of("sh = Bash(")) in got  # aliased import still found
    assert ("SG004", line_of("sh = Bash(")) in got  # api_token in env
    assert ("SG004", line_of("postgresql://")) in got
    assert ("SG001", line_of("    @task")) in got
    assert ("SG001", line_of("@task.bash")) in got
    assert all(f.path == str(path) for f in findings)


def test_secure_dag_is_clean(tmp_path):
    _write(tmp_path, "secure.py", SECURE_DAG)
    assert lint_paths([tmp_path]) == []


def test_kpo_with_security_context_is_not_sg002():
    src = ("from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator\n"
           "KubernetesPodOperator(task_id='t', image='r/i@sha256:" + "0" * 64 + "',\n"
           "    security_context={'runAsNonRoot': True})\n")
    assert [f.rule for f in lint_source(src)] == ["SG001"]


def test_module_examples_run():
    # The doctests of stepguard_airflow.lint (pytest collects doctests under sdk/ only).
    import doctest

    from stepguard_airflow import lint

    result = doctest.testmod(lint)
    assert result.attempted > 0 and result.failed == 0


def test_syntax_error_is_a_finding(tmp_path):
    _write(tmp_path, "broken.py", "def (:\n")
    assert [f.rule for f in lint_paths([tmp_path])] == ["SG000"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "stepguard.cli", "lint", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_cli_exit_codes_json_and_no_secret_in_output(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    _write(bad, "insecure.py", INSECURE_DAG)
    good = tmp_path / "good"
    good.mkdir()
    _write(good, "secure.py", SECURE_DAG)

    r = _cli(str(bad))
    assert r.returncode == 1, r.stderr
    out = r.stdout + r.stderr
    assert "insecure.py:" in out and "SG004" in out
    for form in (CANARY, CANARY.upper(), base64.b64encode(CANARY.encode()).decode(),
                 "AKIAIOSFODNN7EXAMPLE"):
        assert form not in out

    r = _cli("--json", str(bad))
    data = json.loads(r.stdout)
    assert data["count"] == len(data["findings"]) > 5
    assert CANARY not in r.stdout

    assert _cli(str(good)).returncode == 0
    assert _cli("--warn-only", str(bad)).returncode == 0
    assert _cli("--select", "SG003", str(bad)).stdout.count("SG003") == 1
    missing = _cli(str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert "no such file or directory" in missing.stderr


@pytest.mark.parametrize("path", ["dags_examples"])
def test_example_dags_pass_lint(path):
    target = REPO / path
    if not any(target.glob("*.py")):
        pytest.skip("no example DAGs yet")
    findings = [f for f in lint_paths([target]) if "kfp" not in f.path and "pipeline" not in f.path
                and "stock_" not in f.path]
    assert findings == [], [str(f) for f in findings]


def test_stock_example_lists_exactly_what_to_convert():
    """The conversion guide's "before" DAG: one SG001 per task, nothing else."""
    findings = lint_paths([REPO / "dags_examples" / "stock_churn.py"])
    assert [f.rule for f in findings] == ["SG001"] * 6


def test_line_suppression_is_per_rule():
    src = ("from airflow.providers.standard.operators.bash import BashOperator\n"
           "BashOperator(task_id='a', bash_command='x')  # stepguard: ignore[SG001]\n"
           "BashOperator(task_id='b', bash_command='x', env={'password': 'p4ss'})"
           "  # stepguard: ignore[SG001]\n"
           "BashOperator(task_id='c', bash_command='x')\n")
    assert [(f.line, f.rule) for f in lint_source(src)] == [(3, "SG004"), (4, "SG001")]
