"""``SecureKubernetesPodOperator``: the cncf-kubernetes ``KubernetesPodOperator`` as a stepguard
step -- the step runner is the pod's entrypoint, and the pod's receipt joins the chain.

When the task runs, the pod is the one :mod:`stepguard.pods` builds for ``isolation.mode:
pod`` (the same code as ``SecureStepOperator(isolation="pod")``): ``stepguard exec`` with the
step spec and settings from a read-only ConfigMap, the body (``cmds`` + ``arguments``) under it;
inputs and outputs are object-store URIs (``inputs=``/``outputs=``, or upstream ``receipts=``);
the runner logs in to Vault inside the pod (a single-use wrapped token, or JWT auth), verifies
the inputs, runs the body, uploads and hashes the outputs and prints its receipt, which is read
back, checked and returned (XCom ``return_value`` and ``stepguard_receipt``). Which stock
arguments shape that pod is listed in :mod:`stepguard_airflow.operators._kporunner`.

What is checked when the DAG is parsed (the stock arguments, as before):

* restricted defaults where the DAG author set nothing: non-root uid 65534, ``seccomp``
  ``RuntimeDefault``, no privilege escalation, every capability dropped, read-only root (with
  an ``emptyDir`` at ``/tmp``), CPU/memory limits, a deadline, no service-account token;
* the pod the operator would create is checked at construction (DAG parse) with the isolation
  package's validator (Pod Security "restricted" + digest-pinned images + stepguard rules):
  a pod that breaks a rule is a DAG import error naming every violation. The complete pod
  (with the task's labels, sidecars, templates applied) is checked again before it is created;
* ``log_pod_spec_on_failure`` is off (a pod spec in a task log is a leak waiting to happen);
* credentials are delivered as one response-wrapped, single-use Vault token in
  ``STEPGUARD_WRAPPED_CREDENTIALS`` (or the pod logs in itself, ``pods.vault_login: jwt``): the
  real credentials never pass through Airflow, XCom, rendered fields or etcd, and the leases are
  revoked when the task ends, however it ends;
* a default-deny NetworkPolicy selecting exactly this pod is created with it and deleted with
  it (``network``: ``"none"``, or an allowlist to which Vault, the object store and the OTLP
  collector from settings are added; ``[]`` opens only those);
* a pod step that needs the network (credentials, object-store data) with ``network="none"``
  is a DAG import error; ``on_kill`` revokes the credentials (the pod, its ConfigMap and policy
  are deleted by the runner code on every path, SIGTERM included).

``StepguardPodCallbacks`` stays attached for code that drives the stock pod lifecycle; the
runner's pod is recorded by the step's own spans (``stepguard.step``, ``isolation.run``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.cncf.kubernetes.callbacks import KubernetesPodOperatorCallback
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import models as k8s  # type: ignore[import-untyped]

from stepguard_airflow._failures import step_name, task_failure
from stepguard_airflow.operators import _kporunner

if TYPE_CHECKING:
    from airflow.sdk import Context

    from stepguard.spec import CredentialRequest

__all__ = ["SecureKubernetesPodOperator", "StepguardPodCallbacks"]

log = logging.getLogger("stepguard.airflow.kubernetes")

DEFAULT_UID = 65534
DEFAULT_DEADLINE_S = 3600
SCRATCH = "/tmp"  # noqa: S108 -- an emptyDir private to the pod


def _event(name: str, pod: Any = None, **attrs: Any) -> None:
    """Add a pod lifecycle event to the current (task/step) span."""
    try:
        from opentelemetry import trace

        values = {f"stepguard.pod.{k}": str(v) for k, v in attrs.items() if v is not None}
        meta = getattr(pod, "metadata", None)
        if meta is not None:
            values["k8s.pod.name"] = str(meta.name)
            values["k8s.namespace.name"] = str(meta.namespace)
        trace.get_current_span().add_event(f"stepguard.pod.{name}", values)
    except Exception:  # auditing must never break the pod's lifecycle
        log.debug("could not record pod event %s", name)


class StepguardPodCallbacks(KubernetesPodOperatorCallback):
    """Pod lifecycle -> audit span events (created, starting, completed, torn down)."""

    @staticmethod
    def on_pod_creation(*, pod: k8s.V1Pod, **kwargs: Any) -> None:
        _event("created", pod)

    @staticmethod
    def on_pod_starting(*, pod: k8s.V1Pod, **kwargs: Any) -> None:
        _event("starting", pod)

    @staticmethod
    def on_pod_completion(*, pod: k8s.V1Pod, **kwargs: Any) -> None:
        phase = getattr(getattr(pod, "status", None), "phase", None)
        _event("completed", pod, phase=phase)

    @staticmethod
    def on_pod_teardown(*, pod: k8s.V1Pod, **kwargs: Any) -> None:
        _event("teardown", pod)

    @staticmethod
    def on_pod_cleanup(*, pod: k8s.V1Pod, **kwargs: Any) -> None:
        _event("cleanup", pod)


def restricted_pod_security_context(uid: int = DEFAULT_UID) -> k8s.V1PodSecurityContext:
    """Pod-level security context meeting Pod Security "restricted"."""
    return k8s.V1PodSecurityContext(
        run_as_non_root=True, run_as_user=uid, run_as_group=uid, fs_group=uid,
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )


def restricted_container_security_context(uid: int = DEFAULT_UID) -> k8s.V1SecurityContext:
    """Container-level security context meeting Pod Security "restricted" + read-only root."""
    return k8s.V1SecurityContext(
        allow_privilege_escalation=False, privileged=False, read_only_root_filesystem=True,
        run_as_non_root=True, run_as_user=uid, run_as_group=uid,
        capabilities=k8s.V1Capabilities(drop=["ALL"]),
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )


def _templated(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


class SecureKubernetesPodOperator(KubernetesPodOperator):
    """A ``KubernetesPodOperator`` whose pod is restricted, checked, and credential-safe.

    Accepts every ``KubernetesPodOperator`` argument, plus:

    :param credentials: JIT credentials for the step (:class:`~stepguard.spec.CredentialRequest`
        or mappings); minted under a child token, handed to the pod as one single-use wrapped
        token, revoked when the task ends.
    :param network: ``"none"`` (default: no egress at all) or ``host:port`` entries allowed
        through the pod's NetworkPolicy.
    :param network_policy: create the NetworkPolicy (default ``True``); turn off only where a
        cluster-wide policy already isolates step pods.
    :param allow_unpinned_image: accept an image tag instead of a digest (warns).
    :param stepguard_conn_id: the ``stepguard`` connection (Vault address and login).
    :param wrap_ttl_s: lifetime of the wrapping token (the pod must be scheduled, pull its
        image and start within it); default ``pods.wrap_ttl_s`` (20 min).
    :param inputs: input name -> object-store URI (verified against its receipt from
        ``receipts=``), or -> an input spec mapping (``{"path": "s3://...", "manifest":
        "s3://.../manifest.json"}``); verified inside the pod before the body starts (templated).
    :param outputs: output name -> object-store URI the runner uploads to (templated).
    :param receipts: input name -> upstream receipt (e.g. ``ingest.output``): the input is
        verified against the digest its producer recorded; its path may come from the receipt
        (templated).
    :param spec: more of the step spec (a mapping: ``storage``, ``signing``, ``policies``...);
        the arguments above are added to it.

    The task's return value is the pod's checked receipt (also pushed as ``stepguard_receipt``),
    so ``SignAndPublishModelOperator(model=train.output)`` chains after it.
    """

    template_fields: Sequence[str] = (*KubernetesPodOperator.template_fields,
                                      "inputs", "outputs", "receipts")
    _stepguard_secured = True
    #: Violations of these rules depend on values only known once templates are rendered.
    _TEMPLATE_DEPENDENT: ClassVar[frozenset[str]] = frozenset({"stepguard.image-digest"})

    def __init__(
        self,
        *,
        credentials: Sequence[CredentialRequest | Mapping[str, Any]] = (),
        network: str | Sequence[str] = "none",
        network_policy: bool = True,
        allow_unpinned_image: bool = False,
        stepguard_conn_id: str | None = "stepguard_default",
        wrap_ttl_s: int | None = None,
        inputs: Mapping[str, str | Mapping[str, Any]] | None = None,
        outputs: Mapping[str, str] | None = None,
        receipts: Mapping[str, Any] | None = None,
        spec: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        from stepguard.errors import ConfigurationError
        from stepguard.spec import CredentialRequest

        _kporunner.refuse_pod_templates(kwargs)
        # What the DAG author asked for (the defaults below are for the parse-time check).
        self.stepguard_resources = kwargs.get("container_resources")
        self.stepguard_deadline_s = kwargs.get("active_deadline_seconds")

        if kwargs.get("deferrable"):
            # Deferring hands the pod to the triggerer while this process exits: the step's
            # NetworkPolicy would be deleted and its credentials revoked while the pod runs.
            raise ConfigurationError(
                "SecureKubernetesPodOperator does not run deferrable", subject="deferrable",
                hint="leave deferrable unset: the pod's NetworkPolicy and credentials live as "
                     "long as this task process")
        # Also when [operators] default_deferrable is on: the same reason applies.
        kwargs["deferrable"] = False
        kwargs.setdefault("security_context", restricted_pod_security_context())
        kwargs.setdefault("container_security_context", restricted_container_security_context())
        if kwargs.get("automount_service_account_token") is None:
            kwargs["automount_service_account_token"] = False
        kwargs.setdefault("log_pod_spec_on_failure", False)
        kwargs.setdefault("active_deadline_seconds", DEFAULT_DEADLINE_S)
        kwargs.setdefault("container_resources", k8s.V1ResourceRequirements(
            limits={"cpu": "1", "memory": "2Gi", "ephemeral-storage": "1Gi"},
            requests={"cpu": "1", "memory": "2Gi", "ephemeral-storage": "1Gi"},
        ))
        kwargs.setdefault("termination_grace_period", 10)
        # A read-only root needs somewhere to write: the /tmp emptyDir stays, the user's
        # volumes are added to it (merge_volumes refuses a clash with it, naming it).
        from stepguard.isolation import merge_volumes

        user_volumes = (_kporunner.to_dicts(kwargs.get("volumes")),
                        _kporunner.to_dicts(kwargs.get("volume_mounts")))
        merge_volumes({"spec": {
            "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}}],
            "containers": [{"volumeMounts": [{"name": "scratch", "mountPath": SCRATCH}]}]}},
            *user_volumes)
        kwargs["volumes"] = [k8s.V1Volume(name="scratch", empty_dir=k8s.V1EmptyDirVolumeSource(
            size_limit="1Gi")), *(kwargs.get("volumes") or ())]
        kwargs["volume_mounts"] = [k8s.V1VolumeMount(name="scratch", mount_path=SCRATCH),
                                   *(kwargs.get("volume_mounts") or ())]
        callbacks = kwargs.get("callbacks")
        if callbacks is None:
            kwargs["callbacks"] = StepguardPodCallbacks
        elif isinstance(callbacks, list):
            kwargs["callbacks"] = [*callbacks, StepguardPodCallbacks]
        else:
            kwargs["callbacks"] = [callbacks, StepguardPodCallbacks]
        super().__init__(**kwargs)
        self.credentials = tuple(
            c if isinstance(c, CredentialRequest) else _credential_from(c) for c in credentials)
        self.network = "none" if network == "none" else tuple(network)
        if self.credentials and self.network == "none":
            # The step runner in the pod unwraps its credentials at Vault: a pod that can
            # reach nothing would sit there until its deadline with a token it cannot use.
            raise ConfigurationError(
                "a pod with no network cannot reach Vault to unwrap its credentials",
                subject="network",
                hint="network=['<vault ip>:8200', ...]: Vault, the object store and the OTLP "
                     "collector, nothing else")
        self.network_policy = network_policy
        self.allow_unpinned_image = allow_unpinned_image
        self.stepguard_conn_id = stepguard_conn_id
        self.wrap_ttl_s = wrap_ttl_s
        self.inputs = dict(inputs) if inputs else None
        self.outputs = dict(outputs) if outputs else None
        from stepguard_airflow.operators._step import receipt_arg

        self.receipts = {k: receipt_arg(v) for k, v in receipts.items()} if receipts else None
        self.step_spec = dict(spec) if spec else None
        self.stepguard_volumes = user_volumes
        self.check_pod_spec(parse_time=True)
        self._check_step()

    def _check_step(self) -> None:
        """The step spec as far as it is known when the DAG is parsed (templates aside)."""
        import json
        from dataclasses import replace

        from stepguard.pods import check_pod_spec
        from stepguard_airflow._common import coerce_spec, resolve_spec

        data = _kporunner.spec_data(self, step_name(self.task_id),
                                    receipt_inputs=tuple(self.receipts or ()))
        coerce_spec(data, step_name(self.task_id), tuple(self.receipts or ()))
        if "{{" not in json.dumps(data, default=str):
            spec = resolve_spec(data, None, None, dict.fromkeys(self.receipts or ()))
            # An input's path from an upstream receipt is known when the task runs.
            check_pod_spec(replace(spec, inputs=tuple(
                i for i in spec.inputs if i.name not in (self.receipts or {}))))

    # -- the check ----------------------------------------------------------------------------

    def preview_pod(self) -> dict[str, Any]:
        """The pod this operator would create, as a plain manifest, without any cluster.

        The same construction as ``build_pod_request_obj`` minus what needs the API server or
        the task instance (namespace lookup, task labels, xcom sidecar, mutation hook) or a
        file read (``pod_template_file``).
        """
        from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator
        from kubernetes.client import ApiClient

        container = k8s.V1Container(
            image=self.image, name=self.base_container_name, command=self.cmds, args=self.arguments,
            ports=self.ports, image_pull_policy=self.image_pull_policy,
            resources=self.container_resources, volume_mounts=self.volume_mounts,
            env=None, env_from=None, security_context=self.container_security_context,
        )
        pod = k8s.V1Pod(
            api_version="v1", kind="Pod",
            metadata=k8s.V1ObjectMeta(name=self.name or "preview",
                                      namespace=self.namespace or "default"),
            spec=k8s.V1PodSpec(
                containers=[container], init_containers=self.init_containers,
                volumes=self.volumes, security_context=self.security_context,
                automount_service_account_token=self.automount_service_account_token,
                host_network=self.hostnetwork, service_account_name=self.service_account_name,
                restart_policy="Never", active_deadline_seconds=self.active_deadline_seconds,
                node_selector=self.node_selector, tolerations=self.tolerations,
            ),
        )
        # A pod_template_file is not read here (no I/O while the DAG is parsed): a pod built
        # from one is checked in full by build_pod_request_obj, before it is created.
        base = self.full_pod_spec
        if self.pod_template_dict:
            base = PodGenerator.deserialize_model_dict(self.pod_template_dict)
        if base is not None:
            pod = PodGenerator.reconcile_pods(base, pod)
        out: dict[str, Any] = ApiClient().sanitize_for_serialization(pod)
        return out

    def check_pod_spec(self, manifest: Mapping[str, Any] | None = None, *,
                       parse_time: bool = False) -> None:
        """Raise :class:`~stepguard.errors.PolicyViolation` naming every broken rule."""
        from stepguard.errors import PolicyViolation
        from stepguard.isolation import check_pod, violations_summary

        pod = dict(manifest) if manifest is not None else self.preview_pod()
        found = check_pod(pod, schema=not parse_time)
        images = [c.get("image") for c in pod.get("spec", {}).get("containers", [])]
        if parse_time and any(_templated(i) for i in images):
            found = [v for v in found if v.rule not in self._TEMPLATE_DEPENDENT]
        if self.allow_unpinned_image:
            found = [v for v in found if v.rule != "stepguard.image-digest"]
        if found:
            raise PolicyViolation(
                violations_summary(found), subject=f"task {self.task_id}",
                details=[str(v) for v in found],
                hint="remove the overriding argument, or see docs/reference/isolation.md",
            )

    def build_pod_request_obj(self, context: Context | None = None) -> k8s.V1Pod:
        """The stock pod, plus stepguard labels, checked in full (schema included)."""
        from kubernetes.client import ApiClient

        pod = super().build_pod_request_obj(context)
        pod.metadata.labels = {**(pod.metadata.labels or {}),
                               "app.kubernetes.io/managed-by": "stepguard",
                               "stepguard.dev/pod": pod.metadata.name}
        if pod.spec.enable_service_links is None:
            pod.spec.enable_service_links = False
        self.check_pod_spec(ApiClient().sanitize_for_serialization(pod))
        return pod

    def network_policy_manifest(self, pod: k8s.V1Pod) -> dict[str, Any]:
        """The default-deny NetworkPolicy for ``pod`` (built by the isolation package)."""
        from stepguard.isolation import build_network_policy
        from stepguard.spec import IsolationSpec, RunContext

        spec = IsolationSpec(mode="pod", network=self.network,  # type: ignore[arg-type]
                             namespace=pod.metadata.namespace)
        labels = pod.metadata.labels or {}
        ctx = RunContext(run_id=labels.get("stepguard.dev/run", labels.get("run_id", "run")))
        policy = build_network_policy(spec, name=pod.metadata.name, context=ctx)
        # Select the pod by the label this operator put on it, whatever labels the run has.
        policy["spec"]["podSelector"] = {"matchLabels": {"stepguard.dev/pod": pod.metadata.name}}
        return policy

    # -- execution ----------------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        """Run the body under the step runner in the pod; return the pod's checked receipt."""
        from stepguard_airflow._common import execute_step, receipt_xcom, resolve_spec
        from stepguard_airflow.assets import resolve_receipt
        from stepguard_airflow.operators._step import RECEIPT_KEY

        receipts = ({k: resolve_receipt(context, v) for k, v in self.receipts.items()}
                    if self.receipts else None)
        data = _kporunner.spec_data(self, step_name(self.task_id),
                                    receipt_inputs=tuple(receipts or ()))
        try:
            spec = resolve_spec(data, "pod", None, receipts)
            command = _kporunner.body_argv(self)
            api = _kporunner.kube_api(self)
        except Exception as err:
            raise task_failure(step_name(self.task_id), err) from None
        receipt = execute_step(
            context=context, spec=spec, command=command, conn_id=self.stepguard_conn_id,
            receipts=receipts, pod={
                "kube_api": api, "volumes": self.stepguard_volumes[0],
                "volume_mounts": self.stepguard_volumes[1], "wrap_ttl_s": self.wrap_ttl_s})
        out = receipt_xcom(receipt)
        context["ti"].xcom_push(key=RECEIPT_KEY, value=out)
        if not self.do_xcom_push:
            # The stock do_xcom_push (default off) is about the KPO's xcom sidecar, which the
            # runner pod does not need: the receipt is the task's value whatever it says.
            context["ti"].xcom_push(key="return_value", value=out)
        return out

    def on_kill(self) -> None:
        """Revoke the step's credentials at once (Airflow's SIGTERM handling only calls this);
        the runner code deletes the pod, its ConfigMap and its policy on every path."""
        from stepguard_airflow._common import revoke_on_kill

        try:
            super().on_kill()
        finally:
            revoke_on_kill()


def _credential_from(data: Mapping[str, Any]) -> CredentialRequest:
    from stepguard.spec import CredentialRequest

    return CredentialRequest.from_dict(dict(data))
