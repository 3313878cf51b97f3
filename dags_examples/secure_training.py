"""Secured training pipeline: ingest -> verify -> train -> sign + publish -> gate -> deploy.

Every task is a stepguard step and passes its receipt (never a credential) to the next one
through XCom; each step verifies its input against the receipt of the step that produced it.

* ``ingest``: reads the ``customers`` table with a PostgreSQL user minted by Vault for this task
  only (dropped when the task ends); the Airflow connection ``churn_db`` holds only where the
  database is, never a password. The extract is hashed into a manifest.
* ``verify_dataset``: the data lake copy is checked against that manifest; any modified, added
  or missing file stops the run here.
* ``train``: runs in the local bubblewrap sandbox (no network, read-only view of the verified
  input, private /tmp). With ``STEPGUARD_EXAMPLE_STORE``, ``STEPGUARD_TRAIN_POD`` and
  ``STEPGUARD_TRAIN_IMAGE`` (a digest-pinned image holding stepguard and the training code) set
  when the DAG is parsed, it runs as a restricted pod instead (``SecureKubernetesPodOperator``,
  in ``STEPGUARD_K8S_NAMESPACE``), the step runner as its entrypoint.
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

**On several workers** (no shared disk): set ``STEPGUARD_EXAMPLE_STORE`` (an object-store
prefix, e.g. ``s3://stepguard-data/example``) and ``STEPGUARD_WEB_IDENTITY_ROLE_ARN`` (the AWS
role the tasks assume through Vault identity tokens) when the DAG is parsed. Then the dataset,
the trained model and the gate's verified model are written under that prefix (uploaded with
checksums, manifests, receipt copies and audit segments beside them), every task reads its
input from there with its own just-in-time ``lake`` credential, and XCom carries only receipts.
Use an ``s3://`` registry in the settings (``registry.url``) reachable with the same role.
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
#: Object-store prefix for data and models (several workers); unset: the worker's disk.
STORE = os.environ.get("STEPGUARD_EXAMPLE_STORE", "").rstrip("/")
#: The data-lake credential each task mints for itself (Vault identity token -> STS).
LAKE = {"name": "lake", "kind": "aws_web_identity",
        "role": os.environ.get("STEPGUARD_WEB_IDENTITY_ROLE_ARN", ""), "delivery": "none"}


def _where(step: str, name: str, local: str) -> str:
    """Where ``step`` writes output ``name``: a fresh object-store location per run and try,
    or ``local`` (under the task's state dir) on one machine."""
    return f"{STORE}/{{run_id}}/{step}/try-{{try_number}}/{name}" if STORE else local


def _lake() -> dict[str, Any] | None:
    return dict(LAKE) if STORE else None

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


def _flip_label(text: str) -> str:
    lines = text.splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ",1"
    return "\n".join(lines) + "\n"


def poison_dataset(ingest_receipt: dict[str, Any]) -> None:
    """The attacker of the tampered variant: flips one label in the data lake copy. In the
    object store it is an insider with legitimate write access to the lake (its own
    just-in-time credential), which is exactly what manifests are for."""
    where = str(ingest_receipt["outputs"][0]["path"])
    if not where.startswith("s3://"):
        path = Path(where) / "churn.csv"
        path.write_text(_flip_label(path.read_text()))
        return
    from stepguard.credentials import open_session
    from stepguard.settings import Settings
    from stepguard.spec import CredentialRequest, RunContext
    from stepguard.wiring import s3_client, vault_config

    bucket, _, prefix = where[len("s3://"):].partition("/")
    key = prefix + "churn.csv"
    req = CredentialRequest.from_dict({k: v for k, v in LAKE.items() if k != "delivery"})
    with open_session([req], settings=vault_config(Settings.load()), context=RunContext(),
                      ttl_s=900) as session:
        s3 = s3_client(session.values["lake"])
        text = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        s3.put_object(Bucket=bucket, Key=key, Body=_flip_label(text).encode())


#: One line (a pod's command is stored in its manifest): the training script from the image.
POD_TRAIN = ["python3", "-c",
             "import stepguard.testing.examples as e; exec(e.TRAIN_SCRIPT)"]


def _train_task(dataset: Any) -> BaseOperator:
    if STORE and os.environ.get("STEPGUARD_TRAIN_POD"):
        # SecureKubernetesPodOperator: the step runner is the pod's entrypoint (image: a
        # digest-pinned runtime image with stepguard and the training code). It logs in to
        # Vault from inside the pod, verifies the dataset it downloads against the ingest
        # receipt, trains, uploads the model and hands its signed receipt back to this task.
        from kubernetes.client import models as k8s  # type: ignore[import-untyped]

        from stepguard_airflow.operators.kubernetes import SecureKubernetesPodOperator

        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        return SecureKubernetesPodOperator(
            task_id="train",
            namespace=os.environ.get("STEPGUARD_K8S_NAMESPACE", "default"),
            image=os.environ["STEPGUARD_TRAIN_IMAGE"],
            cmds=POD_TRAIN,
            network=[],  # Vault, the object store and OTLP from settings; nothing else
            credentials=[LAKE],
            receipts={"dataset": dataset},
            outputs={"model": _where("train", "model", "model")},
            spec={"storage": {"credential": LAKE["name"], "endpoint_url": endpoint}},
            env_vars={"AWS_REGION": os.environ.get("AWS_REGION", "us-east-1"),
                      **({"AWS_ENDPOINT_URL": endpoint} if endpoint else {})},
            container_resources=k8s.V1ResourceRequirements(limits={"cpu": "1",
                                                                   "memory": "1Gi"}),
            active_deadline_seconds=600,
        )
    storage: dict[str, Any] = {"credentials": [LAKE], "storage": {"credential": LAKE["name"]}} \
        if STORE else {}
    return SecureStepOperator(
        task_id="train",
        spec={
            "inputs": [{"name": "dataset"}],
            "outputs": [{"name": "model", "path": _where("train", "model", "model")}],
            "isolation": {"mode": "sandbox", "network": "none"},
            "deadline_s": 600,
            **storage,
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
            destination=_where("ingest", "dataset", "dataset"),
            storage_credential=_lake(),
        )
        verify = VerifyDatasetOperator(task_id="verify_dataset", dataset=ingest.output,
                                       credential=_lake())
        train = _train_task(ingest.output)
        if tampered:
            from airflow.providers.standard.operators.python import PythonOperator

            attacker = PythonOperator(  # stepguard: ignore[SG001] -- the simulated attacker
                task_id="attacker_poisons_data_lake",
                python_callable=poison_dataset,
                op_args=[ingest.output],
            )
            if os.environ.get("STEPGUARD_TRAIN_POD"):
                # After the lake copy was verified: the training pod's own check catches it.
                verify >> attacker >> train  # type: ignore[operator]
            else:
                ingest >> attacker >> verify  # type: ignore[operator]
                verify >> train  # type: ignore[operator]
        else:
            verify >> train  # type: ignore[operator]
        publish = SignAndPublishModelOperator(
            task_id="sign_and_publish",
            model=train.output,
            name=MODEL,
            version=VERSION,
            signing={"signer": "transit", "key": "stepguard-signing"},
            credential=_lake(),
        )
        gate = VerifyModelOperator(task_id="gate", model=publish.output, policy="release",
                                   credential=_lake(),
                                   destination=_where("gate", "model", "model"))
        serving = os.environ.get("STEPGUARD_SERVING_DIR")
        storage: dict[str, Any] = {"credentials": [LAKE], "storage": {"credential": LAKE["name"]}} \
            if STORE else {}
        SecureStepOperator(
            task_id="deploy",
            spec={
                "inputs": [{"name": "model"}],
                "outputs": [{"name": "serving", "path": (
                    f"{serving}/{MODEL}/{VERSION}" if serving else f"serving/{MODEL}")}],
                "isolation": {"mode": "process"},
                **storage,
            },
            receipts={"model": gate.output},
            python_callable=promote,
        )
    return dag


secure_training = build_dag("secure_training")
secure_training_tampered = build_dag("secure_training_tampered", tampered=True)
