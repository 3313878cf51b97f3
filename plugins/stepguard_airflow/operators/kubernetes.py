"""``SecureKubernetesPodOperator``: the cncf-kubernetes ``KubernetesPodOperator`` with a
restricted pod, checked when the DAG is parsed.

It is a drop-in subclass: every argument of the stock operator keeps working. What changes:

* restricted defaults where the DAG author set nothing: non-root uid 65534, ``seccomp``
  ``RuntimeDefault``, no privilege escalation, every capability dropped, read-only root (with
  an ``emptyDir`` at ``/tmp``), CPU/memory limits, a deadline, no service-account token;
* the pod the operator would create is checked at construction (DAG parse) with the isolation
  package's validator (Pod Security "restricted" + digest-pinned images + stepguard rules):
  a pod that breaks a rule is a DAG import error naming every violation. The complete pod
  (with the task's labels, sidecars, templates applied) is checked again before it is created;
* ``log_pod_spec_on_failure`` is off (a pod spec in a task log is a leak waiting to happen);
* credentials are delivered as one response-wrapped, single-use Vault token in
  ``STEPGUARD_WRAPPED_CREDENTIALS``: the step runner in the pod (``stepguard exec``) unwraps it; the
  real credentials never pass through Airflow, XCom, rendered fields or etcd, and the leases are
  revoked when the task ends, however it ends;
* a default-deny NetworkPolicy selecting exactly this pod is created with it and deleted with
  it (``network``: ``"none"`` or a ``host:port`` allowlist);
* the pod's lifecycle is recorded as events on the audit span through the operator's
  callbacks; ``on_kill`` deletes the pod and the policy and revokes the credentials.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.cncf.kubernetes.callbacks import KubernetesPodOperatorCallback
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import models as k8s  # type: ignore[import-untyped]

from stepguard_airflow._common import run_context
from stepguard_airflow._failures import step_name, task_failure

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
    """

    template_fields: Sequence[str] = tuple(KubernetesPodOperator.template_fields)
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
        **kwargs: Any,
    ) -> None:
        from stepguard.errors import ConfigurationError
        from stepguard.spec import CredentialRequest

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
        if kwargs.get("volumes") is None and kwargs.get("volume_mounts") is None:
            # A read-only root needs somewhere to write.
            kwargs["volumes"] = [k8s.V1Volume(name="scratch", empty_dir=k8s.V1EmptyDirVolumeSource(
                size_limit="1Gi"))]
            kwargs["volume_mounts"] = [k8s.V1VolumeMount(name="scratch", mount_path=SCRATCH)]
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
        self._stepguard_session: Any = None
        self._stepguard_policy: tuple[str, str] | None = None
        self.check_pod_spec(parse_time=True)

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
        from stepguard.errors import StepguardError

        try:
            with self._credentials(context) as wrapped:
                if wrapped is not None:
                    from stepguard.credentials import WRAPPED_ENV

                    self.env_vars = [*(self.env_vars or []),
                                     k8s.V1EnvVar(name=WRAPPED_ENV, value=wrapped)]
                return super().execute(context)
        except StepguardError as err:
            raise task_failure(step_name(self.task_id), err) from None
        finally:
            self._delete_network_policy()

    def get_or_create_pod(self, pod_request_obj: k8s.V1Pod, context: Context) -> k8s.V1Pod:
        """Create the NetworkPolicy first, so the pod never runs a moment without it."""
        if self.network_policy:
            body = self.network_policy_manifest(pod_request_obj)
            ns = pod_request_obj.metadata.namespace
            from kubernetes.client import NetworkingV1Api

            NetworkingV1Api(self.client.api_client).create_namespaced_network_policy(ns, body)
            self._stepguard_policy = (ns, body["metadata"]["name"])
            _event("network_policy_created", pod_request_obj)
        return super().get_or_create_pod(pod_request_obj, context)

    def _delete_network_policy(self) -> None:
        if self._stepguard_policy is None:
            return
        ns, name = self._stepguard_policy
        self._stepguard_policy = None
        try:
            from kubernetes.client import NetworkingV1Api

            NetworkingV1Api(self.client.api_client).delete_namespaced_network_policy(name, ns)
        except Exception as exc:
            log.warning("could not delete NetworkPolicy %s/%s (%s)", ns, name,
                        type(exc).__name__)

    def _credentials(self, context: Context) -> Any:
        """Mint the step's credentials and wrap them for the pod; revoke on exit."""
        import contextlib

        @contextlib.contextmanager
        def cm() -> Any:
            if not self.credentials:
                yield None
                return
            from stepguard.credentials import VaultConfig, open_session, wrap_for_delivery
            from stepguard_airflow.hooks import StepguardHook

            hook = StepguardHook(self.stepguard_conn_id)
            settings = hook.get_settings()
            ctx = run_context(context, step_name(self.task_id))
            ttl = float(self.active_deadline_seconds or DEFAULT_DEADLINE_S) + \
                settings.vault.ttl_margin_s
            with hook.login_env(settings), open_session(
                    self.credentials, settings=VaultConfig.from_env(), context=ctx,
                    ttl_s=ttl) as session:
                self._stepguard_session = session
                try:
                    delivery = wrap_for_delivery(
                        session, ttl_s=self.wrap_ttl_s or settings.pods.wrap_ttl_s)
                    from airflow.sdk.log import mask_secret

                    token = delivery.token.get_secret_value()
                    mask_secret(token)
                    yield token
                finally:
                    self._stepguard_session = None

        return cm()

    def on_kill(self) -> None:
        """Delete the pod (stock), then the NetworkPolicy, then revoke the credentials."""
        try:
            super().on_kill()
        finally:
            self._delete_network_policy()
            session = self._stepguard_session
            if session is not None:
                close = getattr(session, "close", None) or getattr(session, "revoke", None)
                if callable(close):
                    try:
                        close()
                    except Exception as exc:
                        log.warning("credential revocation on kill failed (%s)",
                                    type(exc).__name__)


def _credential_from(data: Mapping[str, Any]) -> CredentialRequest:
    from stepguard.spec import CredentialRequest

    return CredentialRequest.from_dict(dict(data))
