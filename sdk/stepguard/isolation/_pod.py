"""Pod and NetworkPolicy manifests built from an IsolationSpec.

The pod meets Pod Security "restricted" and adds our own rules: digest-pinned image, no
service-account token (or only a projected, audience-bound, short-lived one for Vault Kubernetes
auth), read-only root with an emptyDir scratch, CPU/memory/GPU limits, a deadline, and a
default-deny NetworkPolicy whose only openings are the spec's ``host:port`` allowlist plus DNS.
"""

from __future__ import annotations

import ipaddress
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from stepguard.errors import ConfigurationError, PolicyViolation
from stepguard.settings import PLACEHOLDER_DIGEST
from stepguard.spec import IsolationSpec, RunContext

DIGEST_IMAGE = re.compile(r"^[^@\s]+@sha256:[0-9a-f]{64}$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SVC = re.compile(r"^(?P<svc>[a-z0-9-]+)\.(?P<ns>[a-z0-9-]+)\.svc(\.cluster\.local)?$")
VAULT_TOKEN_DIR = "/var/run/secrets/stepguard/vault"  # noqa: S105 -- a path, not a secret
VAULT_AUDIENCE = "vault"
CONFIG_DIR = "/etc/stepguard"  # the step's ConfigMap: spec, settings, Vault CA (read-only)
DEFAULT_CPU = "1"
DEFAULT_MEMORY = "2Gi"
SCRATCH_DIR = "/tmp"  # noqa: S108 -- an emptyDir private to the pod
HOME_DIR = "/home/stepguard"
_TOKEN_TTL_S = 600  # the shortest lifetime the API server accepts for a projected token


def _check_name(name: str) -> None:
    if not _DNS1123.match(name):
        raise ConfigurationError(
            "pod name must be a DNS-1123 label (lower-case letters, digits, '-'; at most 63)",
            subject=name,
        )


def check_image(spec: IsolationSpec) -> str:
    """The image reference, refusing a mutable tag unless ``allow_unpinned_image``."""
    if not spec.image:
        raise ConfigurationError("a pod needs an image", subject="isolation.image")
    if spec.image.endswith("@" + PLACEHOLDER_DIGEST):
        raise ConfigurationError("the all-zero placeholder digest is not an image",
                                 subject=spec.image,
                                 hint="set pods.image to the digest you built and reviewed")
    if not DIGEST_IMAGE.match(spec.image):
        if not spec.allow_unpinned_image:
            raise PolicyViolation(
                "image is not pinned by digest (a tag can be moved to other bytes)",
                subject=spec.image,
                hint="use repo/name@sha256:<digest>, or set allow_unpinned_image: true",
            )
        warnings.warn(f"allow_unpinned_image: running mutable image {spec.image}",
                      stacklevel=3)
    return spec.image


def pod_labels(context: RunContext, name: str) -> dict[str, str]:
    """Labels on both objects; ``stepguard.dev/pod`` ties the policy to exactly this pod."""
    labels = dict(context.labels())
    labels["stepguard.dev/pod"] = name
    labels["app.kubernetes.io/managed-by"] = "stepguard"
    return labels


def build_pod(
    spec: IsolationSpec,
    *,
    name: str,
    command: Sequence[str],
    env: Mapping[str, str],
    context: RunContext,
    wrapped_token_env: Mapping[str, str] | None = None,
    deadline_s: float | None = None,
    config_map: str | None = None,
    vault_audience: str = VAULT_AUDIENCE,
    vault_token_expiry_s: int = _TOKEN_TTL_S,
    user_volumes: Sequence[Mapping[str, Any]] = (),
    user_volume_mounts: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """A Pod manifest (plain dict) for ``command`` under ``spec``.

    ``wrapped_token_env`` carries a response-wrapped, single-use Vault token (variable name ->
    wrapping token) for runners that cannot use Vault Kubernetes auth: it is useless once the
    step runner inside has unwrapped it, so it may sit in the pod spec; a real credential never
    does. ``deadline_s`` becomes ``activeDeadlineSeconds`` (default: longer for GPU pods).
    ``config_map`` names a ConfigMap
    (:func:`build_config_map`) mounted read-only at ``/etc/stepguard``: the step runner's spec,
    settings and Vault CA. With ``spec.vault_kubernetes_auth`` a projected service-account
    token for ``vault_audience`` only, valid ``vault_token_expiry_s``, is mounted at
    ``/var/run/secrets/stepguard/vault/token``. Sizes, ``/dev/shm``, caches and the caller's
    ``user_volumes``/``user_volume_mounts`` are fitted by
    :func:`stepguard.isolation._podres.finish_pod` (docs/reference/isolation.md).

    >>> from stepguard.spec import IsolationSpec, RunContext
    >>> spec = IsolationSpec(mode="pod", image="ghcr.io/acme/train@sha256:" + "a" * 64, gpus=1)
    >>> pod = build_pod(spec, name="train-1", command=["python", "train.py"], env={},
    ...                 context=RunContext(pipeline="p", run_id="r1", step="train"))
    >>> pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    '1'
    >>> pod["spec"]["automountServiceAccountToken"]
    False
    """
    _check_name(name)
    if not command:
        raise ConfigurationError("empty command", subject="command")
    image = check_image(spec)
    labels = pod_labels(context, name)
    cpu = spec.cpu or DEFAULT_CPU
    memory = spec.memory or DEFAULT_MEMORY
    limits: dict[str, str] = {"cpu": cpu, "memory": memory, "ephemeral-storage": spec.scratch_size}
    if spec.gpus:
        limits["nvidia.com/gpu"] = str(spec.gpus)
    env_list = [{"name": k, "value": v} for k, v in sorted(env.items())]
    env_list += [{"name": k, "value": v} for k, v in sorted((wrapped_token_env or {}).items())]
    env_list += [{"name": "HOME", "value": HOME_DIR}, {"name": "TMPDIR", "value": SCRATCH_DIR}]
    seen: set[str] = set()
    for item in env_list:
        if item["name"] in seen:
            raise ConfigurationError("environment variable set twice", subject=item["name"])
        seen.add(item["name"])
    mounts: list[dict[str, Any]] = [
        {"name": "scratch", "mountPath": SCRATCH_DIR},
        {"name": "home", "mountPath": HOME_DIR},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "scratch", "emptyDir": {"sizeLimit": spec.scratch_size}},
        {"name": "home", "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    if config_map:
        _check_name(config_map)
        mounts.append({"name": "stepguard-config", "mountPath": CONFIG_DIR, "readOnly": True})
        volumes.append({"name": "stepguard-config",
                        "configMap": {"name": config_map, "defaultMode": 0o444}})
    if spec.vault_kubernetes_auth:
        # Not the automounted token (long-lived, API-server audience): a projected one that only
        # Vault accepts and that expires within minutes.
        mounts.append({"name": "vault-token", "mountPath": VAULT_TOKEN_DIR, "readOnly": True})
        volumes.append({"name": "vault-token", "projected": {
            "defaultMode": 0o400,
            "sources": [{"serviceAccountToken": {
                "audience": vault_audience,
                "expirationSeconds": int(vault_token_expiry_s),
                "path": "token",
            }}],
        }})
    container: dict[str, Any] = {
        "name": "step",
        "image": image,
        "imagePullPolicy": "IfNotPresent" if DIGEST_IMAGE.match(image) else "Always",
        "command": list(command),
        "env": env_list,
        "workingDir": HOME_DIR,
        "resources": {"limits": limits, "requests": dict(limits)},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": spec.uid,
            "runAsGroup": spec.uid,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
            "procMount": "Default",
        },
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    tolerations = [dict(t) for t in spec.tolerations]
    node_selector = dict(spec.node_selector)
    if spec.gpus:
        if not any(t.get("key") == "nvidia.com/gpu" for t in tolerations):
            tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists",
                                "effect": "NoSchedule"})
        node_selector.setdefault("nvidia.com/gpu.present", "true")
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "activeDeadlineSeconds": max(1, math.ceil(deadline_s or 1)),
        "terminationGracePeriodSeconds": 10,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "hostNetwork": False,
        "hostPID": False,
        "hostIPC": False,
        "shareProcessNamespace": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": spec.uid,
            "runAsGroup": spec.uid,
            "fsGroup": spec.uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if spec.service_account:
        pod_spec["serviceAccountName"] = spec.service_account
    if spec.runtime_class:
        pod_spec["runtimeClassName"] = spec.runtime_class
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    metadata: dict[str, Any] = {"name": name, "labels": labels}
    if spec.namespace:
        metadata["namespace"] = spec.namespace
    from stepguard.isolation._podres import finish_pod

    return finish_pod({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec},
                      spec, env=env, deadline_s=deadline_s, volumes=user_volumes,
                      volume_mounts=user_volume_mounts)


def build_config_map(name: str, data: Mapping[str, str], *, context: RunContext,
                     namespace: str | None = None) -> dict[str, Any]:
    """The ConfigMap a step pod mounts at ``/etc/stepguard`` (never a secret: spec, settings,
    CA certificates). Labelled like the pod, so whatever cleans up one finds the other.

    >>> from stepguard.spec import RunContext
    >>> cm = build_config_map("sg-train-1", {"step.json": "{}"}, context=RunContext(run_id="r1"))
    >>> cm["kind"], sorted(cm["data"])
    ('ConfigMap', ['step.json'])
    """
    _check_name(name)
    metadata: dict[str, Any] = {"name": name, "labels": pod_labels(context, name)}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata,
            "immutable": True, "data": dict(sorted(data.items()))}


def _egress_rule(entry: str) -> dict[str, Any]:
    host, sep, port_s = entry.rpartition(":")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ConfigurationError("network entries are host:port", subject=entry)
    host = host.strip("[]")
    ports = [{"protocol": "TCP", "port": int(port_s)}]
    try:
        net = ipaddress.ip_network(host, strict=False)
    except ValueError:
        m = _SVC.match(host)
        if not m:
            raise ConfigurationError(
                "a NetworkPolicy selects by address: give an IP, a CIDR, or an in-cluster "
                "service name (service.namespace.svc)", subject=entry,
            ) from None
        return {"to": [{"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": m.group("ns")}}}], "ports": ports}
    return {"to": [{"ipBlock": {"cidr": str(net)}}], "ports": ports}


def build_network_policy(spec: IsolationSpec, *, name: str, context: RunContext) -> dict[str, Any]:
    """A default-deny NetworkPolicy for the pod ``name``: no ingress; egress only to the allowlist.

    With ``network: none`` the pod can reach nothing, not even DNS. With an allowlist it may
    resolve names through kube-dns and open TCP to each ``host:port`` (an IP/CIDR, or
    ``service.namespace.svc`` for in-cluster services such as Vault or MinIO).

    >>> from stepguard.spec import IsolationSpec, RunContext
    >>> pol = build_network_policy(IsolationSpec(mode="pod", network=("10.0.0.5:8200",)),
    ...                            name="train-1", context=RunContext(run_id="r1"))
    >>> pol["spec"]["policyTypes"], pol["spec"]["ingress"]
    (['Ingress', 'Egress'], [])
    >>> pol["spec"]["egress"][1]["to"]
    [{'ipBlock': {'cidr': '10.0.0.5/32'}}]
    """
    _check_name(name)
    labels = pod_labels(context, name)
    egress: list[dict[str, Any]] = []
    if spec.network != "none":
        egress.append({
            "to": [{"namespaceSelector": {"matchLabels": {
                        "kubernetes.io/metadata.name": "kube-system"}},
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
        })
        egress += [_egress_rule(e) for e in spec.network]
    metadata: dict[str, Any] = {"name": name, "labels": labels}
    if spec.namespace:
        metadata["namespace"] = spec.namespace
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata,
        "spec": {
            "podSelector": {"matchLabels": {"stepguard.dev/pod": name,
                                            "stepguard.dev/run": labels["stepguard.dev/run"]}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": egress,
        },
    }
