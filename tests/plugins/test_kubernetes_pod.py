"""SecureKubernetesPodOperator: drop-in arguments, restricted pod, parse-time checks.

No Kubernetes API server runs here: these tests check the pod object the operator builds
(``build_pod_request_obj``, which needs a kubeconfig but never contacts the server) and the
NetworkPolicy manifest, with the isolation package's validator (schema included). Creating the
pod and policy on a live cluster is not exercised.
"""

from __future__ import annotations

import warnings

import pytest

pytestmark = [pytest.mark.airflow]

DIGEST = "registry.example/train@sha256:" + "ab" * 32

KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: not-a-real-token}}]
contexts: [{name: x, context: {cluster: c, user: u, namespace: ml}}]
current-context: x
"""


@pytest.fixture
def kubeconfig(tmp_path):
    p = tmp_path / "kubeconfig"
    p.write_text(KUBECONFIG)
    return str(p)


def _op(kubeconfig, **kwargs):
    from stepguard_airflow.operators.kubernetes import SecureKubernetesPodOperator

    base = dict(task_id="train", image=DIGEST, cmds=["python", "-m", "train"],
                namespace="ml", config_file=kubeconfig, in_cluster=False)
    base.update(kwargs)
    return SecureKubernetesPodOperator(**base)


def test_built_pod_is_restricted_and_passes_the_validator(airflow_db, kubeconfig):
    from kubernetes.client import ApiClient

    from stepguard.isolation import check_pod

    op = _op(kubeconfig)
    pod = op.build_pod_request_obj()
    manifest = ApiClient().sanitize_for_serialization(pod)
    assert check_pod(manifest, schema=True) == []
    spec = manifest["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    c = spec["containers"][0]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["resources"]["limits"]["memory"] == "2Gi"
    assert spec["activeDeadlineSeconds"] == 3600
    assert op.log_pod_spec_on_failure is False
    assert manifest["metadata"]["labels"]["stepguard.dev/pod"] == manifest["metadata"]["name"]


def test_stock_arguments_keep_working(airflow_db, kubeconfig):
    """Arguments of an existing KubernetesPodOperator task are accepted unchanged."""
    from kubernetes.client import ApiClient
    from kubernetes.client import models as k8s

    op = _op(
        kubeconfig,
        name="trainer",
        arguments=["--epochs", "{{ params.epochs }}"],
        env_vars={"MODE": "full"},
        labels={"team": "ml"},
        annotations={"owner": "ml-platform"},
        node_selector={"pool": "gpu"},
        tolerations=[k8s.V1Toleration(key="gpu", operator="Exists", effect="NoSchedule")],
        container_resources=k8s.V1ResourceRequirements(limits={"cpu": "4", "memory": "16Gi"}),
        get_logs=True,
        on_finish_action="delete_pod",
        startup_timeout_seconds=300,
        retries=2,
    )
    pod = op.build_pod_request_obj()
    m = ApiClient().sanitize_for_serialization(pod)
    assert m["metadata"]["labels"]["team"] == "ml"
    assert m["metadata"]["annotations"] == {"owner": "ml-platform"}
    assert m["spec"]["nodeSelector"] == {"pool": "gpu"}
    assert m["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "4", "memory": "16Gi"}
    assert {"name": "MODE", "value": "full"} in m["spec"]["containers"][0]["env"]
    assert "template_fields" in dir(op) and "arguments" in op.template_fields


@pytest.mark.parametrize("kwargs, rule", [
    ({"image": "python:3.11"}, "stepguard.image-digest"),
    ({"automount_service_account_token": True}, "stepguard.sa-token"),
    ({"hostnetwork": True}, "baseline.host-namespaces"),
    ({"security_context": {}, "container_security_context": {"privileged": True}},
     "baseline.privileged"),
])
def test_unsafe_pod_is_refused_at_parse_time(airflow_db, kubeconfig, kwargs, rule):
    from stepguard.errors import PolicyViolation

    with pytest.raises(PolicyViolation) as info:
        _op(kubeconfig, **kwargs)
    assert any(d.startswith(rule) for d in info.value.details), info.value.details
    assert "train" in str(info.value)
    assert rule in str(info.value)  # the one-line message names the rule


def test_api_usable_projected_token_is_refused(airflow_db, kubeconfig):
    """Red-team finding 7, contract level (no API server here): a projected service-account
    token without an audience, mounted at the standard path, is a token for the Kubernetes API."""
    from kubernetes.client import models as k8s

    from stepguard.errors import PolicyViolation

    token = k8s.V1Volume(name="kube-api-access", projected=k8s.V1ProjectedVolumeSource(sources=[
        k8s.V1VolumeProjection(service_account_token=k8s.V1ServiceAccountTokenProjection(
            path="token", expiration_seconds=86400))]))
    mount = k8s.V1VolumeMount(name="kube-api-access", read_only=True,
                              mount_path="/var/run/secrets/kubernetes.io/serviceaccount")
    with pytest.raises(PolicyViolation) as info:
        _op(kubeconfig, volumes=[token], volume_mounts=[mount]).build_pod_request_obj()
    assert any(d.startswith("stepguard.projected-token") for d in info.value.details), \
        info.value.details


def test_templated_image_is_checked_when_the_pod_is_built(airflow_db, kubeconfig):
    from stepguard.errors import PolicyViolation

    op = _op(kubeconfig, image="{{ params.image }}")  # unknown at parse time: accepted
    op.image = "python:3.11"  # what rendering would produce
    with pytest.raises(PolicyViolation):
        op.build_pod_request_obj()


def test_unpinned_image_escape_hatch_warns(airflow_db, kubeconfig):
    op = _op(kubeconfig, image="python:3.11", allow_unpinned_image=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op.build_pod_request_obj()  # accepted by explicit choice


def test_network_policy_is_default_deny_for_exactly_this_pod(airflow_db, kubeconfig):
    op = _op(kubeconfig, network=["10.0.0.5:8200"])
    pod = op.build_pod_request_obj()
    policy = op.network_policy_manifest(pod)
    assert policy["kind"] == "NetworkPolicy"
    assert policy["spec"]["podSelector"] == {"matchLabels": {"stepguard.dev/pod":
                                                             pod.metadata.name}}
    assert policy["spec"]["ingress"] == []
    assert policy["spec"]["egress"][-1]["to"] == [{"ipBlock": {"cidr": "10.0.0.5/32"}}]
    closed = _op(kubeconfig).network_policy_manifest(pod)
    assert closed["spec"]["egress"] == []


def test_lifecycle_callbacks_are_attached(airflow_db, kubeconfig):
    from stepguard_airflow.operators.kubernetes import StepguardPodCallbacks

    op = _op(kubeconfig)
    assert StepguardPodCallbacks in op.callbacks


# The single-use wrapped token handed to the pod: test_pods_podman.py, with a real pod
# (test_wrapped_login_in_a_pod_with_object_store_output: the second unwrap is refused).


def test_pod_lifecycle_callbacks_record_span_events(airflow_db, kubeconfig):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from stepguard_airflow.operators.kubernetes import StepguardPodCallbacks

    mem = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(mem))
    pod = _op(kubeconfig).build_pod_request_obj()
    with provider.get_tracer("t").start_as_current_span("task"):
        StepguardPodCallbacks.on_pod_creation(pod=pod, client=None, mode="sync")
        StepguardPodCallbacks.on_pod_completion(pod=pod, client=None, mode="sync")
        StepguardPodCallbacks.on_pod_cleanup(pod=pod, client=None, mode="sync")
    [span] = mem.get_finished_spans()
    names = [e.name for e in span.events]
    assert names == ["stepguard.pod.created", "stepguard.pod.completed", "stepguard.pod.cleanup"]
    assert span.events[0].attributes["k8s.pod.name"] == pod.metadata.name
    assert span.events[0].attributes["k8s.namespace.name"] == "ml"


@pytest.mark.services
def test_on_kill_revokes_the_step_credentials(airflow_db, kubeconfig, dev_stack, dev_postgres,
                                              monkeypatch, tmp_path):
    """Killing the task revokes the leases the task minted for its pod at once (the session
    the runner code opens for the wrapped hand-over), not at their TTL."""
    from stepguard.credentials import VaultConfig, open_session
    from stepguard.spec import CredentialRequest, RunContext

    for var in ("VAULT_TOKEN", "STEPGUARD_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VAULT_ADDR", dev_stack.vault_addr)
    monkeypatch.setenv("VAULT_ROLE_ID", dev_stack.approle_role_id)
    monkeypatch.setenv("VAULT_SECRET_ID_FILE", str(dev_stack.approle_secret_id_file))
    monkeypatch.setenv("STEPGUARD_VAULT_AUTH", "approle")
    op = _op(kubeconfig, network=["10.0.0.5:8200"],
             credentials=[{"name": "db", "kind": "database", "role": "stepguard-step"}])
    request = CredentialRequest(name="db", kind="database", role="stepguard-step")
    with open_session([request], settings=VaultConfig.from_env(),
                      context=RunContext(run_id="manual__kill", step="train"),
                      ttl_s=600) as session:
        assert session.leases and not any(rec.revoked for rec in session.leases)
        op.on_kill()  # no pod was created (no API server): only the revocation matters here
        assert all(rec.revoked for rec in session.leases)


def test_deferrable_is_refused_and_platform_default_overridden(airflow_db, kubeconfig, monkeypatch):
    """Deferring would let this task process exit while the pod runs: its NetworkPolicy would be
    deleted and its credentials revoked under the running pod."""
    from stepguard.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="deferrable"):
        _op(kubeconfig, deferrable=True)
    monkeypatch.setenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", "True")
    assert _op(kubeconfig).deferrable is False


def test_credentials_with_no_network_are_refused_when_the_dag_is_parsed(kubeconfig):
    from stepguard.errors import ConfigurationError

    with pytest.raises(ConfigurationError) as info:
        _op(kubeconfig, credentials=[{"name": "db", "kind": "database", "role": "r"}])
    assert info.value.subject == "network"


def test_the_placeholder_digest_is_refused_when_the_dag_is_parsed(kubeconfig):
    from stepguard.errors import PolicyViolation

    with pytest.raises(PolicyViolation, match="placeholder"):
        _op(kubeconfig, image="ghcr.io/stepguard/stepguard-runtime@sha256:" + "0" * 64)


def test_user_volumes_are_added_to_the_scratch_dir_not_replacing_it(airflow_db, kubeconfig):
    from kubernetes.client import ApiClient
    from kubernetes.client import models as k8s

    from stepguard.errors import ConfigurationError

    data = k8s.V1Volume(name="data", empty_dir=k8s.V1EmptyDirVolumeSource())
    op = _op(kubeconfig, volumes=[data],
             volume_mounts=[k8s.V1VolumeMount(name="data", mount_path="/data")])
    m = ApiClient().sanitize_for_serialization(op.build_pod_request_obj())
    mounts = {v["mountPath"]: v["name"] for v in m["spec"]["containers"][0]["volumeMounts"]}
    assert mounts == {"/tmp": "scratch", "/data": "data"}
    assert {v["name"] for v in m["spec"]["volumes"]} == {"scratch", "data"}
    # The runner's pod gets the same volumes, merged into its own (scratch, home, /dev/shm).
    assert op.stepguard_volumes == ([{"name": "data", "emptyDir": {}}],
                                    [{"name": "data", "mountPath": "/data"}])
    with pytest.raises(ConfigurationError) as info:
        _op(kubeconfig, volumes=[data],
            volume_mounts=[k8s.V1VolumeMount(name="data", mount_path="/tmp")])
    assert info.value.subject == "/tmp"


def test_stock_arguments_become_the_runner_pods_step(airflow_db, kubeconfig):
    """The pod the task creates is the step runner's: the KPO arguments that shape it land in
    the step spec (see _kporunner's table)."""
    from kubernetes.client import models as k8s

    from stepguard_airflow._common import resolve_spec
    from stepguard_airflow.operators import _kporunner

    op = _op(kubeconfig, network=[], arguments=["--epochs", "3"], env_vars={"MODE": "full"},
             node_selector={"pool": "gpu"}, service_account_name="trainer",
             active_deadline_seconds=7200,
             tolerations=[k8s.V1Toleration(key="gpu", operator="Exists", effect="NoSchedule")],
             container_resources=k8s.V1ResourceRequirements(limits={
                 "cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"}),
             inputs={"data": {"path": "s3://lake/data/", "manifest": "s3://lake/m.json"}},
             outputs={"model": "s3://lake/model/"},
             spec={"storage": {"endpoint_url": "http://10.0.0.7:9000"}})
    spec = resolve_spec(_kporunner.spec_data(op, "train"), "pod", None)
    iso = spec.isolation
    assert (iso.mode, iso.image, iso.namespace, iso.network) == ("pod", DIGEST, "ml", ())
    assert (iso.cpu, iso.memory, iso.gpus) == ("8", "64Gi", 2)
    assert iso.node_selector == {"pool": "gpu"} and iso.service_account == "trainer"
    assert iso.tolerations == ({"key": "gpu", "operator": "Exists", "effect": "NoSchedule"},)
    assert spec.deadline_s == 7200 and spec.env == {"MODE": "full"}
    assert [(i.name, i.path) for i in spec.inputs] == [("data", "s3://lake/data/")]
    assert [(o.name, o.path) for o in spec.outputs] == [("model", "s3://lake/model/")]
    assert _kporunner.body_argv(op) == ["python", "-m", "train", "--epochs", "3"]


@pytest.mark.parametrize("kwargs, subject", [
    ({"outputs": {"model": "s3://lake/model/"}}, "isolation.network"),
    ({"network": [], "inputs": {"data": {"path": "/mnt/data", "manifest": "/mnt/m.json"}}},
     "inputs.data.path"),
    ({"pod_template_file": "/etc/pod.yaml"}, "pod_template_file"),
    ({"env_vars": "secret-ref"}, "env_vars.K"),
])
def test_step_arguments_a_pod_cannot_honour_are_refused_at_parse_time(airflow_db, kubeconfig,
                                                                      kwargs, subject):
    from kubernetes.client import models as k8s

    from stepguard.errors import ConfigurationError

    if kwargs.get("env_vars") == "secret-ref":
        kwargs = {"env_vars": [k8s.V1EnvVar(name="K", value_from=k8s.V1EnvVarSource(
            secret_key_ref=k8s.V1SecretKeySelector(name="s", key="k")))]}
    with pytest.raises(ConfigurationError) as info:
        _op(kubeconfig, **kwargs)
    assert info.value.subject == subject
