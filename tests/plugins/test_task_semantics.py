"""``@task.stepguard`` behaves like ``@task``; failures end or retry a task as they should.

Every test runs a real DAG through ``dag.test()``.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.airflow]


def test_value_context_and_receipt_chain_like_task(airflow_run, stepguard_env):
    """The function's value goes downstream; the context is injected by name and to
    ``**context``; the receipt is under ``stepguard_receipt`` and chaining still verifies."""
    dag, _ = airflow_run.write("""
        import pendulum
        from airflow.sdk import DAG, task

        with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2024, 1, 1),
                 params={"model": "churn"}) as dag:
            @task.stepguard(spec={"outputs": [{"name": "data", "path": "data"}]})
            def produce(ds=None, params=None, ti=None, step_env=None) -> int:
                (step_env.outputs["data"] / "part.csv").write_text(f"{ds},{params['model']}\\n")
                return len(ti.task_id)

            rows = produce()

            @task.stepguard(spec={"inputs": [{"name": "data"}]}, receipts={"data": rows})
            def consume(n: int, step_env=None, **context) -> str:
                text = (step_env.inputs["data"] / "part.csv").read_text().strip()
                return f"{n}|{text}|{context['dag_run'].run_id == context['run_id']}"

            @task
            def plain(n: int) -> int:
                return n * 2

            consume(rows)
            plain(rows)
    """)
    dr = dag.test()
    assert airflow_run.states(dr) == {"produce": "success", "consume": "success",
                                      "plain": "success"}
    assert airflow_run.xcom_of(dr, "produce") == len("produce")
    assert airflow_run.xcom_of(dr, "plain") == 2 * len("produce")
    ds = str(dr.logical_date.date())
    assert airflow_run.xcom_of(dr, "consume") == f"{len('produce')}|{ds},churn|True"
    produced = airflow_run.xcom_of(dr, "produce", "stepguard_receipt")
    consumed = airflow_run.xcom_of(dr, "consume", "stepguard_receipt")
    assert produced["status"] == "succeeded" and consumed["status"] == "succeeded"
    assert consumed["inputs"][0]["digest"] == produced["outputs"][0]["digest"]
    assert consumed["inputs"][0]["verified"] is True


def test_multiple_outputs_unrolls_the_value(airflow_run, stepguard_env):
    dag, _ = airflow_run.write("""
        import pendulum
        from airflow.sdk import DAG, task

        with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
            @task.stepguard(multiple_outputs=True)
            def split():
                return {"train": 80, "test": 20}

            @task
            def total(a: int, b: int) -> int:
                return a + b

            parts = split()
            total(parts["train"], parts["test"])
    """)
    dr = dag.test()
    assert airflow_run.states(dr) == {"split": "success", "total": "success"}
    assert airflow_run.xcom_of(dr, "split", "train") == 80
    assert airflow_run.xcom_of(dr, "total") == 100
    assert airflow_run.xcom_of(dr, "split", "stepguard_receipt")["status"] == "succeeded"


def test_operator_keeps_stock_python_operator_arguments(airflow_run, stepguard_env):
    """SecureStepOperator(python_callable=...) injects the context like PythonOperator."""
    dag, _ = airflow_run.write("""
        import pendulum
        from airflow.sdk import DAG
        from stepguard_airflow.operators import SecureStepOperator

        def fit(lr, ds=None, params=None, templates_dict=None):
            return {"lr": lr, "ds": ds, "p": params["k"], "t": templates_dict["day"]}

        with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2024, 1, 1),
                 params={"k": "v"}) as dag:
            SecureStepOperator(task_id="fit", python_callable=fit, op_kwargs={"lr": 0.5},
                               templates_dict={"day": "{{ ds_nodash }}"},
                               show_return_value_in_logs=False)
    """)
    dr = dag.test()
    assert airflow_run.states(dr) == {"fit": "success"}
    day = dr.logical_date.date()
    assert airflow_run.xcom_of(dr, "fit", "result") == {
        "lr": 0.5, "ds": str(day), "p": "v", "t": day.strftime("%Y%m%d")}
    assert airflow_run.xcom_of(dr, "fit")["status"] == "succeeded"  # the operator's value


@pytest.mark.parametrize("error, tries", [
    ("IntegrityError('inputs do not match manifest', subject='data/x.csv')", 1),
    ("ConfigurationError('bad spec', subject='spec.outputs')", 1),
    ("CredentialDenied('permission denied', subject='role train')", 1),
    ("VersionConflict('version exists with other content (immutable)', subject='m:1')", 1),
    ("TransientCredentialError('Vault unreachable', subject='vault')", 2),
    ("RegistryError('upload failed', subject='m:1')", 2),
])
def test_verdicts_and_denials_are_not_retried(airflow_run, stepguard_env, error, tries):
    """Security verdicts, mistakes, denials and version conflicts end the task on its first
    try (AirflowFailException); operational errors use the task's retries."""
    counter = stepguard_env / "tries"
    dag, _ = airflow_run.write(f"""
        import datetime
        import pendulum
        from pathlib import Path
        from airflow.sdk import DAG, task
        from stepguard.errors import *

        with DAG("{{dag_id}}", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
            @task.stepguard(retries=1, retry_delay=datetime.timedelta(seconds=0))
            def step():
                p = Path({str(counter)!r})
                p.write_text(str(int(p.read_text()) + 1) if p.exists() else "1")
                raise {error}

            step()
    """)
    dr = dag.test()
    assert airflow_run.states(dr) == {"step": "failed"}
    assert counter.read_text() == str(tries)


@pytest.mark.services
def test_connection_test_logs_in_and_tells_denied_from_unreachable(airflow_db, dev_stack,
                                                                    monkeypatch):
    """The connection form's "Test" logs in with the configured method (AppRole here): a wrong
    secret is denied, a wrong address is unreachable, the right secret passes."""
    import json

    from stepguard_airflow.hooks import StepguardHook

    for var in ("VAULT_ADDR", "VAULT_TOKEN", "VAULT_ROLE_ID", "VAULT_SECRET_ID",
                "VAULT_SECRET_ID_FILE", "STEPGUARD_VAULT_AUTH", "STEPGUARD_VAULT_ADDR"):
        monkeypatch.delenv(var, raising=False)
    good = dev_stack.approle_secret_id_file.read_text().strip()

    def conn(host: str, secret: str) -> StepguardHook:
        monkeypatch.setenv("AIRFLOW_CONN_SG_CONN_TEST", json.dumps({
            "conn_type": "stepguard", "host": host, "login": dev_stack.approle_role_id,
            "password": secret, "extra": {"auth_method": "approle"}}))
        return StepguardHook("sg_conn_test")

    ok, message = conn(dev_stack.vault_addr, good).test_connection()
    assert ok, message
    assert "approle login succeeded" in message
    ok, message = conn(dev_stack.vault_addr, "0" * 8 + good[8:]).test_connection()
    assert not ok and message.startswith("Vault login denied (approle)"), message
    assert good not in message
    ok, message = conn("http://127.0.0.1:9", good).test_connection()
    assert not ok and message.startswith("Vault unreachable"), message


def test_republishing_the_same_bytes_succeeds_other_bytes_fail_without_retry(
        airflow_run, stepguard_env):
    """A cleared and re-run publish of the same model version succeeds with the existing
    record; other bytes under that version are a VersionConflict, not retried."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = stepguard_env / "signing.pem"
    key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    registry = stepguard_env / "registry"
    dag, _ = airflow_run.write(f"""
        import datetime
        import pendulum
        from airflow.sdk import DAG, task
        from stepguard_airflow.operators import SignAndPublishModelOperator

        with DAG("{{dag_id}}", schedule=None, start_date=pendulum.datetime(2024, 1, 1),
                 params={{"weights": "w1"}}) as dag:
            @task.stepguard(spec={{"outputs": [{{"name": "model", "path": "model"}}]}})
            def train(params=None, step_env=None) -> str:
                (step_env.outputs["model"] / "weights.txt").write_text(params["weights"])
                return "trained"

            SignAndPublishModelOperator(
                task_id="publish", model=train(), name="churn", version="1",
                signing={{"signer": "key", "key": {str(key)!r}}},
                registry="file://{registry}", retries=2,
                retry_delay=datetime.timedelta(seconds=0))
    """)
    first = dag.test()
    assert airflow_run.states(first) == {"train": "success", "publish": "success"}
    again = dag.test()  # the same bytes again: idempotent
    assert airflow_run.states(again) == {"train": "success", "publish": "success"}
    record = [airflow_run.xcom_of(dr, "publish")["outputs"][0]["published"]
              for dr in (first, again)]
    assert record[0]["bundle_digest"] == record[1]["bundle_digest"]
    changed = dag.test(run_conf={"weights": "w2"})
    assert airflow_run.states(changed) == {"train": "success", "publish": "failed"}
    from airflow.utils.session import create_session

    with create_session() as session:
        ti = next(t for t in changed.get_task_instances(session=session)
                  if t.task_id == "publish")
        assert ti.try_number == 1  # retries=2, yet not retried
    failed = airflow_run.xcom_of(changed, "publish", "stepguard_failed_receipt")
    assert failed["error"]["type"] == "VersionConflict"
