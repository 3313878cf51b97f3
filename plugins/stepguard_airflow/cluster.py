"""A real Airflow deployment on one machine, for the example and its tests: the cluster harness.

``dag.test()`` runs every task in the calling process. :class:`AirflowCluster` runs them the way
production does: an ``airflow scheduler`` (LocalExecutor), an ``airflow dag-processor`` and an
``airflow api-server``, each a supervised child process, on a metadata database of their own in
the dev stack's PostgreSQL. Every task instance runs in its own process, in its own working
directory with its own stepguard state dir (:mod:`stepguard_airflow.cluster_worker`); no two
tasks share a process, a working directory or a state dir. The harness itself never imports
Airflow: it talks to the services through their command line and REST API.

Used like this (the example's ``--cluster`` mode, and ``tests/plugins/test_cluster.py``)::

    info = devstack.status(".stepguard/dev")          # a running dev stack with PostgreSQL
    env, worker_env = example_env(root, info)
    with AirflowCluster(root / "cluster", info, dags=[EXAMPLE], env=env,
                        worker_env=worker_env) as cluster:
        run = cluster.run_dag("secure_training")
    run.state, run.states["train"], run.xcom("train")["isolation"]["mode"]
    # -> ('success', 'success', 'sandbox'); run.workers["train"]["cwd"] is train's own dir

What :meth:`AirflowCluster.start` sets up, under ``root``:

* a PostgreSQL role and database ``airflow_<random>`` for the metadata DB, created with the dev
  stack's admin login and dropped again by :meth:`~AirflowCluster.stop`;
* ``airflow/`` -- a private ``AIRFLOW_HOME``: ``airflow.cfg`` (0600: it holds the metadata DB
  password and the API's signing secrets, which no log or report shows), the DAG files under
  ``dags/``, the worker listener under ``plugins/``, the service logs under ``logs/``;
* ``workers/<run id>/<task>/`` -- one directory per task instance: ``work/``, ``state/``,
  ``worker.json``.

The API server listens on 127.0.0.1 only, on a free port, with the simple auth manager's
``all_admins`` mode (no login): a private, loopback-only instance. The scheduler alone gets the
workers' environment (``worker_env``: the Vault AppRole login, connections), as only workers hold
worker credentials in a deployment; the DAG processor and API server get ``env`` alone.

:meth:`~AirflowCluster.stop` runs on every exit path (``with``, errors, ``KeyboardInterrupt``): a
clean SIGTERM to each service, then SIGKILL to anything left in their sessions -- task processes
put themselves in process groups of their own, so a session sweep, not a group kill, finds them.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from stepguard.errors import ServiceError

__all__ = ["ENV_WORKERS_DIR", "WORKER_FILE", "AirflowCluster", "ClusterRun", "example_env",
           "safe_name"]

#: The variable that enables the worker listener: where per-task-instance directories go.
ENV_WORKERS_DIR = "STEPGUARD_CLUSTER_WORKERS_DIR"
#: The record each task instance leaves in its directory.
WORKER_FILE = "worker.json"

#: Airflow's own variables and service credentials never leak from the caller into the cluster.
_STRIPPED_PREFIXES = ("AIRFLOW", "_AIRFLOW", "VAULT_", "BAO_", "AWS_", "PG", "STEPGUARD_")
_FINISHED = {"success", "failed"}
_SERVICES = ("api-server", "scheduler", "dag-processor")

_PLUGIN = '''\
"""Loads stepguard's worker listener: each task instance in its own working and state dir."""
from airflow.plugins_manager import AirflowPlugin

from stepguard_airflow import cluster_worker


class StepguardClusterWorker(AirflowPlugin):
    name = "stepguard_cluster_worker"
    listeners = [cluster_worker]
'''


def safe_name(text: str) -> str:
    """``text`` as one path component: anything but letters, digits, ``._-`` becomes ``_``.

    >>> safe_name("manual__2026-01-01T00:00:00+00:00")
    'manual__2026-01-01T00_00_00_00_00'
    """
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).strip(".") or "_"


@dataclass(frozen=True)
class ClusterRun:
    """One finished DAG run: its state, task states, XComs and where each task ran."""

    dag_id: str
    run_id: str
    state: str
    #: task id -> final state ("success", "failed", "upstream_failed", ...).
    states: dict[str, str]
    #: (task id, key) -> value, as the API server returns it.
    xcoms: dict[tuple[str, str], Any] = field(repr=False)
    #: task id -> the ``worker.json`` its process wrote (pid, cwd, state dir), when it ran.
    workers: dict[str, dict[str, Any]] = field(repr=False)
    #: task id -> the task instance as the API server reports it (pid, hostname, try number).
    instances: dict[str, dict[str, Any]] = field(repr=False)

    def xcom(self, task_id: str, key: str = "return_value") -> Any:
        """The XCom ``key`` of ``task_id``, or None."""
        return self.xcoms.get((task_id, key))


class AirflowCluster:
    """Scheduler + DAG processor + API server on a private metadata DB; see the module.

    ``root``: where everything of this cluster lives. ``info``: the running dev stack (its
    PostgreSQL holds the metadata DB). ``dags``: DAG files to deploy. ``env``: variables every
    Airflow process gets (stepguard settings the DAG reads when parsed); ``worker_env``: variables
    only the workers get. ``timeout``: bound, in seconds, for start-up and for each DAG run.
    """

    def __init__(
        self,
        root: Path,
        info: Any,
        *,
        dags: Iterable[Path],
        env: Mapping[str, str],
        worker_env: Mapping[str, str] | None = None,
        timeout: float = 300.0,
    ) -> None:
        if info.postgres is None:
            raise ServiceError(
                "the cluster harness needs the dev stack's PostgreSQL for Airflow's metadata DB",
                subject="postgresql", hint="apt-get install postgresql",
            )
        self.root = Path(root).absolute()
        self.home = self.root / "airflow"
        self.workers_dir = self.root / "workers"
        self._pg = info.postgres
        self._dags = [Path(d) for d in dags]
        self._env = dict(env)
        self._worker_env = dict(worker_env or {})
        self.timeout = timeout
        self._db = f"airflow_{secrets.token_hex(4)}"
        self._db_password = secrets.token_urlsafe(24)
        self._db_created = False
        self._table: Any = None
        self.api_port = 0
        self.log_port = 0

    # -- lifetime ---------------------------------------------------------------------------

    def __enter__(self) -> AirflowCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def api_url(self) -> str:
        """The API server's base URL (loopback)."""
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def service_pids(self) -> dict[str, int]:
        """Service name -> pid of the running services (empty once stopped). Each service runs
        in a session of its own whose id is its pid: everything it starts stays in it."""
        return {} if self._table is None else {p.name: p.pid for p in self._table.procs.values()}

    @property
    def metadata_dsn(self) -> str:
        """libpq DSN of the metadata DB (a secret: for tests that inspect the tables)."""
        return (f"host={self._pg.host} port={self._pg.port} dbname={self._db} user={self._db} "
                f"password={self._db_password} sslmode=disable")

    def start(self) -> None:
        """Create the metadata DB, write the configuration, migrate, start the three services
        and wait until the scheduler and DAG processor report healthy."""
        from stepguard.testing.devstack import (
            ProcessTable,
            free_port,
            http_responds,
            redact_in_logs,
        )

        for d in (self.root, self.home, self.home / "dags", self.home / "plugins",
                  self.home / "logs", self.workers_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        redact_in_logs(self._db_password)
        self._create_database()
        self.api_port, self.log_port = free_port(), free_port()
        self._write_home()
        self._migrate()
        self._table = ProcessTable(self.root)
        logs = self.home / "logs"
        base = self._base_env()
        python = sys.executable
        self._table.start(
            "api-server",
            [python, "-m", "airflow", "api-server", "--host", "127.0.0.1",
             "--port", str(self.api_port), "--workers", "1"],
            port=self.api_port, log=logs / "api-server.log", marker=str(self.api_port),
            env=base | self._env, cwd=self.home,
        )
        self._table.start(
            "scheduler", [python, "-m", "airflow", "scheduler"], port=self.log_port,
            log=logs / "scheduler.log", marker="scheduler",
            env=base | self._env | self._worker_env | {ENV_WORKERS_DIR: str(self.workers_dir)},
            cwd=self.home,
        )
        self._table.start(
            "dag-processor", [python, "-m", "airflow", "dag-processor"], port=0,
            log=logs / "dag-processor.log", marker="dag-processor",
            env=base | self._env, cwd=self.home,
        )
        self._table.wait_ready("api-server", http_responds(f"{self.api_url}/api/v2/version",
                                                           ok_only=True),
                               timeout=self.timeout, what="answering")

        def healthy() -> bool:
            for name in ("scheduler", "dag-processor"):
                self._table.check_running(name)
            try:
                health = self._api("GET", "/api/v2/monitor/health")
            except ServiceError:
                return False
            return all((health.get(part) or {}).get("status") == "healthy"
                       for part in ("metadatabase", "scheduler", "dag_processor"))

        self._table.wait_ready("api-server", healthy, timeout=self.timeout,
                               what="reporting the scheduler and DAG processor healthy")

    def stop(self) -> list[str]:
        """Stop the services and everything they started, drop the metadata DB; return the
        problems found (a service that ignored SIGTERM, a leftover process)."""
        from stepguard.testing.devstack import pid_alive, reap, session_members

        problems: list[str] = []
        if self._table is not None:
            procs = list(self._table.procs.values())
            sessions = [p.pid for p in procs]
            # The scheduler's LocalExecutor waits for its workers after the first SIGTERM and
            # stops waiting at the second: ask twice before the table's SIGKILL.
            for attempt in range(2):
                for proc in procs:
                    if pid_alive(proc.pid, proc.marker):
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.kill(proc.pid, proc.stop_signal)
                end = time.monotonic() + (10.0 if attempt == 0 else 5.0)
                while time.monotonic() < end and any(pid_alive(p.pid, p.marker) for p in procs):
                    for proc in procs:
                        reap(proc.pid)
                    time.sleep(0.1)
            problems += self._table.stop_all(timeout=5.0)
            for sid in sessions:
                for pid in session_members(sid):
                    problems.append(f"pid {pid} of session {sid} outlived its service; killed")
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
            self._table = None
        if self._db_created:
            self._drop_database()
        return problems

    # -- running DAGs -----------------------------------------------------------------------

    def run_dag(self, dag_id: str, *, conf: Mapping[str, Any] | None = None) -> ClusterRun:
        """Wait for ``dag_id`` to be parsed, unpause it, trigger a run through the REST API,
        wait for it to finish (bounded by ``timeout``) and collect what it left."""
        quoted = urllib.parse.quote(dag_id, safe="")
        self._until(lambda: self._api("GET", f"/api/v2/dags/{quoted}", missing_ok=True),
                    f"DAG {dag_id} parsed by the DAG processor")
        self._api("PATCH", f"/api/v2/dags/{quoted}", {"is_paused": False})
        # A logical date, as a scheduled run (and dag.test()) has: templates such as
        # {{ ts_nodash }} need one.
        now = datetime.datetime.now(datetime.UTC).isoformat()
        run = self._api("POST", f"/api/v2/dags/{quoted}/dagRuns",
                        {"logical_date": now, "conf": dict(conf or {})})
        return self._collect(dag_id, str(run["dag_run_id"]))

    def set_paused(self, dag_id: str, paused: bool) -> None:
        """Pause or unpause ``dag_id`` once the DAG processor has parsed it. (A DAG scheduled
        on an asset is triggered only by events registered while it is unpaused.)"""
        quoted = urllib.parse.quote(dag_id, safe="")
        self._until(lambda: self._api("GET", f"/api/v2/dags/{quoted}", missing_ok=True),
                    f"DAG {dag_id} parsed by the DAG processor")
        self._api("PATCH", f"/api/v2/dags/{quoted}", {"is_paused": paused})

    def run_ids(self, dag_id: str) -> set[str]:
        """The ids of every run of ``dag_id`` so far."""
        quoted = urllib.parse.quote(dag_id, safe="")
        runs = self._api("GET", f"/api/v2/dags/{quoted}/dagRuns?limit=100", missing_ok=True)
        return {str(r["dag_run_id"]) for r in (runs or {}).get("dag_runs", ())}

    def wait_for_run(self, dag_id: str, *, known: Iterable[str] = ()) -> ClusterRun:
        """Wait for a run of ``dag_id`` that the scheduler starts itself (an asset-triggered
        run), not one of ``known``; wait for it to finish and collect what it left."""
        seen = set(known)

        def started() -> str | None:
            new = sorted(self.run_ids(dag_id) - seen)
            return new[0] if new else None

        run_id = str(self._until(started, f"the scheduler to start a run of {dag_id}"))
        return self._collect(dag_id, run_id)

    def rerun(self, run: ClusterRun) -> ClusterRun:
        """Clear every task instance of a finished run (as "Clear" in the UI does), so the
        scheduler runs them again in the same run -- with the same triggering asset events --
        and collect the run once it finished again."""
        quoted = urllib.parse.quote(run.dag_id, safe="")
        self._api("POST", f"/api/v2/dags/{quoted}/clearTaskInstances",
                  {"dry_run": False, "dag_run_id": run.run_id, "only_failed": False,
                   "reset_dag_runs": True})
        return self._collect(run.dag_id, run.run_id)

    def _collect(self, dag_id: str, run_id: str) -> ClusterRun:
        quoted = urllib.parse.quote(dag_id, safe="")
        path = f"/api/v2/dags/{quoted}/dagRuns/{urllib.parse.quote(run_id, safe='')}"

        def finished() -> Any:
            state = self._api("GET", path)["state"]
            return state if state in _FINISHED else None

        state = str(self._until(finished, f"run {run_id} of {dag_id} finished"))
        tis = self._api("GET", f"{path}/taskInstances?limit=100")["task_instances"]
        instances = {ti["task_id"]: ti for ti in tis}
        states = {ti["task_id"]: str(ti["state"]) for ti in tis}
        entries = self._api("GET", f"{path}/taskInstances/~/xcomEntries?limit=100")
        xcoms: dict[tuple[str, str], Any] = {}
        for entry in entries["xcom_entries"]:
            task, key = entry["task_id"], entry["key"]
            item = self._api(
                "GET", f"{path}/taskInstances/{urllib.parse.quote(task, safe='')}/xcomEntries/"
                       f"{urllib.parse.quote(key, safe='')}?map_index={entry['map_index']}")
            xcoms[(task, key)] = _decoded(item.get("value"))
        workers = {}
        for task_dir in sorted((self.workers_dir / safe_name(run_id)).glob(f"*/{WORKER_FILE}")):
            record = json.loads(task_dir.read_text(encoding="utf-8"))
            workers[record["task_id"]] = record
        return ClusterRun(dag_id, run_id, state, states, xcoms, workers, instances)

    # -- internals --------------------------------------------------------------------------

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_STRIPPED_PREFIXES)}
        return env | {"AIRFLOW_HOME": str(self.home),
                      "AIRFLOW_CONFIG": str(self.home / "airflow.cfg"),
                      "PYTHONUNBUFFERED": "1"}

    def _admin(self, dbname: str = "postgres") -> Any:
        import psycopg2

        conn = psycopg2.connect(host=self._pg.host, port=self._pg.port, dbname=dbname,
                                user=self._pg.admin_user, password=self._pg.admin_password,
                                connect_timeout=5, sslmode="disable")
        conn.autocommit = True
        return conn

    def _create_database(self) -> None:
        import psycopg2

        try:
            conn = self._admin()
            try:
                with conn.cursor() as cur:
                    cur.execute(f"CREATE ROLE {self._db} LOGIN PASSWORD %s",
                                (self._db_password,))
                    self._db_created = True
                    cur.execute(f"CREATE DATABASE {self._db} OWNER {self._db}")
            finally:
                conn.close()
        except psycopg2.Error as exc:
            raise ServiceError("could not create Airflow's metadata database",
                               subject=f"postgresql:{self._db}",
                               details=(type(exc).__name__,)) from exc

    def _drop_database(self) -> None:
        import psycopg2

        with contextlib.suppress(psycopg2.Error):
            conn = self._admin()
            try:
                with conn.cursor() as cur:
                    cur.execute(f"DROP DATABASE IF EXISTS {self._db} WITH (FORCE)")
                    cur.execute(f"DROP ROLE IF EXISTS {self._db}")
            finally:
                conn.close()
        self._db_created = False

    def _write_home(self) -> None:
        import shutil

        from cryptography.fernet import Fernet

        for dag in self._dags:
            shutil.copy2(dag, self.home / "dags" / dag.name)
        (self.home / "plugins" / "stepguard_cluster_worker.py").write_text(_PLUGIN)
        pg = self._pg
        cfg = f"""\
[core]
dags_folder = {self.home / "dags"}
plugins_folder = {self.home / "plugins"}
executor = LocalExecutor
parallelism = 4
load_examples = False
dags_are_paused_at_creation = True
fernet_key = {Fernet.generate_key().decode()}
simple_auth_manager_all_admins = True
execution_api_server_url = {self.api_url}/execution/

[database]
sql_alchemy_conn = postgresql+psycopg2://{self._db}:{self._db_password}@{pg.host}:{pg.port}/{self._db}
sql_alchemy_pool_size = 2
sql_alchemy_max_overflow = 4

[api]
host = 127.0.0.1
port = {self.api_port}
base_url = {self.api_url}
workers = 1
secret_key = {secrets.token_urlsafe(32)}
expose_config = False

[api_auth]
jwt_secret = {secrets.token_urlsafe(32)}

[logging]
base_log_folder = {self.home / "logs"}
worker_log_server_port = {self.log_port}

[scheduler]
scheduler_heartbeat_sec = 2
job_heartbeat_sec = 2

[dag_processor]
refresh_interval = 5
parsing_processes = 1
"""
        path = self.home / "airflow.cfg"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(cfg)

    def _migrate(self) -> None:
        from stepguard.testing.devstack import log_tail

        log = self.home / "logs" / "db-migrate.log"
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as out:
            try:
                code = subprocess.run(
                    [sys.executable, "-m", "airflow", "db", "migrate"], env=self._base_env(),
                    cwd=self.home, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, timeout=self.timeout, check=False,
                ).returncode
            except subprocess.TimeoutExpired:
                code = -1
        if code != 0:
            raise ServiceError(f"airflow db migrate failed (status {code})",
                               subject="airflow db migrate", details=log_tail(log))

    def _api(self, method: str, path: str, body: Mapping[str, Any] | None = None, *,
             missing_ok: bool = False) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        route = path.partition("?")[0]
        req = urllib.request.Request(  # noqa: S310 -- loopback http to our own API server
            f"{self.api_url}{path}", data=data, method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            if missing_ok and exc.code == 404:
                return None
            detail = exc.read()[:500].decode("utf-8", "replace")
            raise ServiceError(f"Airflow API {method} {route}: HTTP {exc.code}",
                               subject="airflow api-server", details=(detail,)) from exc
        except (OSError, ValueError) as exc:
            raise ServiceError(f"Airflow API {method} {route} failed",
                               subject="airflow api-server",
                               details=(type(exc).__name__,)) from exc

    def _until(self, probe: Any, what: str) -> Any:
        """Poll ``probe`` (every 0.5 s) until it returns something truthy; a service that exits
        ends the wait with its log tail."""
        deadline = time.monotonic() + self.timeout
        while True:
            for name in _SERVICES:
                self._table.check_running(name)
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise ServiceError(f"timed out after {self.timeout:g}s waiting for {what}",
                                   subject="airflow cluster",
                                   hint=f"service logs in {self.home / 'logs'}")
            time.sleep(0.5)


def _decoded(value: Any) -> Any:
    """An XCom value from the API: JSON text is parsed, anything else returned as it is."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value


def example_env(root: Path, info: Any, *,
                pod_image: str | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(env, worker_env) for the example DAG in cluster shape: nothing shared but Vault, the
    object store and the metadata DB. Data, models, receipts and audit segments go to the dev
    stack's S3 endpoint under a prefix of its own, with a just-in-time web-identity credential
    per task (no AWS keys anywhere); receipts are signed with Transit and every consumer
    verifies them; the registry is in the object store; workers log in with AppRole.

    With ``pod_image`` (``stepguard.testing.podman.build_image()``) ``train`` runs as a pod:
    the step runner is its entrypoint, it logs in to Vault itself (JWT auth with a projected
    token signed by the dev stack's trusted issuer key), reads the dataset from and writes the
    model to the object store, and signs its receipt with Transit. The workers create the pod
    through ``STEPGUARD_KUBE_API`` (podman ``kube play`` of the exact manifests)."""
    import uuid

    pg = info.postgres
    store = f"s3://stepguard-data/cluster-{uuid.uuid4().hex[:8]}"
    cfg = root / "stepguard.yaml"
    pods = ""
    if pod_image:
        pods = (f'pods: {{image: "{pod_image}", vault_login: jwt, jwt_role: {info.jwt_role}, '
                f"jwt_audience: {info.jwt_audience}}}\n")
    cfg.write_text(
        f'vault: {{addr: "{info.vault_addr}", auth: approle}}\n'
        f'registry: {{url: "{store}/registry"}}\n'
        "receipts: {signer: transit, key: stepguard-signing, policy: steps}\n"
        "audit: {exporter: jsonl}\n"
        "policies:\n"
        "  release: {kind: transit, key: stepguard-signing, min_version: 1}\n"
        "  steps: {kind: transit, key: stepguard-signing, min_version: 1}\n" + pods)
    env = {
        "STEPGUARD_CONFIG": str(cfg), "STEPGUARD_SERVING_DIR": str(root / "serving"),
        # Read when the DAG is parsed: every task's data goes through the object store.
        "STEPGUARD_EXAMPLE_STORE": store,
        "STEPGUARD_WEB_IDENTITY_ROLE_ARN": info.web_identity_role_arn,
        "AWS_ENDPOINT_URL": info.moto_endpoint, "AWS_REGION": info.aws_region,
        # No static keys: nothing to fall back on if a task had no credential of its own.
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
    }
    worker_env = {
        "AIRFLOW_CONN_CHURN_DB": f"postgresql://{pg.host}:{pg.port}/{pg.database}",
        # Workers log in with AppRole, as deployed workers do; no root token anywhere.
        "VAULT_ADDR": info.vault_addr,
        "VAULT_ROLE_ID": info.approle_role_id,
        "VAULT_SECRET_ID_FILE": str(info.approle_secret_id_file),
    }
    if pod_image:
        env["STEPGUARD_TRAIN_POD"] = "1"  # read when the DAG is parsed
        env["STEPGUARD_TRAIN_IMAGE"] = pod_image
        worker_env.update({
            "STEPGUARD_KUBE_API": "stepguard.testing.kubeplay:from_environment",
            # The cluster's service-account issuer, as the dev OpenBao's jwt/ mount trusts it.
            "STEPGUARD_POD_JWT_KEY": str(info.jwt_private_key_path),
            "STEPGUARD_POD_JWT_ISSUER": info.jwt_issuer,
        })
    return env, worker_env
