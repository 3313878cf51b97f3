"""What ``SecureKubernetesPodOperator`` hands to the step runner pod (:mod:`stepguard.pods`).

The operator is an adapter: its pod is built by :func:`stepguard.isolation.build_pod` with the
step runner (``stepguard exec``) as the entrypoint and the body (``cmds`` + ``arguments``) under
it, exactly as for ``SecureStepOperator(isolation="pod")``. This module maps the stock
``KubernetesPodOperator`` arguments onto the step spec:

=================================  ==============================================================
KPO argument                       becomes
=================================  ==============================================================
``image``                          ``isolation.image`` (default: the ``pods.image`` setting)
``cmds`` + ``arguments``           the body, run under the step runner
``namespace``                      ``isolation.namespace``
``env_vars`` (plain values)        the step's ``env`` (``valueFrom`` is refused: credentials
                                   come from Vault)
``container_resources`` limits     ``isolation.cpu`` / ``memory`` / ``gpus`` (``nvidia.com/gpu``)
                                   / ``scratch_size`` (``ephemeral-storage``)
``node_selector``, ``tolerations``  ``isolation.node_selector`` / ``tolerations``
``service_account_name``           ``isolation.service_account``
``active_deadline_seconds``        the step's ``deadline_s``
``volumes``, ``volume_mounts``     added to the pod's own (scratch, home, ``/dev/shm``), never
                                   replacing them
=================================  ==============================================================

Everything else about the pod is stepguard's (restricted security contexts, labels, name, no
service-account token); ``pod_template_file`` / ``full_pod_spec`` / ``pod_template_dict`` are
refused, as they would describe another pod than the one created.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from stepguard.errors import ConfigurationError

__all__ = ["body_argv", "kube_api", "spec_data", "to_dicts"]

_TEMPLATE_ARGS = ("pod_template_file", "full_pod_spec", "pod_template_dict")


def to_dicts(items: Any) -> list[dict[str, Any]]:
    """Kubernetes client models (or dicts) as plain manifest dicts."""
    if not items:
        return []
    from kubernetes.client import ApiClient  # type: ignore[import-untyped]

    out: list[dict[str, Any]] = ApiClient().sanitize_for_serialization(list(items))
    return out


def refuse_pod_templates(kwargs: Mapping[str, Any]) -> None:
    for name in _TEMPLATE_ARGS:
        if kwargs.get(name):
            raise ConfigurationError(
                "the step runner's pod is built by stepguard; a pod template would describe "
                "another pod", subject=name,
                hint="give image, resources, node_selector, tolerations, volumes as arguments")


def _plain(request: Any) -> dict[str, Any]:
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(request).items() if v is not None}


def _env(env_vars: Any) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in to_dicts(env_vars):
        if "valueFrom" in item:
            raise ConfigurationError(
                "env_vars with valueFrom are not handed to the step runner pod",
                subject=f"env_vars.{item.get('name')}",
                hint="give the step credentials=...: the runner gets them from Vault")
        env[str(item["name"])] = str(item.get("value") or "")
    return env


def spec_data(op: Any, name: str, *, receipt_inputs: Sequence[str] = ()) -> dict[str, Any]:
    """The step spec (a mapping, templates rendered or not) for ``op``'s pod, named ``name``
    unless its ``spec=`` names it."""
    data: dict[str, Any] = dict(op.step_spec or {})
    data.setdefault("name", name)
    iso: dict[str, Any] = dict(data.get("isolation") or {})
    iso["mode"] = "pod"
    if op.image:
        iso.setdefault("image", op.image)
    if op.allow_unpinned_image:
        iso["allow_unpinned_image"] = True
    if op.namespace:
        iso.setdefault("namespace", op.namespace)
    iso["network"] = "none" if op.network == "none" else list(op.network)
    resources = op.stepguard_resources
    limits = dict(getattr(resources, "limits", None) or {}) if resources is not None else {}
    for key, field in (("cpu", "cpu"), ("memory", "memory"),
                       ("ephemeral-storage", "scratch_size")):
        if key in limits:
            iso.setdefault(field, str(limits[key]))
    if "nvidia.com/gpu" in limits:
        iso.setdefault("gpus", int(limits["nvidia.com/gpu"]))
    if op.node_selector:
        iso.setdefault("node_selector", dict(op.node_selector))
    if op.tolerations:
        iso.setdefault("tolerations", to_dicts(op.tolerations))
    if op.service_account_name:
        iso.setdefault("service_account", op.service_account_name)
    data["isolation"] = iso
    if op.credentials:
        data["credentials"] = [*(data.get("credentials") or ()),
                               *(_plain(c) for c in op.credentials)]
    inputs = list(data.get("inputs") or ())
    named = {i.get("name") for i in inputs if isinstance(i, Mapping)}
    for input_name, given in (op.inputs or {}).items():
        # A URI (its receipt from receipts=), or an input spec: {"path": ..., "manifest": ...}.
        item = dict(given) if isinstance(given, Mapping) else {"path": str(given)}
        inputs.append({**item, "name": input_name})
        named.add(input_name)
    inputs += [{"name": n} for n in receipt_inputs if n not in named]
    if inputs:
        data["inputs"] = inputs
    outputs = list(data.get("outputs") or ())
    outputs += [{"name": n, "path": str(uri)} for n, uri in (op.outputs or {}).items()]
    if outputs:
        data["outputs"] = outputs
    env = _env(op.env_vars)
    if env:
        data["env"] = {**dict(data.get("env") or {}), **env}
    if op.stepguard_deadline_s is not None:
        data.setdefault("deadline_s", float(op.stepguard_deadline_s))
    return data


def body_argv(op: Any) -> list[str]:
    """The body: ``cmds`` + ``arguments`` (the image's entrypoint is the step runner)."""
    argv = [str(a) for a in (op.cmds or [])] + [str(a) for a in (op.arguments or [])]
    if not op.cmds:
        raise ConfigurationError(
            "give the body as cmds=[...]: the pod's entrypoint is the step runner",
            subject=f"{op.task_id}.cmds")
    return argv


def kube_api(op: Any) -> Any:
    """The Kubernetes API the pod is created through: ``$STEPGUARD_KUBE_API`` when set (e.g.
    podman ``kube play``), else the operator's own hook client (``kubernetes_conn_id``,
    ``config_file``, ``in_cluster``, ``cluster_context``)."""
    if os.environ.get("STEPGUARD_KUBE_API", "").strip():
        return None  # KubeApi.from_environment() loads the factory
    from kubernetes.client import NetworkingV1Api

    from stepguard.isolation import KubeApi

    core = op.client
    return KubeApi(core=core, networking=NetworkingV1Api(core.api_client))
