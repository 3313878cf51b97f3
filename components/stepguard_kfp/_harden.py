"""``harden(task, spec)``: put a step's isolation spec on a KFP task, and say what KFP cannot.

KFP (through kfp-kubernetes) can express part of the restricted pod stepguard wants: identity
(``runAsUser``/``runAsNonRoot``), a deadline, resources and accelerators, scheduling (node
selectors, tolerations), pod labels/annotations and emptyDir scratch. It cannot express a per-task
service account, ``automountServiceAccountToken: false``, a NetworkPolicy, a RuntimeClass, a
read-only root filesystem or a PID limit. Those are reported as gaps, each with the platform-side
remedy, instead of being silently dropped.
"""


import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from stepguard.errors import ConfigurationError, PolicyViolation
from stepguard.spec import IsolationSpec, RunContext, StepSpec
from stepguard_kfp._image import IMAGE_DIGEST, check_pinned
from stepguard_kfp._imageref import set_task_image

__all__ = ["HardeningGap", "HardeningReport", "harden"]

#: Pod label a namespace-wide NetworkPolicy selects to deny egress (see docs/concepts/kfp.md).
NETWORK_LABEL = "stepguard.dev/network"
SCRATCH_VOLUME = "stepguard-scratch"
TMP_VOLUME = "stepguard-tmp"
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "toleration_seconds"}

REMEDIES: Mapping[str, str] = {
    "network": (
        "KFP cannot create a NetworkPolicy: apply the NetworkPolicy from docs/concepts/kfp.md "
        f"in the run namespace; it selects pods labelled {NETWORK_LABEL}=none (harden adds "
        "the label) and allows egress only to the KFP object store/metadata and Vault, which "
        "the launcher and the step runner in the same pod need"
    ),
    "network_allowlist": (
        "KFP cannot create a NetworkPolicy: apply an egress NetworkPolicy allowing exactly the "
        "listed host:port entries for pods labelled "
        f"{NETWORK_LABEL}=allowlist (generate it with the isolation pod builder)"
    ),
    "service_account": (
        "KFP runs every task of a run with the run's service account: submit the run with a "
        "dedicated least-privilege service account (create_run_from_pipeline_package("
        "service_account=...)) in its own namespace"
    ),
    "service_account_token": (
        "KFP cannot unset automountServiceAccountToken per task and its launcher in the pod "
        "uses the run's account: give that account no RBAC beyond what the launcher needs, "
        "and fetch step credentials from Vault, never from the cluster"
    ),
    "runtime_class": (
        "KFP cannot set runtimeClassName: set it with an admission policy (Kyverno/Gatekeeper "
        "mutation) matching the stepguard.dev/step label, or a namespace default"
    ),
    "read_only_root": (
        "KFP cannot set readOnlyRootFilesystem: enforce it with an admission policy; harden "
        "mounts emptyDirs on /tmp and the scratch path so the body still has writable space"
    ),
    "pids_limit": (
        "Kubernetes has no per-pod PID limit field: set podPidsLimit in the kubelet "
        "configuration of the node pool the task is scheduled on"
    ),
    "namespace": (
        "the namespace is per run in KFP: submit the run into that namespace (a KFP profile)"
    ),
    "vault_kubernetes_auth": (
        "kfp-kubernetes cannot add a projected service-account token with a Vault audience: "
        "label the task with use_settings(task, vault_auth='jwt') and let the platform's "
        "admission mutation project the token (docs/concepts/kfp.md), or hand over a wrapped "
        "token (secure_train(wrapped_credentials=...))"
    ),
    "image": (
        "the component's image is not pinned by digest; set the one image setting "
        "(STEPGUARD_PODS_IMAGE / pods.image) to REPO@sha256:DIGEST"
    ),
    "security_context": (
        "this kfp-kubernetes has no set_security_context (added in 2.16): enforce runAsNonRoot "
        "and the UID with Pod Security admission (restricted) on the namespace"
    ),
}


@dataclass(frozen=True)
class HardeningGap:
    """One isolation setting KFP cannot express, with the platform-side remedy."""

    setting: str
    wanted: str
    remedy: str


@dataclass(frozen=True)
class HardeningReport:
    """What :func:`harden` put on the task (``applied``) and what it could not (``gaps``).

    >>> r = HardeningReport(task="train", applied=("timeout=660s",),
    ...                     gaps=(HardeningGap("runtime_class", "gvisor", "use a policy"),))
    >>> r.gap_settings
    ('runtime_class',)
    >>> r.raise_for_gaps(accepted={"runtime_class"}) is None
    True
    >>> r.raise_for_gaps()
    Traceback (most recent call last):
    ...
    stepguard.errors.PolicyViolation: isolation settings KFP cannot enforce on this task: train
    """

    task: str
    applied: tuple[str, ...] = ()
    gaps: tuple[HardeningGap, ...] = ()
    spec_digest: str = ""

    @property
    def gap_settings(self) -> tuple[str, ...]:
        """The names of the settings KFP could not express."""
        return tuple(g.setting for g in self.gaps)

    def summary(self) -> str:
        """Human-readable lines: one per applied setting, one per gap with its remedy."""
        lines = [f"task {self.task}: {len(self.applied)} applied, {len(self.gaps)} gaps"]
        lines += [f"  applied: {a}" for a in self.applied]
        lines += [f"  gap: {g.setting}={g.wanted} -- {g.remedy}" for g in self.gaps]
        return "\n".join(lines)

    def raise_for_gaps(self, *, accepted: Iterable[str] = ()) -> None:
        """Raise PolicyViolation unless every gap is in ``accepted``.

        A pipeline author calls this after installing the platform-side remedies, listing the
        gaps the platform now covers, so a new gap (a spec change) stops compilation.
        """
        ok = set(accepted)
        open_gaps = [g for g in self.gaps if g.setting not in ok]
        if open_gaps:
            raise PolicyViolation(
                "isolation settings KFP cannot enforce on this task",
                subject=self.task,
                details=[f"{g.setting}={g.wanted}: {g.remedy}" for g in open_gaps],
                hint="install the platform-side remedy, then list the setting in accepted=",
            )


def harden(
    task: Any,
    spec: IsolationSpec | StepSpec,
    *,
    context: RunContext | None = None,
    pipeline: str | None = None,
    deadline_s: float | None = None,
    grace_s: int = 60,
    accelerator_type: str = "nvidia.com/gpu",
    scratch_path: str = "/scratch",
    tmp_size: str = "256Mi",
) -> HardeningReport:
    """Apply ``spec`` to KFP ``task`` (a ``PipelineTask``) and report what KFP cannot express.

    ``spec`` is an :class:`~stepguard.spec.IsolationSpec` or a whole
    :class:`~stepguard.spec.StepSpec` (its ``isolation`` and ``deadline_s`` are used). The pod
    deadline is the step deadline plus ``grace_s``, so the step runner inside the pod times the
    body out and revokes credentials before Kubernetes kills the pod. Caching is turned off: a
    verification step served from cache never verified anything. Pod labels name the step (and
    ``pipeline``), or come from ``context`` when given; they are fixed at compile time. The task
    runs the one image setting, ``pods.image`` (``STEPGUARD_PODS_IMAGE``); where it is not set the
    task would run the all-zero placeholder, and ``harden`` raises ConfigurationError.

    >>> import os
    >>> os.environ["STEPGUARD_PODS_IMAGE"] = "registry.example/sg@sha256:" + "5" * 64
    >>> from kfp import dsl
    >>> from stepguard.spec import IsolationSpec
    >>> from stepguard_kfp import harden, verify_dataset
    >>> @dsl.pipeline
    ... def p(data: str, manifest: str):
    ...     t = verify_dataset(dataset_path=data, manifest_path=manifest)
    ...     report = harden(t, IsolationSpec(mode="pod", gpus=1, runtime_class="gvisor"),
    ...                     deadline_s=600)
    ...     assert "runtime_class" in report.gap_settings
    >>> p.name
    'p'
    >>> del os.environ["STEPGUARD_PODS_IMAGE"]
    """
    deadline: float | None
    if isinstance(spec, StepSpec):
        iso = spec.isolation
        deadline = spec.deadline_s if deadline_s is None else deadline_s
    else:
        iso = spec
        deadline = deadline_s
    from kfp import kubernetes

    name = str(task.name)
    applied: list[str] = []
    gaps: list[HardeningGap] = []

    def gap(setting: str, wanted: str, remedy_key: str | None = None) -> None:
        gaps.append(HardeningGap(setting, wanted, REMEDIES[remedy_key or setting]))

    set_task_image(task)  # the one image setting, whenever the components were imported
    image = getattr(getattr(task, "container_spec", None), "image", None)
    if image is not None:
        try:
            check_pinned(image)
        except ConfigurationError:
            # The placeholder is no image at all (pods.image is not set): never a mere gap.
            if not iso.allow_unpinned_image or image.endswith("@" + IMAGE_DIGEST):
                raise
            gap("image", image)

    # Verification must run on every run: a cached result is a verdict about other bytes.
    task.set_caching_options(False)
    applied.append("caching=off")

    set_sc = getattr(kubernetes, "set_security_context", None)
    if set_sc is not None:
        set_sc(task, run_as_user=iso.uid, run_as_group=iso.uid, run_as_non_root=True)
        applied.append(f"securityContext.runAsUser={iso.uid},runAsGroup={iso.uid},"
                       "runAsNonRoot=true")
    else:  # pragma: no cover - older kfp-kubernetes
        gap("security_context", f"runAsUser={iso.uid},runAsNonRoot=true")

    if deadline is not None:
        seconds = math.ceil(deadline) + max(0, grace_s)
        kubernetes.set_timeout(task, seconds)
        applied.append(f"activeDeadlineSeconds={seconds}")

    if iso.gpus:
        task.set_accelerator_type(accelerator_type)
        task.set_accelerator_limit(iso.gpus)
        applied.append(f"accelerator={accelerator_type}x{iso.gpus}")
    if iso.cpu:
        task.set_cpu_request(iso.cpu)
        task.set_cpu_limit(iso.cpu)
        applied.append(f"cpu={iso.cpu}")
    if iso.memory:
        task.set_memory_request(iso.memory)
        task.set_memory_limit(iso.memory)
        applied.append(f"memory={iso.memory}")

    for key, value in sorted(iso.node_selector.items()):
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
        applied.append(f"nodeSelector.{key}={value}")
    for tol in iso.tolerations:
        unknown = sorted(set(tol) - _TOLERATION_KEYS)
        if unknown:
            raise ConfigurationError("unknown toleration field", subject=unknown[0],
                                     hint=f"known: {', '.join(sorted(_TOLERATION_KEYS))}")
        seconds_s = tol.get("toleration_seconds")
        kubernetes.add_toleration(
            task,
            key=tol.get("key"),
            operator=tol.get("operator"),
            value=tol.get("value"),
            effect=tol.get("effect"),
            toleration_seconds=int(seconds_s) if seconds_s is not None else None,
        )
        applied.append("toleration " + ",".join(f"{k}={v}" for k, v in sorted(tol.items())))

    network = "none" if iso.network == "none" else "allowlist"
    if context is not None:
        labels = dict(context.labels())
    else:
        # Run ids are unknown at compile time; KFP labels the pod with its own run id.
        labels = {"stepguard.dev/step": _label_value(name)}
        if pipeline:
            labels["stepguard.dev/pipeline"] = _label_value(pipeline)
    labels[NETWORK_LABEL] = network
    for key, value in sorted(labels.items()):
        kubernetes.add_pod_label(task, label_key=key, label_value=value)
        applied.append(f"label {key}={value}")
    spec_json = json.dumps(_plain(iso), sort_keys=True, separators=(",", ":"))
    spec_digest = "sha256:" + hashlib.sha256(spec_json.encode()).hexdigest()
    kubernetes.add_pod_annotation(task, annotation_key="stepguard.dev/isolation",
                                  annotation_value=spec_json)
    applied.append("annotation stepguard.dev/isolation")

    kubernetes.empty_dir_mount(task, volume_name=SCRATCH_VOLUME, mount_path=scratch_path,
                               size_limit=iso.scratch_size)
    kubernetes.empty_dir_mount(task, volume_name=TMP_VOLUME, mount_path="/tmp",  # noqa: S108
                               size_limit=tmp_size)
    applied.append(f"emptyDir {scratch_path} ({iso.scratch_size}), /tmp ({tmp_size})")

    if iso.network == "none":
        gap("network", "none")
    else:
        gap("network", ",".join(iso.network), "network_allowlist")
    if iso.service_account:
        gap("service_account", iso.service_account)
    gap("service_account_token", "not mounted")
    if iso.runtime_class:
        gap("runtime_class", iso.runtime_class)
    gap("read_only_root", "true")
    if iso.pids_limit:
        gap("pids_limit", str(iso.pids_limit))
    if iso.namespace:
        gap("namespace", iso.namespace)
    if iso.vault_kubernetes_auth:
        gap("vault_kubernetes_auth", "true")
    return HardeningReport(task=name, applied=tuple(applied), gaps=tuple(gaps),
                           spec_digest=spec_digest)


def _label_value(value: str) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]", "-", value)[:63].strip("-_.")
    return value or "x"


def _plain(iso: IsolationSpec) -> dict[str, Any]:
    return iso.to_dict()
