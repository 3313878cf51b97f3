"""Airflow fixtures: one AIRFLOW_HOME with a migrated SQLite metadata DB per test session.

Airflow reads its configuration when first imported, so the environment is set here, at
conftest import, before any test module imports airflow. DAG files that tests run through
``dag.test()`` are written into the session's dags folder: ``dag.test()`` (Airflow 3) parses and
serializes the dags-folder bundle before it creates the run.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="stepguard-airflow-home-"))
_STATE = _HOME / "stepguard-state"
if "airflow" not in sys.modules:
    os.environ["AIRFLOW_HOME"] = str(_HOME)
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(_HOME / "dags")
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
    os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_HOME}/airflow.db"
    os.environ["AIRFLOW__LOGGING__BASE_LOG_FOLDER"] = str(_HOME / "logs")
(_HOME / "dags").mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """The session's AIRFLOW_HOME, with the metadata DB migrated (once)."""
    from airflow.configuration import conf
    from airflow.utils import db

    if Path(conf.get("core", "dags_folder")) != _HOME / "dags":
        pytest.fail("airflow was imported before tests/plugins/conftest.py set AIRFLOW_HOME; "
                    "import airflow lazily in tests outside tests/plugins")
    if not (_HOME / ".migrated").exists():
        db.initdb()
        (_HOME / ".migrated").touch()
    return _HOME


@pytest.fixture
def stepguard_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """stepguard settings for one test: a private state dir, the local JSONL audit log."""
    for var in list(os.environ):
        if var.startswith("STEPGUARD_") or var in ("VAULT_ADDR", "VAULT_TOKEN", "BAO_ADDR"):
            monkeypatch.delenv(var, raising=False)
    state = tmp_path / "state"
    monkeypatch.setenv("STEPGUARD_STATE_DIR", str(state))
    monkeypatch.setenv("STEPGUARD_AUDIT_EXPORTER", "jsonl")
    monkeypatch.setenv("STEPGUARD_AUDIT_PATH", str(tmp_path / "audit.jsonl"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_dag(source: str, dag_id: str | None = None) -> tuple[Any, str]:
    """Write a DAG file into the dags folder, import it, return (dag, dag_id).

    The source may use ``{dag_id}``: a fresh id per call, so runs never collide.
    """
    dag_id = dag_id or f"t_{uuid.uuid4().hex[:10]}"
    path = _HOME / "dags" / f"{dag_id}.py"
    path.write_text(textwrap.dedent(source).replace("{dag_id}", dag_id))
    spec = importlib.util.spec_from_file_location(f"dagfile_{dag_id}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = next(v for v in vars(module).values()
               if type(v).__name__ == "DAG" and getattr(v, "dag_id", None) == dag_id)
    return dag, dag_id


def load_dag_file(source_path: Path, name: str) -> Any:
    """Copy a DAG file into the dags folder (``dag.test()`` parses that bundle) and import it."""
    path = _HOME / "dags" / f"{name}.py"
    path.write_text(Path(source_path).read_text())
    spec = importlib.util.spec_from_file_location(f"dagfile_{name}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ti_states(dag_run: Any) -> dict[str, str]:
    """task_id -> final state of a finished ``dag.test()`` run."""
    from airflow.utils.session import create_session

    with create_session() as session:
        return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances(session=session)}


def xcom(dag_run: Any, task_id: str, key: str = "return_value") -> Any:
    """The XCom value a task pushed in a ``dag.test()`` run (None when absent)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        row = session.scalars(select(XComModel).where(
            XComModel.dag_id == dag_run.dag_id, XComModel.run_id == dag_run.run_id,
            XComModel.task_id == task_id, XComModel.key == key)).first()
        if row is None:
            return None
        return XComModel.deserialize_value(row)


@pytest.fixture
def airflow_run(airflow_db: Path) -> Iterator[Any]:
    """Helpers bundled for tests: write_dag, ti_states, xcom, home."""
    class _Helpers:
        home = airflow_db
        write = staticmethod(write_dag)
        load = staticmethod(load_dag_file)
        states = staticmethod(ti_states)
        xcom_of = staticmethod(xcom)

    yield _Helpers


@pytest.fixture(autouse=True)
def _fresh_airflow_masker() -> Iterator[None]:
    """Each test starts with Airflow's secrets masker as a task process has it: empty.

    A real task runs in a process of its own, so the masker only holds that task's secrets;
    this session runs hundreds of tasks in one process, and the masker recompiles one pattern
    over everything it holds on every new secret. stepguard's own registry is left alone.
    """
    yield
    if "airflow.sdk._shared.secrets_masker" in sys.modules:
        from airflow.sdk._shared.secrets_masker import _secrets_masker

        _secrets_masker().reset_masker()
