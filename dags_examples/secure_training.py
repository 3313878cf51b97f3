"""Secured training pipeline: ingest -> verify -> train -> sign + publish -> gate -> deploy.

Every task is a stepguard step and passes its receipt (never a credential) to the next one
through XCom; each step verifies its input against the receipt of the step that produced it.

* ``ingest``: reads the ``customers`` table with a PostgreSQL user minted by Vault for this task
  only (dropped when the task ends); the Airflow connection ``churn_db`` holds only where the
  database is, never a password. The extract is hashed into a manifest.
* ``verify_dataset``: the data lake copy is checked against that manifest; any modified, added
  or missing file stops the run here.
* ``train``: runs in the local bubblewrap sandbox (no network, read-only view of the verified
  input, private /tmp). With ``STEPGUARD_K8S_NAMESPACE`` and ``STEPGUARD_TRAIN_IMAGE`` (a
  digest-pinned image holding stepguard and the training code) set when the DAG is parsed, it
  runs as a restricted pod instead (``SecureKubernetesPodOperator``).
* ``sign_and_publish``: the model, verified against the training receipt, is signed with the
  Vault Transit key and published to the registry.
* ``gate``: the model is fetched back from the registry and verified under the ``release``
  policy (signer identity, every file digest, unsafe formats).
* ``deploy``: the verified model is promoted into the serving directory.

``secure_training_tampered`` is the same pipeline with one extra task standing in for an attacker
who flips one label in the data lake after ingestion: the run stops at ``verify_dataset`` and
``train`` never starts.

Settings come from stepguard's settings file (``$STEPGUARD_CONFIG``) and ``STEPGUARD_*`` /
``VAULT_*`` variables: Vault address and AppRole login, the registry, the ``release`` policy,
the audit log. ``STEPGUARD_SERVING_DIR`` is where models are promoted (default: a ``serving``
directory under the state dir).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG
from airflow.sdk.bases.operator import BaseOperator

from stepguard.testing.examples import TRAIN_SCRIPT, export_customers
from stepguard_airflow.operators import (
    IngestDatasetOperator,
    SecureStepOperator,
    SignAndPublishModelOperator,
    VerifyDatasetOperator,
    VerifyModelOperator,
)

MODEL = "churn-model"
VERSION = "{{ ts_nodash }}"

def extract_customers(step_env: Any, dest: Path) -> None:
    """Ingest body: the JIT database user reads the table into ``dest/churn.csv``."""
    from airflow.sdk import BaseHook

    where = BaseHook.get_connection("churn_db")  # host/port/db only; no password stored
    export_customers(dest, credentials=step_env.credentials["db"], host=where.host,
                     port=where.port, dbname=where.schema)


def promote(step_env: Any) -> str:
    """Deploy body: copy the verified model into the serving directory."""
    import shutil

    src, dst = step_env.inputs["model"], step_env.outputs["serving"]
    for item in src.iterdir():
        if item.is_file():
            shutil.copy2(item, dst / item.name)
    return str(dst)


def poison_dataset(ingest_receipt: dict[str, Any]) -> None:
    """The attacker of the tampered variant: flips one label in the data lake copy."""
    path = Path(ingest_receipt["outputs"][0]["path"]) / "churn.csv"
    lines = path.read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ",1"
    path.write_text("\n".join(lines) + "\n")


def _train_task(dataset: Any) -> BaseOperator:
    namespace = os.environ.get("STEPGUARD_K8S_NAMESPACE")
    image = os.environ.get("STEPGUARD_TRAIN_IMAGE")
    if namespace and image:
        from stepguard_airflow.operators.kubernetes import SecureKubernetesPodOperator

        # In a cluster the step runner is the pod's entrypoint: it verifies the input, runs the
        # body, hashes the output, all inside the restricted pod.
        return SecureKubernetesPodOperator(
            task_id="train", namespace=namespace, image=image,
            cmds=["stepguard", "exec", "--spec", "/etc/stepguard/train.yaml", "--",
                  "python", "-m", "train"],
        )
    return SecureStepOperator(
        task_id="train",
        spec={
            "inputs": [{"name": "dataset"}],
            "outputs": [{"name": "model", "path": "model"}],
            "isolation": {"mode": "sandbox", "network": "none"},
            "deadline_s": 600,
        },
        receipts={"dataset": dataset},
        command=[sys.executable, "-c", TRAIN_SCRIPT],
    )


def build_dag(dag_id: str, *, tampered: bool = False) -> DAG:
    """The pipeline; ``tampered`` adds the attacker task between ingest and verification."""
    with DAG(
        dag_id,
        schedule=None,
        start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
        catchup=False,
        tags=["stepguard", "example"],
        doc_md=__doc__,
    ) as dag:
        ingest = IngestDatasetOperator(
            task_id="ingest",
            dataset="churn",
            version=VERSION,
            fetch=extract_customers,
            credential={"name": "db", "kind": "database", "role": "stepguard-step"},
        )
        verify = VerifyDatasetOperator(task_id="verify_dataset", dataset=ingest.output)
        if tampered:
            from airflow.providers.standard.operators.python import PythonOperator

            attacker = PythonOperator(  # stepguard: ignore[SG001] -- the simulated attacker
                task_id="attacker_poisons_data_lake",
                python_callable=poison_dataset,
                op_args=[ingest.output],
            )
            ingest >> attacker >> verify  # type: ignore[operator]
        train = _train_task(ingest.output)
        verify >> train  # type: ignore[operator]
        publish = SignAndPublishModelOperator(
            task_id="sign_and_publish",
            model=train.output,
            name=MODEL,
            version=VERSION,
            signing={"signer": "transit", "key": "stepguard-signing"},
        )
        gate = VerifyModelOperator(task_id="gate", model=publish.output, policy="release")
        serving = os.environ.get("STEPGUARD_SERVING_DIR")
        SecureStepOperator(
            task_id="deploy",
            spec={
                "inputs": [{"name": "model"}],
                "outputs": [{"name": "serving", "path": (
                    f"{serving}/{MODEL}/{VERSION}" if serving else f"serving/{MODEL}")}],
                "isolation": {"mode": "process"},
            },
            receipts={"model": gate.output},
            python_callable=promote,
        )
    return dag


secure_training = build_dag("secure_training")
secure_training_tampered = build_dag("secure_training_tampered", tampered=True)
