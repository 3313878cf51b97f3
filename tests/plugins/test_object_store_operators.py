"""The data and model operators with just-in-time credentials against moto with IAM enforced:
S3 ingest, an S3 registry for publish and the gate, and the same calls failing without the
credential. The worker environment holds no AWS keys. Real OpenBao, real moto, dag.test()."""

from __future__ import annotations

import json
import uuid

import pytest

pytestmark = [pytest.mark.services]

BUCKET = "stepguard-data"


@pytest.fixture
def worker(stepguard_env, dev_stack, monkeypatch):
    """Vault AppRole login, the S3 endpoint, a key policy; no AWS keys anywhere."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    root = stepguard_env
    key = ec.generate_private_key(ec.SECP256R1())
    (root / "k.pem").write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                                   ser.NoEncryption()))
    (root / "k.pub").write_bytes(key.public_key().public_bytes(
        ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    cfg = root / "stepguard.yaml"
    cfg.write_text(f'vault: {{addr: "{dev_stack.vault_addr}", auth: approle}}\n'
                   f"policies:\n  release: {{kind: key, public_keys: [{root / 'k.pub'}]}}\n")
    monkeypatch.setenv("STEPGUARD_CONFIG", str(cfg))
    monkeypatch.setenv("VAULT_ROLE_ID", dev_stack.approle_role_id)
    monkeypatch.setenv("VAULT_SECRET_ID_FILE", str(dev_stack.approle_secret_id_file))
    monkeypatch.setenv("AWS_ENDPOINT_URL", dev_stack.moto_endpoint)
    monkeypatch.setenv("AWS_REGION", dev_stack.aws_region)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    # boto3's default session caches the credentials it first resolved (an earlier test's
    # static keys): start from a fresh one, as a fresh worker process would.
    import boto3

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    return root


def _lake(dev_stack) -> dict[str, str]:
    return {"kind": "aws_web_identity", "role": dev_stack.web_identity_role_arn}


@pytest.fixture
def source(dev_stack, aws_admin_session) -> str:
    """A raw dataset some upstream system put in the lake."""
    prefix = f"raw/{uuid.uuid4().hex[:8]}"
    s3 = aws_admin_session.client("s3", endpoint_url=dev_stack.moto_endpoint)
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/churn.csv", Body=b"id,churn\n1,0\n2,1\n")
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/part/extra.csv", Body=b"id,churn\n3,0\n")
    return f"s3://{BUCKET}/{prefix}"


@pytest.mark.parametrize("with_credential", [True, False])
def test_ingest_from_s3_to_the_lake_with_a_jit_credential(airflow_run, worker, dev_stack,
                                                          source, capfd, with_credential):
    cred = {"name": "lake", **_lake(dev_stack)} if with_credential else None
    dag, _ = airflow_run.write(f"""
        import pendulum
        from airflow.sdk import DAG
        from stepguard_airflow.operators import IngestDatasetOperator

        with DAG("{{dag_id}}", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
            IngestDatasetOperator(task_id="ingest", dataset="churn", version="1",
                                  source={source!r}, credential={cred!r},
                                  destination="s3://{BUCKET}/lake/{{run_id}}/churn")
    """)
    dr = dag.test()
    out = capfd.readouterr().out
    if not with_credential:
        # The same call without the credential: no keys on this worker, nothing is read.
        assert airflow_run.states(dr) == {"ingest": "failed"}
        assert "OperationalError" in out or "TransientError" in out
        return
    assert airflow_run.states(dr) == {"ingest": "success"}, out[-3000:]
    rec = airflow_run.xcom_of(dr, "ingest")["outputs"][0]
    assert rec["path"].startswith(f"s3://{BUCKET}/lake/") and rec["files"] == 2
    assert rec["manifest"].startswith(f"s3://{BUCKET}/lake/")


@pytest.mark.parametrize("with_credential", [True, False])
def test_publish_and_gate_through_an_s3_registry_with_a_jit_credential(
        airflow_run, worker, dev_stack, capfd, with_credential):
    registry = f"s3://{BUCKET}/registry-{uuid.uuid4().hex[:6]}"
    cred = _lake(dev_stack) if with_credential else None
    dag, _ = airflow_run.write(f"""
        import pendulum
        from airflow.sdk import DAG
        from stepguard_airflow.operators import (
            SecureStepOperator, SignAndPublishModelOperator, VerifyModelOperator)

        def train(step_env):
            (step_env.outputs["model"] / "weights.json").write_text('{{"w": [1, 2]}}')

        with DAG("{{dag_id}}", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
            t = SecureStepOperator(
                task_id="train", python_callable=train,
                spec={{"outputs": [{{"name": "model", "path": "model"}}]}})
            p = SignAndPublishModelOperator(
                task_id="publish", model=t.output, name="churn", version="1",
                signing={{"signer": "key", "key": {str(worker / "k.pem")!r}}},
                registry={registry!r}, credential={cred!r})
            VerifyModelOperator(task_id="gate", model=p.output, policy="release",
                                credential={cred!r})
    """)
    dr = dag.test()
    out = capfd.readouterr().out
    states = airflow_run.states(dr)
    if not with_credential:
        assert states["publish"] == "failed" and states["gate"] != "success"
        assert "RegistryError" in out or "OperationalError" in out
        return
    assert states == {"train": "success", "publish": "success", "gate": "success"}, out[-3000:]
    pub = airflow_run.xcom_of(dr, "publish")["outputs"][0]["published"]
    assert pub["uri"].startswith(registry)
    gate = airflow_run.xcom_of(dr, "gate", "gate")
    assert gate["signer"].startswith("key:sha256:")


def test_receipt_as_long_json_text_is_accepted(airflow_run, stepguard_env):
    dag, _ = airflow_run.write("""
        import json
        import pendulum
        from airflow.sdk import DAG
        from airflow.providers.standard.operators.python import PythonOperator
        from stepguard_airflow.operators import SecureStepOperator

        def produce(step_env):
            (step_env.outputs["data"] / "part-0.csv").write_text("a,b\\n1,2\\n")

        def consume(step_env):
            return (step_env.inputs["data"] / "part-0.csv").read_text()

        def as_text(receipt):
            return json.dumps(receipt)

        with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
            p = SecureStepOperator(task_id="produce", python_callable=produce,
                                   spec={"outputs": [{"name": "data", "path": "data"}]})
            text = PythonOperator(task_id="as_text", python_callable=as_text,
                                  op_args=[p.output])
            c = SecureStepOperator(task_id="consume", python_callable=consume,
                                   spec={"inputs": [{"name": "data"}]},
                                   receipts={"data": text.output})
            p >> text >> c
    """)
    dr = dag.test()
    assert airflow_run.states(dr) == {"produce": "success", "as_text": "success",
                                      "consume": "success"}
    consumed = airflow_run.xcom_of(dr, "consume")["inputs"][0]
    assert consumed["verified"] is True
    assert len(json.dumps(airflow_run.xcom_of(dr, "produce"))) > 255
