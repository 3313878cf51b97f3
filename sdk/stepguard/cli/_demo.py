"""``stepguard demo``: the secured training pipeline end to end on the local dev stack.

ingest (JIT database credential) -> train (bubblewrap sandbox, input verified against the ingest
receipt) -> publish (signed with the Vault Transit key) -> gate (fetch verifies the signature
under an explicit policy) -> promote to a serving directory. Then a short report.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from stepguard.errors import IntegrityError, StepguardError
from stepguard.settings import Settings
from stepguard.spec import RunContext, StepSpec
from stepguard.step import StepEnv, run_step
from stepguard.testing.examples import TRAIN_SCRIPT, export_customers, seed_customers

PIPELINE = "secure_training"
MODEL = "churn-model"

def run_demo(*, workdir: str | None = None, tampered: bool = False,
             keep_services: bool = False, stack: Any = None) -> int:
    """Run the pipeline; returns 0 when every control behaved as it should.

    ``stack``: a running :class:`~stepguard.testing.devstack.DevStackInfo` to use (left running);
    otherwise one is started under ``<workdir>/dev`` and stopped at the end.
    """
    from stepguard.testing import devstack

    root = Path(workdir or Path(".stepguard") / "demo").absolute()
    root.mkdir(parents=True, exist_ok=True)
    state = root / "dev"
    started_here = False
    info = stack if stack is not None else devstack.status(state)
    if info is None:
        _say("starting the local dev stack (OpenBao, PostgreSQL, S3/IAM/STS) ...")
        info = devstack.up(state)
        started_here = True
    try:
        results = run_pipeline(root, info, tampered=tampered)
        stopped_as_expected = tampered and "train" not in results
        return 0 if (not tampered or stopped_as_expected) else 1
    finally:
        if started_here and not keep_services:
            devstack.down(state)


def run_pipeline(root: Path, info: Any, *, tampered: bool = False) -> dict[str, Any]:
    """One pipeline run on a running dev stack; prints the report, returns receipts/errors."""
    if info.postgres is None:
        raise StepguardError("the demo needs PostgreSQL (apt-get install postgresql)",
                             subject="postgres")
    run_id = time.strftime("demo-%Y%m%dT%H%M%S") + ("-tampered" if tampered else "")
    _seed(info)
    settings = _settings(root, info)
    results = _pipeline(root, run_id, settings, tampered, info)
    _report(root, run_id, settings, results, tampered)
    results["settings"] = settings
    results["run_id"] = run_id
    return results


def _say(msg: str) -> None:
    print(f"[stepguard demo] {msg}", file=sys.stderr)


def _settings(root: Path, info: Any) -> Settings:
    # The orchestrator logs in with AppRole, as a scheduler would; no root token is used.
    os.environ["VAULT_ADDR"] = info.vault_addr
    os.environ["VAULT_ROLE_ID"] = info.approle_role_id
    os.environ["VAULT_SECRET_ID_FILE"] = str(info.approle_secret_id_file)
    os.environ.pop("VAULT_TOKEN", None)
    return Settings.from_dict({
        "vault": {"addr": info.vault_addr, "auth": "approle"},
        "registry": {"url": f"file://{root / 'registry'}"},
        "audit": {"exporter": "jsonl", "path": str(root / "audit" / "audit.jsonl")},
        "policies": {"release": {"kind": "transit", "key": "stepguard-signing",
                                "min_version": 1}},
        "state_dir": str(root / "state"),
    })


def _seed(info: Any) -> None:
    pg = info.postgres
    seed_customers(host=pg.host, port=pg.port, dbname=pg.database, user=pg.admin_user,
                   password=pg.admin_password)


def _pipeline(root: Path, run_id: str, settings: Settings, tampered: bool,
              info: Any) -> dict[str, Any]:
    results: dict[str, Any] = {}
    work = root / "runs" / run_id

    def ctx(step: str) -> RunContext:
        return RunContext(pipeline=PIPELINE, run_id=run_id, step=step, orchestrator="cli")

    # 1. ingest: a database user minted for this step only, dropped when it ends.
    ingest = StepSpec.from_dict({
        "name": "ingest", "deadline_s": 120, "isolation": {"mode": "process"},
        "credentials": [{"name": "db", "kind": "database", "role": "stepguard-step"}],
        "outputs": [{"name": "dataset", "path": str(work / "dataset")}],
    })
    pg = {"host": info.postgres.host, "port": info.postgres.port,
          "dbname": info.postgres.database}
    results["ingest"] = r_ingest = run_step(ingest, body=lambda env: _ingest(env, pg),
                                            context=ctx("ingest"), settings=settings)
    _say(f"ingest: dataset {r_ingest.output('dataset').digest}")
    ingest_receipt = work / "ingest.receipt.json"
    ingest_receipt.write_text(r_ingest.to_json())

    if tampered:
        csv_path = work / "dataset" / "churn.csv"
        lines = csv_path.read_text().splitlines()
        lines[5] = lines[5].rsplit(",", 1)[0] + ",1"  # flip one label: a poisoning attempt
        csv_path.write_text("\n".join(lines) + "\n")
        _say("tampered: flipped one label in dataset/churn.csv after ingest")

    # 2. train: sandboxed, no network, input verified against the ingest receipt.
    train = StepSpec.from_dict({
        "name": "train", "deadline_s": 300,
        "inputs": [{"name": "dataset", "path": str(work / "dataset"),
                    "receipt": str(ingest_receipt)}],
        "outputs": [{"name": "model", "path": str(work / "model"),
                     "publish": {"name": MODEL, "version": run_id}}],
        "isolation": {"mode": "sandbox", "network": "none"},
        "signing": {"signer": "transit", "key": "stepguard-signing"},
    })
    try:
        results["train"] = r_train = run_step(train, command=[sys.executable, "-c", TRAIN_SCRIPT],
                                               context=ctx("train"), settings=settings)
    except IntegrityError as err:
        results["train_error"] = err
        _say(f"train: REFUSED before the body ran: {err}")
        return results
    _say(f"train: model {r_train.output('model').digest}")

    # 3. gate: fetch verifies the signature under the 'release' policy, then promote.
    gate = StepSpec.from_dict({
        "name": "gate", "deadline_s": 120, "isolation": {"mode": "process"},
        "outputs": [{"name": "serving", "path": str(work / "serving")}],
    })
    results["gate"] = run_step(gate, body=lambda env: _gate(env, settings, run_id),
                               context=ctx("gate"), settings=settings)
    return results


def _ingest(env: StepEnv, pg: dict[str, Any]) -> None:
    export_customers(env.outputs["dataset"], credentials=env.credentials["db"], **pg)


def _gate(env: StepEnv, settings: Settings, version: str) -> None:
    from stepguard.wiring import fetch_verified

    staged = fetch_verified(settings, MODEL, version, policy="release",
                            dest=env.outputs["serving"] / "staged")
    # Promote: only a verified model ever appears under the serving name.
    (staged).rename(env.outputs["serving"] / MODEL)


def _report(root: Path, run_id: str, settings: Settings,
            results: dict[str, Any], tampered: bool) -> None:
    from stepguard.audit import verify_chain

    def line(text: str = "") -> None:
        print(text)

    line(f"stepguard demo -- pipeline {PIPELINE}, run {run_id}")
    ingest = results["ingest"]
    ds = ingest.output("dataset")
    line(f"  dataset   {ds.digest}  ({ds.files} file, {ds.bytes} bytes)")
    for rec in ingest.credentials:
        state = ("revoked" if rec.revoked
                 else "expires only" if not rec.revocable else "NOT revoked")
        line(f"  ingest    credential '{rec.name}' ({rec.kind}) lease {rec.lease}: {state}")
    if "train_error" in results:
        err = results["train_error"]
        line(f"  train     STOPPED at input verification ({type(err).__name__}); body never ran")
        for d in err.details:
            line(f"              {d}")
    if "train" in results:
        tr = results["train"]
        model = tr.output("model")
        line(f"  train     sandbox, input verified against the ingest receipt: "
             f"{tr.inputs[0].digest == ds.digest}")
        line(f"  model     {model.digest}  ({model.files} files)")
        if model.published:
            line(f"  signed    by {model.published.signer}; bundle {model.published.bundle_digest}")
            line(f"  published {model.published.uri}")
    if "gate" in results:
        gate = results["gate"]
        serving = Path(gate.output("serving").path) / MODEL
        line(f"  gate      signature verified under policy 'release'; promoted to {serving}")
    audit_path = settings.audit_path
    if audit_path.exists():
        report = verify_chain(audit_path)
        line(f"  audit     {audit_path} ({report.records} records, chain intact)")
        line(f"            stepguard audit show {audit_path} --run {run_id}")
    line(f"  receipts  {Path(settings.state_dir) / 'runs' / run_id}")
    published = results["train"].output("model").published if "train" in results else None
    if published is not None:
        logs = f" --audit-log {audit_path}" if audit_path.exists() else ""
        line(f"  next      stepguard trace {published.name}@{published.version} "
             f"--registry {published.registry} --receipts {settings.state_dir}{logs}")
    if tampered:
        ok = "train" not in results
        line("  verdict   " + ("tampered data was refused; training never started" if ok
                              else "TAMPERED DATA WAS NOT CAUGHT"))
