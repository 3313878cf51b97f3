"""Run the example DAG ``secure_training`` end to end under Airflow, on the local dev stack.

    python -m stepguard_airflow.example [--workdir DIR] [--tampered] [--cluster]
                                        [--keep-services] [--dev-dir DIR]

Starts (or reuses) the dev stack (OpenBao, PostgreSQL), seeds the ``customers`` table, points a
private ``AIRFLOW_HOME`` (SQLite) at ``dags_examples/secure_training.py`` and runs the DAG with
``dag.test()``. Then prints a short report from the receipts in XCom: dataset and model digests,
signer and gate verdict, credentials issued and revoked, where the audit trail is. With
``--tampered`` it runs ``secure_training_tampered`` and reports that the run stopped at
verification with training never started. Exit status 0 when every control behaved.

``--cluster`` runs the same DAG the way production does (:mod:`stepguard_airflow.cluster`): a
real scheduler (LocalExecutor), DAG processor and API server on a metadata DB in the dev stack's
PostgreSQL, the run triggered and read back through the REST API, every task in its own process,
working directory and state dir (under ``<workdir>/cluster/workers/``). The report is the same,
plus where each task ran; the audit log is one per task, each chain verified.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).resolve().parents[2] / "dags_examples" / "secure_training.py"
STEPS = ("ingest", "verify_dataset", "train", "sign_and_publish", "gate", "deploy")


def _say(msg: str) -> None:
    print(f"[stepguard airflow] {msg}", file=sys.stderr)


def _seed(pg: Any) -> None:
    from stepguard.testing.examples import seed_customers

    seed_customers(host=pg.host, port=pg.port, dbname=pg.database, user=pg.admin_user,
                   password=pg.admin_password)


def _environment(root: Path, info: Any) -> None:
    """Everything Airflow and stepguard read, set before Airflow is imported."""
    home = root / "airflow"
    (home / "dags").mkdir(parents=True, exist_ok=True)
    shutil.copy2(EXAMPLE, home / "dags" / "secure_training.py")
    cfg = root / "stepguard.yaml"
    cfg.write_text(
        f'vault: {{addr: "{info.vault_addr}", auth: approle}}\n'
        f'registry: {{url: "file://{root / "registry"}"}}\n'
        f'audit: {{exporter: jsonl, path: "{root / "audit" / "audit.jsonl"}"}}\n'
        "policies:\n  release: {kind: transit, key: stepguard-signing, min_version: 1}\n"
        f'state_dir: "{root / "state"}"\n')
    pg = info.postgres
    os.environ.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW_CONN_CHURN_DB": f"postgresql://{pg.host}:{pg.port}/{pg.database}",
        "STEPGUARD_CONFIG": str(cfg),
        "STEPGUARD_SERVING_DIR": str(root / "serving"),
        # The worker logs in with AppRole, as a deployed worker would; no root token is used.
        "VAULT_ADDR": info.vault_addr,
        "VAULT_ROLE_ID": info.approle_role_id,
        "VAULT_SECRET_ID_FILE": str(info.approle_secret_id_file),
    })
    os.environ.pop("VAULT_TOKEN", None)


def _run(dag_id: str) -> tuple[dict[str, str], dict[str, Any], str]:
    import logging
    import runpy

    from airflow.models.xcom import XComModel
    from airflow.utils import db
    from airflow.utils.session import create_session
    from sqlalchemy import select

    logging.disable(logging.WARNING)
    home = Path(os.environ["AIRFLOW_HOME"])
    if not (home / ".migrated").exists():
        db.initdb()
        (home / ".migrated").touch()
    dag = runpy.run_path(str(home / "dags" / "secure_training.py"))[dag_id]
    dr = dag.test()
    with create_session() as session:
        states = {ti.task_id: str(ti.state) for ti in dr.get_task_instances(session=session)}
        rows = session.scalars(select(XComModel).where(
            XComModel.dag_id == dr.dag_id, XComModel.run_id == dr.run_id)).all()
        xcoms = {(r.task_id, r.key): XComModel.deserialize_value(r) for r in rows}
    return states, _receipts(xcoms), dr.run_id


def _run_cluster(root: Path, info: Any, dag_id: str, *, tampered: bool) -> bool:
    """The DAG on a real scheduler, DAG processor and API server; report; True when it behaved."""
    from stepguard_airflow.cluster import AirflowCluster, example_env

    base = root / "cluster"
    shutil.rmtree(base / "airflow", ignore_errors=True)  # a fresh AIRFLOW_HOME per run
    base.mkdir(parents=True, exist_ok=True)
    pod_image = _pod_image()
    env, worker_env = example_env(root, info, pod_image=pod_image)
    _say(f"starting airflow scheduler, dag-processor and api-server (AIRFLOW_HOME="
         f"{base / 'airflow'}, metadata DB in the dev stack's PostgreSQL) ...")
    with AirflowCluster(base, info, dags=[EXAMPLE], env=env, worker_env=worker_env) as cluster:
        _say(f"running {dag_id} through the REST API of {cluster.api_url}")
        run = cluster.run_dag(dag_id)
        problems = cluster.stop()
    for problem in problems:
        _say(f"shutdown: {problem}")
    return _report(root, dag_id, run.run_id, states=run.states, receipts=_receipts(run.xcoms),
                   tampered=tampered, workers=run.workers)


def _pod_image() -> str | None:
    """The runtime image for ``train`` as a pod (built once per content hash), or None with
    the reason printed where podman cannot run here (``train`` then runs in the sandbox)."""
    from stepguard.testing.podman import Podman, build_image, unavailable

    podman = Podman.default()
    reason = unavailable(podman)
    if reason:
        _say(f"train runs in the sandbox, not as a pod: {reason}")
        return None
    _say("building (or reusing) the stepguard runtime image for the training pod ...")
    image = build_image(podman)
    _say(f"training pod image: {image}")
    return image


def _receipts(xcoms: dict[tuple[str, str], Any]) -> dict[str, Any]:
    """Task id -> receipt, plus ``_gate`` (the gate's verdict) and ``_failed`` (failed steps)."""
    receipts = {task: value for (task, key), value in xcoms.items() if key == "return_value"}
    receipts["_gate"] = xcoms.get(("gate", "gate"))
    receipts["_failed"] = {task: value for (task, key), value in xcoms.items()
                           if key == "stepguard_failed_receipt"}
    return receipts


def _report(root: Path, dag_id: str, run_id: str, *, states: dict[str, str],
            receipts: dict[str, Any], tampered: bool,
            workers: dict[str, dict[str, Any]] | None = None) -> bool:
    """Print the report; True when every control behaved. ``workers`` (cluster runs): task id
    -> where its process ran; each task then has its own audit log and receipts."""
    from stepguard.audit import verify_chain

    def line(text: str) -> None:
        print(text)

    line(f"stepguard on Airflow -- DAG {dag_id}, run {run_id}")
    for step in ("attacker_poisons_data_lake", *STEPS):
        if step in states:
            line(f"  {step:28s} {states[step]}")
    ingest = receipts.get("ingest")
    if ingest:
        ds = ingest["outputs"][0]
        line(f"  dataset   {ds['digest']}  ({ds['files']} file, {ds['bytes']} bytes)")
        for rec in ingest["credentials"]:
            state = ("revoked" if rec["revoked"] else "expires only" if not rec["revocable"]
                     else "NOT revoked")
            line(f"  ingest    JIT credential '{rec['name']}' ({rec['kind']}) lease "
                 f"{rec['lease']}: {state}")
    failed = receipts["_failed"].get("verify_dataset")
    if failed:
        err = failed.get("error") or {}
        line(f"  verify    STOPPED: {err.get('type')}: {err.get('message')}: {err.get('subject')}")
    in_pod = receipts["_failed"].get("train")
    if in_pod:
        err = in_pod.get("error") or {}
        line(f"  train     STOPPED in the pod: {err.get('type')}: {err.get('message')}: "
             f"{err.get('subject')}")
    train = receipts.get("train")
    if train:
        model = train["outputs"][0]
        # No ingest receipt (its XCom lost): nothing to check the input against.
        verified = ingest is not None and \
            train["inputs"][0]["digest"] == ingest["outputs"][0]["digest"]
        iso = train["isolation"]
        mode = f"pod {iso['pod']}" if iso.get("pod") else iso.get("mode")
        line(f"  train     {mode}, input verified against the ingest receipt: {verified}")
        line(f"  model     {model['digest']}  ({model['files']} files)")
    publish = receipts.get("sign_and_publish")
    if publish and publish["outputs"][0].get("published"):
        pub = publish["outputs"][0]["published"]
        line(f"  signed    by {pub['signer']}; bundle {pub['bundle_digest']}")
        line(f"  published {pub['uri']}")
    gate = receipts.get("_gate")
    if gate:
        line(f"  gate      verified under policy '{gate['policy']}' (signer {gate['signer']})")
    deploy = receipts.get("deploy")
    if deploy:
        line(f"  deployed  {deploy['outputs'][0]['path']}")
    apart = True
    if workers is None:
        audit = root / "audit" / "audit.jsonl"
        if audit.exists():
            line(f"  audit     {audit} ({verify_chain(audit).records} records, chain intact)")
            line(f"            stepguard audit show {audit}")
        line(f"  receipts  {root / 'state' / 'runs'}")
    else:
        ran = [t for t in states if states[t] in ("success", "failed")]
        pids = {workers[t]["pid"] for t in ran if t in workers}
        dirs = {workers[t]["state_dir"] for t in ran if t in workers}
        apart = len(pids) == len(dirs) == len(ran)
        tasks_dir = next(iter(workers.values()), {}).get("cwd", "")
        tasks_dir = str(Path(tasks_dir).parent.parent) if tasks_dir else "?"
        line(f"  workers   {len(ran)} tasks, {len(pids)} processes, {len(dirs)} state dirs "
             f"(none shared): {tasks_dir}/<task>/"
             + ("" if apart else "  TASKS SHARED A PROCESS OR A DIRECTORY"))
        audits = [Path(w["state_dir"]) / "audit" / "audit.jsonl" for w in workers.values()]
        audits = [a for a in audits if a.exists()]
        if audits:
            records = sum(verify_chain(a).records for a in audits)
            line(f"  audit     one log per task, {len(audits)} chains intact ({records} records)")
            line(f"            stepguard audit show {tasks_dir}/<task>/state/audit/audit.jsonl")
        line(f"  receipts  XCom in the metadata DB, and {tasks_dir}/<task>/state/runs")
    if tampered:
        ok = states.get("verify_dataset") == "failed" and "train" not in receipts and \
            states.get("train") == "upstream_failed"
        if in_pod:  # train as a pod: the lake copy was poisoned after verify_dataset passed
            ok = states.get("train") == "failed" and "train" not in receipts and \
                (in_pod.get("error") or {}).get("type") == "IntegrityError" and \
                "body" not in (in_pod.get("timings_ms") or {})
        line("  verdict   " + ("tampered data was refused; training never started" if ok
                              else "TAMPERED DATA WAS NOT CAUGHT"))
        return ok and apart
    return apart and all(states.get(s) == "success" for s in STEPS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stepguard_airflow.example",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--workdir", default=".stepguard/airflow-example")
    ap.add_argument("--tampered", action="store_true", help="run the tampered variant")
    ap.add_argument("--keep-services", action="store_true",
                    help="leave the dev stack running afterwards")
    ap.add_argument("--dev-dir", help="state dir of a running dev stack to use (left running)")
    ap.add_argument("--cluster", action="store_true",
                    help="run it on a real scheduler, DAG processor and API server, every task "
                         "in its own process, working directory and state dir")
    args = ap.parse_args(argv)

    from stepguard.testing import devstack

    root = Path(args.workdir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    state = Path(args.dev_dir) if args.dev_dir else root / "dev"
    info = devstack.status(state)
    started = False
    if info is None:
        _say("starting the local dev stack (OpenBao, PostgreSQL, S3/IAM/STS) ...")
        info = devstack.up(state)
        started = True
    try:
        if info.postgres is None:
            _say("the example needs PostgreSQL (apt-get install postgresql)")
            return 2
        _seed(info.postgres)
        dag_id = "secure_training_tampered" if args.tampered else "secure_training"
        if args.cluster:
            return 0 if _run_cluster(root, info, dag_id, tampered=args.tampered) else 1
        _environment(root, info)
        _say(f"running {dag_id} with dag.test() (AIRFLOW_HOME={os.environ['AIRFLOW_HOME']})")
        states, receipts, run_id = _run(dag_id)
        ok = _report(root, dag_id, run_id, states=states, receipts=receipts,
                     tampered=args.tampered)
        return 0 if ok else 1
    finally:
        if started and not args.keep_services:
            devstack.down(state)


def run_demo(*, workdir: str | None = None, tampered: bool = False,
             keep_services: bool = False, cluster: bool = False) -> int:
    """The example DAG under Airflow.

    ``stepguard demo --engine airflow`` (the default engine while this adapter is installed):
    :func:`main` with ``workdir`` defaulting to ``.stepguard/demo``; ``cluster`` is
    ``stepguard demo --cluster``. A :class:`~stepguard.errors.ConfigurationError` when Airflow
    is not installed.
    """
    import importlib.util

    from stepguard.errors import ConfigurationError

    if importlib.util.find_spec("airflow") is None:
        raise ConfigurationError(
            "the Airflow demo needs the airflow extra", subject="demo --engine airflow",
            hint="pip install 'stepguard[airflow]', or run: stepguard demo --engine sdk",
        )
    argv = ["--workdir", workdir or ".stepguard/demo"]
    argv += ["--tampered"] if tampered else []
    argv += ["--keep-services"] if keep_services else []
    argv += ["--cluster"] if cluster else []
    return main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
