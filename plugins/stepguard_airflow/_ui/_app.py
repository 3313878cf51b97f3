"""The FastAPI app behind the chain-of-custody views, run inside ``airflow api-server``.

Routes (under the plugin's mount, ``/stepguard`` by default):

* ``GET /`` -- recent DAG runs that left stepguard receipts (the nav entry);
* ``GET /dags/{dag_id}/runs/{run_id}`` -- the run's chain-of-custody graph;
* ``GET /dags/{dag_id}/runs/{run_id}/tasks/{task_id}?map_index=-1`` -- one receipt, read-only.

Every route resolves the caller with Airflow's own ``get_user`` dependency (bearer token or the
UI's ``_token`` cookie) and asks the configured auth manager: the run and task views need read
access to the DAG's XComs, the index lists only runs of DAGs whose XComs the caller may read.
An unauthenticated request gets 401 and no receipt data. Reads go through the api-server's
metadata DB session; only receipt XComs (``stepguard_receipt``, ``return_value`` when it is a
receipt, ``stepguard_failed_receipt``) and the gate verdict (``gate``) are read -- never any
other XCom, variable or connection.
"""

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from stepguard_airflow._ui._chain import RECEIPT_SCHEMA, TaskRecord, build_chain
from stepguard_airflow._ui._render import CSP, chain_page, error_page, index_page, receipt_page

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse
    from sqlalchemy.orm import Session

__all__ = ["create_app", "load_run"]

RECEIPT_KEYS = ("stepguard_receipt", "return_value", "stepguard_failed_receipt", "gate")
_INDEX_LIMIT = 50


class RunNotFound(LookupError):
    """No such DAG run."""


def _is_receipt(value: object) -> bool:
    return isinstance(value, Mapping) and value.get("schema") == RECEIPT_SCHEMA \
        and isinstance(value.get("step"), str)


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None and hasattr(value, "isoformat") else None


def load_run(session: "Session", dag_id: str, run_id: str) -> tuple[str | None,
                                                                    list[TaskRecord]]:
    """The run's state and one :class:`TaskRecord` per task instance, oldest first."""
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    run = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id,
                                              DagRun.run_id == run_id))
    if run is None:
        raise RunNotFound(run_id)
    tis = session.scalars(select(TaskInstance).where(TaskInstance.dag_id == dag_id,
                                                     TaskInstance.run_id == run_id)).all()
    rows = session.scalars(select(XComModel).where(
        XComModel.dag_id == dag_id, XComModel.run_id == run_id,
        XComModel.key.in_(RECEIPT_KEYS))).all()
    values: dict[tuple[str, int, str], Any] = {
        (x.task_id, x.map_index, x.key): XComModel.deserialize_value(x) for x in rows}
    records = []
    for ti in sorted(tis, key=lambda t: (_iso(t.start_date) or "~", t.task_id, t.map_index)):
        def get(key: str, ti: Any = ti) -> Any:
            return values.get((ti.task_id, ti.map_index, key))

        receipt = next((v for v in (get("stepguard_receipt"), get("return_value"))
                        if _is_receipt(v)), None)
        failed = get("stepguard_failed_receipt")
        gate = get("gate")
        records.append(TaskRecord(
            task_id=ti.task_id, map_index=ti.map_index,
            state=str(ti.state) if ti.state is not None else None,
            receipt=receipt if receipt is not None else (failed if _is_receipt(failed)
                                                         else None),
            gate=gate if isinstance(gate, Mapping) else None,
            failed_receipt=receipt is None and _is_receipt(failed),
            start_date=_iso(ti.start_date)))
    state = run.state
    return (str(state) if state is not None else None), records


def _recent_runs(session: "Session", allowed: Any) -> list[tuple[str, str, str | None, int]]:
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from sqlalchemy import func, select

    stmt = (select(XComModel.dag_id, XComModel.run_id, func.count())
            .where(XComModel.key.in_(("stepguard_receipt", "stepguard_failed_receipt")))
            .group_by(XComModel.dag_id, XComModel.run_id)
            .order_by(func.max(XComModel.timestamp).desc()).limit(_INDEX_LIMIT))
    out = []
    for dag_id, run_id, n in session.execute(stmt).all():
        if not allowed(dag_id):
            continue
        state = session.scalar(select(DagRun.state).where(DagRun.dag_id == dag_id,
                                                          DagRun.run_id == run_id))
        out.append((dag_id, run_id, str(state) if state is not None else None, int(n)))
    return out


def _html(text: str, status: int = 200) -> "HTMLResponse":
    from fastapi.responses import HTMLResponse

    return HTMLResponse(text, status_code=status, headers={
        "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store", "Referrer-Policy": "same-origin"})


def _base(request: "Request") -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def create_app() -> "FastAPI":
    """The app: built on the first request to the mount, inside the api-server only."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import (
        DagAccessEntity,
        DagDetails,
    )
    from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import HTMLResponse

    app = FastAPI(title="stepguard chain of custody", docs_url=None, redoc_url=None,
                  openapi_url=None)
    can_read_xcom = Depends(requires_access_dag("GET", DagAccessEntity.XCOM))

    @app.get("/", include_in_schema=False)
    def index(request: Request, user: GetUserDep) -> HTMLResponse:
        manager = get_auth_manager()
        seen: dict[str, bool] = {}

        def allowed(dag_id: str) -> bool:
            if dag_id not in seen:
                seen[dag_id] = manager.is_authorized_dag(
                    method="GET", access_entity=DagAccessEntity.XCOM,
                    details=DagDetails(id=dag_id, team_name=DagModel.get_team_name(dag_id)),
                    user=user)
            return seen[dag_id]

        with create_session() as session:
            runs = _recent_runs(session, allowed)
        return _html(index_page(runs, base=_base(request)))

    @app.get("/dags/{dag_id}/runs/{run_id}", dependencies=[can_read_xcom],
             include_in_schema=False)
    def run_view(request: Request, dag_id: str, run_id: str) -> HTMLResponse:
        try:
            with create_session() as session:
                state, records = load_run(session, dag_id, run_id)
        except RunNotFound:
            return _html(error_page(404, "no such DAG run"), 404)
        chain = build_chain(records)
        return _html(chain_page(chain, dag_id=dag_id, run_id=run_id, base=_base(request),
                                run_state=state))

    @app.get("/dags/{dag_id}/runs/{run_id}/tasks/{task_id}", dependencies=[can_read_xcom],
             include_in_schema=False)
    def task_view(request: Request, dag_id: str, run_id: str, task_id: str,
                  map_index: int = -1) -> HTMLResponse:
        try:
            with create_session() as session:
                _, records = load_run(session, dag_id, run_id)
        except RunNotFound:
            return _html(error_page(404, "no such DAG run"), 404)
        record = _find(records, task_id, map_index)
        if record is None:
            return _html(error_page(404, "no such task instance"), 404)
        return _html(receipt_page(record, dag_id=dag_id, run_id=run_id, base=_base(request)))

    return app


def _find(records: Sequence[TaskRecord], task_id: str, map_index: int) -> TaskRecord | None:
    return next((r for r in records if r.task_id == task_id and r.map_index == map_index), None)
