"""Operators, decorator, listener and provider packaging, through real ``dag.test()`` runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.airflow]

HEAVY = ("boto3", "botocore", "hvac", "kubernetes", "model_signing", "kfp", "sigstore")


def test_dag_parse_imports_no_heavy_dependency(airflow_db):
    """Importing the operators/decorator/hook/plugin (what a DAG file does) stays light."""
    code = (
        "import sys\n"
        "import stepguard_airflow, stepguard_airflow.operators, stepguard_airflow.decorators\n"
        "import stepguard_airflow.hooks, stepguard_airflow.plugin\n"
        "from stepguard_airflow.operators import SecureStepOperator, IngestDatasetOperator\n"
        "op = SecureStepOperator(task_id='t', command='true',\n"
        "    spec={'outputs': [{'name': 'o', 'path': 'o'}]})\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_provider_info_matches_airflow_schema_and_is_discovered(airflow_db):
    import jsonschema
    from airflow import providers_manager

    from stepguard_airflow import get_provider_info

    schema_path = Path(providers_manager.__file__).parent / "provider_info.schema.json"
    info = get_provider_info()
    jsonschema.validate(info, json.loads(schema_path.read_text()))
    pm = providers_manager.ProvidersManager()
    assert pm.providers["stepguard"].data["name"] == "stepguard"
    from airflow.sdk import task

    assert callable(task.stepguard)
    hook = pm.hooks["stepguard"]
    assert hook is not None and hook.connection_type == "stepguard"
    options = info["config"]["stepguard"]["options"]
    assert {"vault_addr", "vault_auth", "registry", "audit_exporter", "audit_path"} <= set(options)


def test_decorator_python_body_gets_step_env_and_args(airflow_run, stepguard_env):
    dag, _ = airflow_run.write("""
        import pendulum
        from airflow.sdk import DAG, task

        with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
            @task.stepguard(spec={"outputs": [{"name": "model", "path": "model"}]})
            def fit(lr: float, step_env):
                (step_env.outputs["model"] / "lr.txt").write_text(str(lr))
                return {"lr": lr}

            fit(0.25)
    """)
    dr = dag.test()
    assert airflow_run.states(dr) == {"fit": "success"}
    receipt = airflow_run.xcom_of(dr, "fit", "stepguard_receipt")
    assert receipt["isolation"]["mode"] == "process"
    assert (Path(receipt["outputs"][0]["path"]) / "lr.txt").read_text() == "0.25"
    # Like @task: the task's value is what the function returned.
    assert airflow_run.xcom_of(dr, "fit") == {"lr": 0.25}


def test_mapped_instances_keep_their_own_receipts_and_outputs(airflow_run, stepguard_env):
    """Dynamic task mapping: each instance is its own step (``fit.0``, ``fit.1``, ...), with
    its own run directory (receipt, output manifests) and ``{step}`` in output paths."""
    dag, _ = airflow_run.write("""
        import pendulum
        from airflow.sdk import DAG, task

        with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
            @task.stepguard(spec={"outputs": [{"name": "model", "path": "out/{step}/model"}]})
            def fit(lr: float, step_env):
                (step_env.outputs["model"] / "lr.txt").write_text(str(lr))

            fit.expand(lr=[0.1, 0.2, 0.3])
    """)
    dr = dag.test()
    assert airflow_run.states(dr) == {"fit": "success"}
    from stepguard.receipt import Receipt

    runs = list((stepguard_env / "state" / "runs").iterdir())
    assert len(runs) == 1
    for i, lr in enumerate(["0.1", "0.2", "0.3"]):
        receipt = Receipt.load(runs[0] / f"fit.{i}" / "receipt.json")
        assert receipt.status == "succeeded" and receipt.context.step == f"fit.{i}"
        out = receipt.output("model")
        assert out.path.endswith(f"/out/fit.{i}/model")
        assert (Path(out.path) / "lr.txt").read_text() == lr
        assert (runs[0] / f"fit.{i}" / "model.manifest.json").is_file()


@pytest.mark.sandbox
def test_decorator_shell_body_runs_in_the_sandbox(airflow_run, stepguard_env):
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed")
    dag, _ = airflow_run.write("""
        import pendulum
        from airflow.sdk import DAG, task

        with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
            @task.stepguard(shell=True, spec={"outputs": [{"name": "out", "path": "out"}]})
            def probe(word: str) -> str:
                # whoami inside: not the worker's user; network: none
                return f"id -u > $STEPGUARD_OUTPUT_OUT/uid; echo {word} > $STEPGUARD_OUTPUT_OUT/w"

            probe("hello")
    """)
    dr = dag.test()
    assert airflow_run.states(dr) == {"probe": "success"}
    receipt = airflow_run.xcom_of(dr, "probe")
    assert airflow_run.xcom_of(dr, "probe", "stepguard_receipt") == receipt
    assert receipt["isolation"]["mode"] == "sandbox"
    out = Path(receipt["outputs"][0]["path"])
    assert (out / "w").read_text().strip() == "hello"
    assert (out / "uid").read_text().strip() != "0"


def test_failure_is_one_clear_message_with_the_masked_body_text(airflow_run, stepguard_env,
                                                               capfd):
    """One line naming the control, the subject and the body's own message (a registered
    secret in it masked), one traceback (the body's frames), and the failed receipt keeps it."""
    dag, _ = airflow_run.write("""
        import pendulum
        from airflow.sdk import DAG
        from airflow.providers.standard.operators.empty import EmptyOperator
        from stepguard.audit import register_secret
        from stepguard_airflow.operators import SecureStepOperator

        def boom():
            secret = "canary-" + "token-5f1e9a77"  # not in the source a traceback quotes
            register_secret(secret)
            raise ValueError(f"row 17 has no label; token {secret}\\nsecond line")

        with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
            SecureStepOperator(task_id="fit", python_callable=boom) >> EmptyOperator(task_id="after")
    """)
    dr = dag.test()
    out = capfd.readouterr()
    text = out.out + out.err
    assert airflow_run.states(dr) == {"fit": "failed", "after": "upstream_failed"}
    assert "stepguard step 'fit' failed: BodyFailed [body]: step body raised ValueError: " \
           "[REDACTED]: fit" in text
    assert "canary-token-5f1e9a77" not in text
    # The task's own log: from its start (the DAG bag parse before it may log other files').
    task_log = text[max(text.rfind("Task started"), 0):]
    assert task_log.count("Traceback (most recent call last)") == 1
    assert 'in boom' in text  # the one traceback shows where the body raised
    failed = airflow_run.xcom_of(dr, "fit", "stepguard_failed_receipt")
    assert failed["status"] == "failed" and failed["error"]["type"] == "BodyFailed"
    assert failed["error"]["message"] == "step body raised ValueError: [REDACTED]"
    assert "canary-token-5f1e9a77" not in json.dumps(failed)
    assert airflow_run.xcom_of(dr, "fit") is None


def test_failed_receipt_keeps_the_body_message(airflow_run, stepguard_env, capfd):
    dag, _ = airflow_run.write("""
        import pendulum
        from airflow.sdk import DAG
        from stepguard_airflow.operators import SecureStepOperator

        def boom():
            raise ValueError("row 17 has no label")

        with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
            SecureStepOperator(task_id="fit", python_callable=boom)
    """)
    dr = dag.test()
    text = capfd.readouterr().out
    line = "stepguard step 'fit' failed: BodyFailed [body]: step body raised ValueError: " \
           "row 17 has no label: fit"
    assert line in text
    failed = airflow_run.xcom_of(dr, "fit", "stepguard_failed_receipt")
    assert failed["error"]["message"] == "step body raised ValueError: row 17 has no label"


def test_receipt_chain_stops_tampered_handoff_before_the_body(airflow_run, stepguard_env, capfd):
    marker = stepguard_env / "consumer-ran"
    dag, _ = airflow_run.write(f"""
        import pendulum
        from pathlib import Path
        from airflow.sdk import DAG
        from airflow.providers.standard.operators.python import PythonOperator
        from stepguard_airflow.operators import SecureStepOperator

        def produce(step_env):
            (step_env.outputs["data"] / "part-0.csv").write_text("a,b\\n1,2\\n")

        def tamper(receipt):
            Path(receipt["outputs"][0]["path"], "extra.csv").write_text("poison\\n")

        def consume(step_env):
            Path({str(marker)!r}).write_text("ran")

        with DAG("{{dag_id}}", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
            p = SecureStepOperator(task_id="produce", python_callable=produce,
                                   spec={{"outputs": [{{"name": "data", "path": "data"}}]}})
            t = PythonOperator(task_id="tamper", python_callable=tamper, op_args=[p.output])
            c = SecureStepOperator(task_id="consume", python_callable=consume,
                                   spec={{"inputs": [{{"name": "data"}}]}},
                                   receipts={{"data": p.output}})
            p >> t >> c
    """)
    dr = dag.test()
    out = capfd.readouterr().out
    assert airflow_run.states(dr) == {"produce": "success", "tamper": "success",
                                      "consume": "failed"}
    assert not marker.exists()
    assert "stepguard step 'consume' failed: IntegrityError" in out
    assert "extra.csv" in out


def test_untampered_handoff_verifies_against_the_producer(airflow_run, stepguard_env):
    dag, _ = airflow_run.write("""
        import pendulum
        from airflow.sdk import DAG
        from stepguard_airflow.operators import SecureStepOperator

        def produce(step_env):
            (step_env.outputs["data"] / "part-0.csv").write_text("a,b\\n1,2\\n")

        def consume(step_env):
            return (step_env.inputs["data"] / "part-0.csv").read_text()

        with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
            p = SecureStepOperator(task_id="produce", python_callable=produce,
                                   spec={"outputs": [{"name": "data", "path": "data"}]})
            SecureStepOperator(task_id="consume", python_callable=consume,
                               spec={"inputs": [{"name": "data"}]}, receipts={"data": p.output})
    """)
    dr = dag.test()
    assert airflow_run.states(dr) == {"produce": "success", "consume": "success"}
    produced = airflow_run.xcom_of(dr, "produce")["outputs"][0]["digest"]
    consumed = airflow_run.xcom_of(dr, "consume")["inputs"][0]
    assert consumed["digest"] == produced and consumed["verified"] is True
    assert consumed["source"].startswith("receipt:")


def test_listener_marks_unsecured_tasks(airflow_run, stepguard_env):
    dag, _ = airflow_run.write("""
        import pendulum
        from airflow.sdk import DAG
        from airflow.providers.standard.operators.python import PythonOperator
        from stepguard_airflow.operators import SecureStepOperator

        with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
            SecureStepOperator(task_id="secured", command=["true"], isolation="process")
            PythonOperator(task_id="plain", python_callable=lambda: None)
    """)
    dag.test()
    spans = [json.loads(line) for line in (stepguard_env / "audit.jsonl").read_text().splitlines()]
    tasks = {s["attributes"]["cicd.pipeline.task.name"]: s["attributes"]
             for s in spans if s.get("name") == "stepguard.task"}
    assert tasks["secured"]["stepguard.secured"] is True
    assert tasks["plain"]["stepguard.secured"] is False
    assert tasks["plain"]["stepguard.operator"] == "PythonOperator"
    step = next(s for s in spans if s.get("name") == "stepguard.step")
    task_span = next(s for s in spans if s.get("name") == "stepguard.task"
                     and s["attributes"]["cicd.pipeline.task.name"] == "secured")
    assert step["trace_id"] == task_span["trace_id"]  # the step nests under the task span


def test_bad_spec_is_a_parse_time_error(airflow_db):
    from stepguard.errors import ConfigurationError
    from stepguard_airflow.operators import SecureStepOperator

    with pytest.raises(ConfigurationError, match="isolaton"):
        SecureStepOperator(task_id="t", command="true", spec={"isolaton": {}})
    with pytest.raises(ConfigurationError, match="exactly one"):
        SecureStepOperator(task_id="t")


def test_templated_fields_render(airflow_run, stepguard_env):
    dag, _ = airflow_run.write("""
        import pendulum
        from airflow.sdk import DAG
        from stepguard_airflow.operators import SecureStepOperator

        with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2024, 1, 1),
                 params={"version": "v7"}) as dag:
            SecureStepOperator(
                task_id="tag", isolation="process",
                spec={"outputs": [{"name": "out", "path": "out-{{ params.version }}"}]},
                command=["/bin/sh", "-c", "echo {{ params.version }} > $STEPGUARD_OUTPUT_OUT/v"],
            )
    """)
    dr = dag.test()
    assert airflow_run.states(dr) == {"tag": "success"}
    out = Path(airflow_run.xcom_of(dr, "tag")["outputs"][0]["path"])
    assert out.name == "out-v7" and (out / "v").read_text().strip() == "v7"


@pytest.mark.services
def test_on_kill_revokes_the_running_steps_credentials(dev_stack, dev_postgres):
    """Airflow 3's task runner answers SIGTERM with on_kill() and does not raise: the step's
    credentials must die then, not at their TTL."""
    import hvac

    from stepguard.credentials import AppRoleAuth, VaultConfig, open_session
    from stepguard.spec import CredentialRequest, RunContext
    from stepguard_airflow.operators import IngestDatasetOperator, SecureStepOperator

    auth = AppRoleAuth(role_id=dev_stack.approle_role_id,
                       secret_id=dev_stack.approle_secret_id_file.read_text().strip())
    cfg = VaultConfig(addr=dev_stack.vault_addr, auth=auth)
    root = hvac.Client(url=dev_stack.vault_addr, token=dev_stack.vault_root_token)
    req = CredentialRequest(name="db", kind="database", role="stepguard-step")
    for op in (SecureStepOperator(task_id="train", spec={"isolation": {"mode": "process"}},
                                  python_callable=lambda: None),
               IngestDatasetOperator(task_id="ingest", dataset="d", version="1", source="/nope")):
        with open_session([req], settings=cfg, context=RunContext(step="train"), ttl_s=300,
                          handle_sigterm=False) as s:
            lease = s._issued[0].lease_id
            op.on_kill()  # what the task runner does on SIGTERM
            with pytest.raises(hvac.exceptions.InvalidRequest):
                root.sys.read_lease(lease)
            assert s.token.revoked


@pytest.mark.parametrize("spec", [
    {"isolation": {"mode": "sandbox"}},
    {"isolation": {"mode": "pod", "image": "reg.example/x@sha256:" + "a" * 64}},
    "file:sandbox",
])
def test_callable_is_never_run_with_less_isolation_than_the_spec_asks(spec, tmp_path):
    """A Python callable runs in the task process: a spec asking for a sandbox or pod must not
    be silently downgraded (also when the spec is a YAML file)."""
    from airflow.sdk.exceptions import AirflowFailException

    from stepguard_airflow.operators import SecureStepOperator

    if spec == "file:sandbox":
        path = tmp_path / "train.yaml"
        path.write_text("name: train\nisolation: {mode: sandbox}\n")
        spec = str(path)
    ran = []
    op = SecureStepOperator(task_id="train", spec=spec, python_callable=lambda: ran.append(1))
    with pytest.raises(AirflowFailException, match="isolation mode"):
        op.execute({})
    assert ran == []


def test_callable_with_a_spec_file_that_leaves_isolation_open_runs(airflow_run, stepguard_env):
    """A YAML spec file is read once at run time; without an isolation mode it runs the
    callable in the task process and records that in the receipt."""
    spec = stepguard_env / "fit.yaml"
    spec.write_text("name: fit\noutputs: [{name: model, path: model}]\n")
    dag, _ = airflow_run.write(f"""
        import pendulum
        from airflow.sdk import DAG
        from stepguard_airflow.operators import SecureStepOperator

        def fit(step_env):
            (step_env.outputs["model"] / "w.txt").write_text("1")

        with DAG("{{dag_id}}", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
            SecureStepOperator(task_id="fit", spec={str(spec)!r}, python_callable=fit)
    """)
    dr = dag.test()
    assert airflow_run.states(dr) == {"fit": "success"}
    receipt = airflow_run.xcom_of(dr, "fit")
    assert receipt["isolation"]["mode"] == "process"
    assert (Path(receipt["outputs"][0]["path"]) / "w.txt").read_text() == "1"


def test_airflow_cfg_stepguard_options_reach_the_settings(monkeypatch, tmp_path):
    """Every [stepguard] option the provider declares is read; none is silently ignored."""
    from stepguard_airflow.hooks import StepguardHook

    monkeypatch.chdir(tmp_path)
    for var in ("VAULT_ADDR", "STEPGUARD_CONFIG", "STEPGUARD_AUDIT_EXPORTER", "STEPGUARD_REGISTRY_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AIRFLOW__STEPGUARD__VAULT_ADDR", "https://vault.example:8200")
    monkeypatch.setenv("AIRFLOW__STEPGUARD__VAULT_AUTH", "jwt")
    monkeypatch.setenv("AIRFLOW__STEPGUARD__REGISTRY", "s3://models/prod")
    monkeypatch.setenv("AIRFLOW__STEPGUARD__AUDIT_EXPORTER", "both")
    monkeypatch.setenv("AIRFLOW__STEPGUARD__AUDIT_PATH", str(tmp_path / "a.jsonl"))
    s = StepguardHook(conn_id=None).get_settings()
    assert (s.vault.addr, s.vault.auth, s.registry.url, s.audit.exporter, s.audit.path) == (
        "https://vault.example:8200", "jwt", "s3://models/prod", "both", str(tmp_path / "a.jsonl"))


def test_gate_reports_the_signer_it_verified_not_the_receipts_claim(airflow_run, stepguard_env,
                                                                    monkeypatch):
    """VerifyModelOperator against a real file:// registry and a key policy: the gate's XCom
    names the signer the policy accepted in the bundle, whatever the publishing receipt says."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    from stepguard.integrity import create_manifest
    from stepguard.registry import open_registry
    from stepguard.signing import KeySigner

    root = stepguard_env
    key = ec.generate_private_key(ec.SECP256R1())
    (root / "k.pem").write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                                   ser.NoEncryption()))
    (root / "k.pub").write_bytes(key.public_key().public_bytes(
        ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    model = root / "model"
    model.mkdir()
    (model / "weights.json").write_text('{"w": [1, 2, 3]}\n')
    registry = f"file://{root / 'registry'}"
    published = open_registry(registry).publish(model, "churn", "1", signer=KeySigner(root / "k.pem"))
    cfg = root / "stepguard.yaml"
    cfg.write_text(f"policies:\n  release: {{kind: key, public_keys: [{root / 'k.pub'}]}}\n")
    monkeypatch.setenv("STEPGUARD_CONFIG", str(cfg))
    claim = {"outputs": [{"name": "model", "digest": create_manifest(model).digest,
                          "published": {"registry": registry, "name": "churn", "version": "1",
                                        "signer": "key:sha256:someone-else"}}]}
    dag, _ = airflow_run.write(f"""
        import pendulum
        from airflow.sdk import DAG
        from stepguard_airflow.operators import VerifyModelOperator

        with DAG("{{dag_id}}", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
            VerifyModelOperator(task_id="gate", model={claim!r}, policy="release")
    """)
    dr = dag.test()
    assert airflow_run.states(dr) == {"gate": "success"}
    gate = airflow_run.xcom_of(dr, "gate", "gate")
    assert gate["signer"] == published.signer and gate["signer"].startswith("key:sha256:")
    assert gate["signer"] != "key:sha256:someone-else"
