"""Steps as real pods: the exact Pod + ConfigMap manifests our code builds, run by ``podman kube
play`` from an image built from our wheel, against the dev stack's OpenBao, PostgreSQL and moto.

The step runner (``stepguard exec``) is the pod's entrypoint and gets its credentials inside the
pod, both ways: a single-use wrapped token handed over by the orchestrator, and Vault JWT auth
with a projected token (minted by the test's issuer key, which the dev OpenBao's ``jwt/`` mount
trusts). Skips only where podman cannot run (the reason says what is missing).
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from stepguard._podstep import run_in_pod
from stepguard.errors import ConfigurationError, IntegrityError, OperationalError
from stepguard.settings import PLACEHOLDER_DIGEST, Settings
from stepguard.spec import RunContext, StepSpec
from stepguard.step import Step

pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]

CANARY = "PodCanary/+=9-secret"
BUCKET = "stepguard-data"


@pytest.fixture(scope="session")
def podman_image() -> tuple[Any, str]:
    """(Podman, image reference by digest); built once per content hash, then reused."""
    from stepguard.testing.podman import Podman, build_image, unavailable

    podman = Podman.default()
    reason = unavailable(podman)
    if reason:
        pytest.skip(reason)
    return podman, build_image(podman)


@pytest.fixture
def kube(podman_image, dev_stack):
    """A PodmanKube whose projected tokens are signed by the dev OpenBao's trusted JWT key."""
    import jwt as pyjwt

    from stepguard.testing.kubeplay import PodmanKube

    key = dev_stack.jwt_private_key_path.read_bytes()

    def issue(claims):
        return pyjwt.encode({**claims, "iss": dev_stack.jwt_issuer}, key, algorithm="ES256")

    k = PodmanKube(podman_image[0], token_issuer=issue)
    yield k
    leaked = [n for n in k.running() if n in {key.split("/")[1] for key in k.pods}]
    for name in leaked:
        k.podman.run("pod", "rm", "-f", "-t", "0", name, check=False)
    assert not leaked, f"pods left behind: {leaked}"


@pytest.fixture
def canary(vault_client):
    vault_client.secrets.kv.v2.create_or_update_secret(
        path="stepguard/pod-canary", secret={"token": CANARY}, mount_point="secret")
    return CANARY


@pytest.fixture
def orchestrator(dev_stack, monkeypatch, tmp_path):
    """The orchestrator's environment: AppRole login, the S3 endpoint; no AWS keys."""
    monkeypatch.setenv("VAULT_ROLE_ID", dev_stack.approle_role_id)
    monkeypatch.setenv("VAULT_SECRET_ID_FILE", str(dev_stack.approle_secret_id_file))
    monkeypatch.setenv("AWS_ENDPOINT_URL", dev_stack.moto_endpoint)
    monkeypatch.setenv("AWS_REGION", dev_stack.aws_region)
    for name in ("VAULT_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    return dev_stack


def _settings(dev_stack, tmp_path: Path, image: str, **pods: Any) -> Settings:
    return Settings.from_dict({
        "vault": {"addr": dev_stack.vault_addr, "auth": "approle"},
        "audit": {"exporter": "none"}, "state_dir": str(tmp_path / "state"),
        "pods": {"image": image, **pods}})


# One line (podman's kube play mangles arguments with newlines); the body compares a hash, so
# the secret is never in the pod's command.
CHECK_BODY = (
    "import hashlib, os, pathlib, sys; "
    "v = os.environ.get('API_TOKEN', ''); "
    f"ok = hashlib.sha256(v.encode()).hexdigest() == '{hashlib.sha256(CANARY.encode()).hexdigest()}'; "
    "out = os.environ.get('STEPGUARD_OUTPUT_MODEL'); "
    "out and (pathlib.Path(out) / 'model.bin').write_bytes(b'weights' if ok else b'no'); "
    "print('body ran, credential', 'matches' if ok else 'MISSING'); "
    "sys.exit(0 if ok else 3)"
)


def _run(kube, spec: StepSpec, settings: Settings, run_id: str, body: str = CHECK_BODY,
         **kw: Any):
    log = io.BytesIO()
    step = Step(spec, settings=settings, context=RunContext(pipeline="p", run_id=run_id,
                                                            step=spec.name))
    try:
        receipt = run_in_pod(step, ["python3", "-c", body],
                             kube_api=kube.api(), stdout=log, poll_s=0.1, **kw)
    finally:
        kube.last_log = log.getvalue()  # type: ignore[attr-defined]
    return receipt


def _no_secret_anywhere(kube, receipt, *values: str) -> None:
    blobs = [json.dumps(kube.manifests), kube.last_log.decode(errors="replace"), receipt.to_json() if receipt else ""]
    for value in values:
        for blob in blobs:
            assert value not in blob


def _wrapped_token(kube) -> str:
    (pod,) = kube.pods.values()
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    return env["STEPGUARD_WRAPPED_CREDENTIALS"]


def test_wrapped_login_in_a_pod_with_object_store_output(kube, podman_image, orchestrator,
                                                         canary, tmp_path, vault_client,
                                                         aws_admin_session):
    run_id = f"podw-{uuid.uuid4().hex[:8]}"
    spec = StepSpec.from_dict({
        "name": "train", "isolation": {"mode": "pod", "network": []},
        "env": {"AWS_REGION": orchestrator.aws_region},
        "credentials": [{"name": "api", "kind": "kv", "path": "stepguard/pod-canary"},
                        {"name": "lake", "kind": "aws_web_identity",
                         "role": orchestrator.web_identity_role_arn}],
        "storage": {"credential": "lake", "endpoint_url": orchestrator.moto_endpoint},
        "outputs": [{"name": "model", "path": f"s3://{BUCKET}/runs/{{run_id}}/model"}],
    })
    receipt = _run(kube, spec, _settings(orchestrator, tmp_path, podman_image[1]), run_id)
    assert receipt.status == "succeeded"
    assert receipt.context.run_id == run_id and receipt.context.step == "train"
    assert receipt.isolation["mode"] == "process"  # inside the pod, the pod is the isolation
    assert receipt.isolation["pod"].startswith("sg-train-")
    out = receipt.output("model")
    assert out.path == f"s3://{BUCKET}/runs/{run_id}/model/data/"
    s3 = aws_admin_session.client("s3", endpoint_url=orchestrator.moto_endpoint)
    body = s3.get_object(Bucket=BUCKET, Key=f"runs/{run_id}/model/data/model.bin")["Body"]
    assert body.read() == b"weights"
    stored = s3.get_object(Bucket=BUCKET, Key=f"runs/{run_id}/model/receipt.json")["Body"]
    assert json.loads(stored.read())["outputs"] == json.loads(receipt.to_json())["outputs"]
    # Cleanup on the success path: pod, ConfigMap and policy, in reverse order of creation.
    assert [k for k, _ in kube.deleted] == ["Pod", "ConfigMap", "NetworkPolicy"]
    # The wrapped token was single-use: the pod used it, a second unwrap fails.
    token = _wrapped_token(kube)
    with pytest.raises(Exception, match="wrapping token|invalid|permission denied"):
        vault_client.sys.unwrap(token)
    _no_secret_anywhere(kube, receipt, CANARY)  # the spent wrapping token is in the env
    assert b"credential matches" in kube.last_log
    # The policy opens Vault and the object store (plus DNS), nothing else.
    (policy,) = [m for m in kube.manifests if m["kind"] == "NetworkPolicy"]
    ports = sorted(r["ports"][0]["port"] for r in policy["spec"]["egress"][1:])
    assert ports == sorted({_port(orchestrator.vault_addr), _port(orchestrator.moto_endpoint)})


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])


def test_jwt_login_in_a_pod_mints_nothing_outside(kube, podman_image, orchestrator, canary,
                                                  tmp_path, monkeypatch):
    # The orchestrator has no Vault login at all: only the pod can get credentials.
    for name in ("VAULT_ROLE_ID", "VAULT_SECRET_ID_FILE"):
        monkeypatch.delenv(name, raising=False)
    JWT_AUDIENCE, JWT_ROLE = orchestrator.jwt_audience, orchestrator.jwt_role  # noqa: N806
    spec = StepSpec.from_dict({
        "name": "train", "isolation": {"mode": "pod", "network": []},
        "credentials": [{"name": "api", "kind": "kv", "path": "stepguard/pod-canary"}]})
    settings = _settings(orchestrator, tmp_path, podman_image[1], vault_login="jwt",
                         jwt_role=JWT_ROLE, jwt_audience=JWT_AUDIENCE)
    receipt = _run(kube, spec, settings, f"podj-{uuid.uuid4().hex[:8]}")
    assert receipt.status == "succeeded"
    assert [c.kind for c in receipt.credentials] == ["kv"]
    (pod,) = kube.pods.values()
    podspec = pod["spec"]
    assert podspec["automountServiceAccountToken"] is False
    (proj,) = [v["projected"] for v in podspec["volumes"] if "projected" in v]
    sat = proj["sources"][0]["serviceAccountToken"]
    assert sat["audience"] == JWT_AUDIENCE and sat["expirationSeconds"] == 600
    env = {e["name"] for e in podspec["containers"][0]["env"]}
    assert "STEPGUARD_WRAPPED_CREDENTIALS" not in env
    (cm,) = [m for m in kube.manifests if m["kind"] == "ConfigMap"]
    inside = json.loads(cm["data"]["settings.json"])["vault"]
    assert inside["auth"] == "jwt" and inside["role"] == JWT_ROLE
    assert inside["jwt_path"] == "/var/run/secrets/stepguard/vault/token"
    _no_secret_anywhere(kube, receipt, CANARY)


def test_pod_killed_mid_step_revokes_leases_and_removes_everything(
        kube, podman_image, orchestrator, tmp_path, pg_roles):
    spec = StepSpec.from_dict({
        "name": "train", "isolation": {"mode": "pod", "network": []},
        "credentials": [{"name": "db", "kind": "database", "role": "stepguard-step"}]})
    before = pg_roles()
    started = threading.Event()

    def killer():
        end = time.monotonic() + 90
        while time.monotonic() < end:
            for key in list(kube.pods):
                ns, name = key.split("/")
                try:
                    phase = kube.read_pod(name, ns).status.phase
                except Exception:
                    phase = None
                if phase == "Running" and pg_roles() - before:
                    time.sleep(3)  # the runner has unwrapped and the body is running
                    kube.podman.run("pod", "kill", name, check=False)
                    started.set()
                    return
            time.sleep(0.2)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    body = "import time; print('training', flush=True); time.sleep(120)"
    with pytest.raises(OperationalError, match="without a receipt"):
        _run(kube, spec, _settings(orchestrator, tmp_path, podman_image[1]),
             f"podk-{uuid.uuid4().hex[:8]}", body=body)
    t.join(5)
    assert started.is_set()
    assert [k for k, _ in kube.deleted] == ["Pod", "ConfigMap", "NetworkPolicy"]
    assert not kube.config_maps and not kube.policies
    assert not [n for n in kube.running() if n.startswith("sg-train-")]
    assert pg_roles() - before == set()  # the JIT database user was dropped


def test_tampered_input_stops_in_the_pod_before_the_body(kube, podman_image, orchestrator,
                                                         tmp_path, aws_admin_session):
    run_id = f"podt-{uuid.uuid4().hex[:8]}"
    s3 = aws_admin_session.client("s3", endpoint_url=orchestrator.moto_endpoint)
    lake = {"name": "lake", "kind": "aws_web_identity",
            "role": orchestrator.web_identity_role_arn}
    storage = {"credential": "lake", "endpoint_url": orchestrator.moto_endpoint}
    settings = _settings(orchestrator, tmp_path, podman_image[1])
    produce = StepSpec.from_dict({
        "name": "ingest", "isolation": {"mode": "pod", "network": []},
        "env": {"AWS_REGION": orchestrator.aws_region}, "credentials": [lake],
        "storage": storage,
        "outputs": [{"name": "data", "path": f"s3://{BUCKET}/runs/{{run_id}}/data"}]})
    made = _run(kube, produce, settings, run_id,
                body="import os, pathlib; pathlib.Path(os.environ['STEPGUARD_OUTPUT_DATA'],"
                     " 'rows.csv').write_text('a,b\\n1,2\\n')")
    s3.put_object(Bucket=BUCKET, Key=f"runs/{run_id}/data/data/rows.csv", Body=b"a,b\n6,6\n")
    consume = StepSpec.from_dict({
        "name": "train", "isolation": {"mode": "pod", "network": []},
        "env": {"AWS_REGION": orchestrator.aws_region}, "credentials": [lake],
        "storage": storage,
        "inputs": [{"name": "data", "path": made.output("data").path,
                    "receipt": made.to_json()}]})
    with pytest.raises(IntegrityError) as info:
        _run(kube, consume, settings, run_id, body="print('BODY RAN')")
    assert b"BODY RAN" not in kube.last_log
    assert info.value.receipt.status == "failed"  # type: ignore[attr-defined]


def test_refused_configurations(tmp_path):
    closed = StepSpec.from_dict({"name": "t", "isolation": {"mode": "pod"},
                                 "credentials": [{"name": "api", "kind": "kv", "path": "x"}]})
    with pytest.raises(ConfigurationError) as info:
        run_in_pod(Step(closed, settings=Settings.from_dict({})), ["true"])
    assert info.value.subject == "isolation.network"
    with pytest.raises(ConfigurationError) as info:
        Settings.from_dict({"pods": {"image": "r/x@" + PLACEHOLDER_DIGEST}})
    assert info.value.subject == "pods.image"
    spec = StepSpec.from_dict({"name": "t", "isolation": {"mode": "pod", "network": []},
                               "inputs": [{"name": "d", "path": str(tmp_path),
                                           "manifest": str(tmp_path / "m.json")}]})
    settings = Settings.from_dict({"pods": {"image": "r/x@sha256:" + "1" * 64},
                                   "audit": {"exporter": "none"}})
    with pytest.raises(ConfigurationError) as info:
        run_in_pod(Step(spec, settings=settings), ["true"])
    assert info.value.subject == "inputs.d.path"
    key = tmp_path / "k.pem"
    key.write_text("not a key")
    signed = Settings.from_dict({"pods": {"image": "r/x@sha256:" + "1" * 64},
                                 "receipts": {"signer": "key", "key": str(key)}})
    ok = StepSpec.from_dict({"name": "t", "isolation": {"mode": "pod"}})
    with pytest.raises(ConfigurationError) as info:
        run_in_pod(Step(ok, settings=signed), ["true"])
    assert info.value.subject == "receipts.signer"
    with pytest.raises(ConfigurationError) as info:
        Settings.from_dict({"pods": {"vault_login": "jwt"}})
    assert info.value.subject == "pods.jwt_role"


def test_a_mounted_vault_token_is_what_the_runner_logs_in_with():
    """isolation.vault_kubernetes_auth mounts a projected token: the runner is pointed at it."""
    from stepguard._podstep import pod_config

    spec = StepSpec.from_dict({"name": "t", "isolation": {"mode": "pod", "network": [],
                                                          "vault_kubernetes_auth": True},
                               "credentials": [{"name": "api", "kind": "kv", "path": "x"}]})
    with pytest.raises(ConfigurationError) as info:
        pod_config(spec, Settings.from_dict({}))
    assert info.value.subject == "pods.jwt_role"
    files = pod_config(spec, Settings.from_dict({"pods": {"jwt_role": "stepguard-step"}}))
    vault = json.loads(files["settings.json"])["vault"]
    assert (vault["auth"], vault["jwt_path"]) == ("jwt", "/var/run/secrets/stepguard/vault/token")


def test_a_lost_span_export_in_the_pod_is_in_the_returned_receipt(kube, podman_image,
                                                                  orchestrator, tmp_path):
    """The pod's OTLP collector is down: its receipt says so, and the receipt the orchestrator
    checked and returned keeps the field."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there
    spec = StepSpec.from_dict({
        "name": "train", "isolation": {"mode": "pod", "network": []},
        "env": {"OTEL_EXPORTER_OTLP_TIMEOUT": "1", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "1"}})
    settings = _settings(orchestrator, tmp_path, podman_image[1], otlp_endpoint=dead)
    receipt = _run(kube, spec, settings, f"pode-{uuid.uuid4().hex[:8]}", body="print('ok')")
    assert receipt.audit_export is not None
    assert receipt.audit_export.status == "lost" and receipt.audit_export.spans_dropped > 0
    assert receipt.audit_export.spans_exported == 0
    (cm,) = [m for m in kube.manifests if m["kind"] == "ConfigMap"]
    assert json.loads(cm["data"]["settings.json"])["audit"]["exporter"] == "both"


def test_the_in_pod_spec_keeps_the_gpu_request_and_its_optionality():
    """gpus_optional travels into the pod (else the runner inside refuses a pod step that may
    run on CPU); shm_size is the pod's own /dev/shm, not the runner's."""
    from stepguard._podstep import pod_config
    from stepguard.isolation import build_pod

    spec = StepSpec.from_dict({"name": "t", "isolation": {
        "mode": "pod", "network": [], "gpus": 1, "gpus_optional": True, "shm_size": "2Gi",
        "image": "r/x@sha256:" + "1" * 64}})
    inner = json.loads(pod_config(spec, Settings.from_dict({}))["step.json"])
    assert inner["isolation"]["gpus"] == 1 and inner["isolation"]["gpus_optional"] is True
    assert "shm_size" not in inner["isolation"]
    assert StepSpec.from_dict(inner).isolation.gpus_optional is True  # the runner accepts it
    pod = build_pod(spec.isolation, name="t", command=["true"], env={},
                    context=RunContext(step="t"))
    (shm,) = [v for v in pod["spec"]["volumes"] if v["name"] == "shm"]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}


# -- SecureKubernetesPodOperator: the operator's own pods, really run -----------------------------

@pytest.fixture
def kpo_worker(kube, podman_image, orchestrator, stepguard_env, monkeypatch):
    """An Airflow worker whose SecureKubernetesPodOperator pods run in podman; a key policy."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    from stepguard_airflow.operators import _kporunner

    root = stepguard_env
    key = ec.generate_private_key(ec.SECP256R1())
    (root / "k.pem").write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                                   ser.NoEncryption()))
    cfg = root / "stepguard.yaml"
    cfg.write_text(f'vault: {{addr: "{orchestrator.vault_addr}", auth: approle}}\n'
                   f'pods: {{image: "{podman_image[1]}"}}\n')
    monkeypatch.setenv("STEPGUARD_CONFIG", str(cfg))
    monkeypatch.setattr(_kporunner, "kube_api", lambda op: kube.api())
    import boto3

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    return root


def _kpo_dag(orchestrator, *, train_receipt: Any = None, ingest: bool = True,
             publish: str | None = None) -> str:
    lake = {"name": "lake", "kind": "aws_web_identity",
            "role": orchestrator.web_identity_role_arn}
    step = {"storage": {"credential": "lake", "endpoint_url": orchestrator.moto_endpoint}}
    region = orchestrator.aws_region
    write = ("import os, pathlib; pathlib.Path(os.environ['STEPGUARD_OUTPUT_DATA'], "
             "'rows.csv').write_text('a,b\\\\n1,2\\\\n')")
    train = ("import os, pathlib; print('BODY RAN'); "
             "pathlib.Path(os.environ['STEPGUARD_OUTPUT_MODEL'], 'weights.json').write_text('[1]')")
    receipt = "ingest.output" if train_receipt is None else repr(train_receipt)
    return f"""
        import pendulum
        from airflow.sdk import DAG
        from kubernetes.client import models as k8s
        from stepguard_airflow.operators import SignAndPublishModelOperator
        from stepguard_airflow.operators.kubernetes import SecureKubernetesPodOperator

        common = dict(namespace="ml", network=[], credentials=[{lake!r}], spec={step!r},
                      env_vars={{"AWS_REGION": {region!r}}}, image={{image!r}})
        with DAG("{{dag_id}}", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
            if {ingest!r}:
                ingest = SecureKubernetesPodOperator(
                    task_id="ingest", cmds=["python3", "-c", {write!r}],
                    outputs={{"data": "s3://{BUCKET}/kpo/{{{{ run_id }}}}/data"}}, **common)
            train = SecureKubernetesPodOperator(
                task_id="train", cmds=["python3", "-c", {train!r}],
                receipts={{"data": {receipt}}},
                outputs={{"model": "s3://{BUCKET}/kpo/{{{{ run_id }}}}/model"}},
                volumes=[k8s.V1Volume(name="data", empty_dir=k8s.V1EmptyDirVolumeSource())],
                volume_mounts=[k8s.V1VolumeMount(name="data", mount_path="/data")], **common)
            if {publish!r}:
                SignAndPublishModelOperator(
                    task_id="publish", model=train.output, name="churn", version="1",
                    signing={{"signer": "key", "key": {publish!r}}},
                    registry="s3://{BUCKET}/kpo-registry", credential={lake!r})
    """


@pytest.mark.airflow
def test_operator_pod_runs_the_step_runner_and_its_receipt_chains(
        airflow_run, kpo_worker, kube, podman_image, orchestrator, capfd):
    source = _kpo_dag(orchestrator, publish=str(kpo_worker / "k.pem"))
    dag, _ = airflow_run.write(source.replace("{image!r}", repr(podman_image[1])))
    dr = dag.test()
    out = capfd.readouterr().out
    assert airflow_run.states(dr) == {"ingest": "success", "train": "success",
                                      "publish": "success"}, out[-4000:]
    ingest, train = airflow_run.xcom_of(dr, "ingest"), airflow_run.xcom_of(dr, "train")
    assert airflow_run.xcom_of(dr, "train", "stepguard_receipt") == train
    assert train["isolation"]["mode"] == "process" and train["isolation"]["pod"]
    assert train["context"]["run_id"] == dr.run_id and train["context"]["step"] == "train"
    (data,) = train["inputs"]
    assert data["verified"] is True and data["path"] == ingest["outputs"][0]["path"]
    assert train["outputs"][0]["path"].startswith(f"s3://{BUCKET}/kpo/")
    published = airflow_run.xcom_of(dr, "publish")
    (trained,) = published["inputs"]
    assert trained["verified"] is True and trained["path"] == train["outputs"][0]["path"]
    # The operator's pods: the step runner as entrypoint, its ConfigMap, the user's volume
    # added to (not replacing) the pod's /tmp; all removed.
    pods = [m for m in kube.manifests if m["kind"] == "Pod"]
    assert len(pods) == 2
    for pod in pods:
        c = pod["spec"]["containers"][0]
        assert c["command"][:2] == ["stepguard", "exec"]
        assert pod["metadata"]["namespace"] == "ml"
    mounts = {m["mountPath"] for m in pods[1]["spec"]["containers"][0]["volumeMounts"]}
    assert {"/tmp", "/data", "/etc/stepguard"} <= mounts
    assert sorted(kube.deleted) == sorted(kube.created)


@pytest.mark.airflow
def test_operator_pod_stops_on_a_tampered_input_before_the_body(
        airflow_run, kpo_worker, kube, podman_image, orchestrator, capfd, aws_admin_session):
    source = _kpo_dag(orchestrator).replace("{image!r}", repr(podman_image[1]))
    first, _ = airflow_run.write(source)
    dr = first.test()
    assert airflow_run.states(dr)["ingest"] == "success", capfd.readouterr().out[-4000:]
    made = airflow_run.xcom_of(dr, "ingest")
    key = made["outputs"][0]["path"].split(f"s3://{BUCKET}/", 1)[1] + "rows.csv"
    s3 = aws_admin_session.client("s3", endpoint_url=orchestrator.moto_endpoint)
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"a,b\n6,6\n")  # after the receipt was made
    capfd.readouterr()
    second, _ = airflow_run.write(_kpo_dag(orchestrator, train_receipt=made, ingest=False)
                                  .replace("{image!r}", repr(podman_image[1])))
    dr = second.test()
    out = capfd.readouterr().out
    assert airflow_run.states(dr) == {"train": "failed"}
    assert "IntegrityError" in out
    assert "BODY RAN" not in out
    failed = airflow_run.xcom_of(dr, "train", "stepguard_failed_receipt")
    assert failed["status"] == "failed" and failed["error"]["type"] == "IntegrityError"
