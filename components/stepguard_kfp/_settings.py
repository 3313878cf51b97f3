"""Platform settings for components on a cluster: one ConfigMap, mounted read-only.

A component pod knows nothing of the platform until it is told: where Vault is and how to log in,
its CA bundle, the verification policies, the registry, the OTLP collector and the object store.
The platform publishes them once per namespace as a ConfigMap (default name
``stepguard-settings``)::

    apiVersion: v1
    kind: ConfigMap
    metadata: {name: stepguard-settings, namespace: ml-team}
    data:
      stepguard.yaml: |            # the stepguard settings file (docs/reference/core.md)
        vault: {addr: "https://vault.vault.svc:8200", ca_cert: /etc/stepguard/ca.crt,
                auth: jwt, role: kfp-step, jwt_path: /var/run/secrets/stepguard/vault/token}
        registry: {url: "s3://models/prod"}
        policies: {release: {kind: transit, key: release, min_version: 1}}
      ca.crt: |                    # Vault's CA bundle (optional)
        -----BEGIN CERTIFICATE-----...
      OTEL_EXPORTER_OTLP_ENDPOINT: http://otel-collector.observability.svc:4318   # optional
      AWS_ENDPOINT_URL: http://minio-service.kubeflow.svc:9000                    # optional

:func:`use_settings` mounts it on a task (``kfp.kubernetes.use_config_map_as_volume``: a
ConfigMap volume is always read-only) at ``/etc/stepguard``, where a component in a KFP pod looks
first, and maps the optional OTLP/object-store keys to their standard variables
(``kfp.kubernetes.use_config_map_as_env``). In a pod the state directory (local receipts, audit
log) defaults to ``/tmp/stepguard`` on the task's emptyDir: the root filesystem is read-only.
Every component also takes ``settings_path`` to name another file. Inside a KFP pod,
:func:`load_settings` refuses to run without settings (a
:class:`~stepguard.errors.ConfigurationError` naming the path and the remedy) instead of failing
later on "Vault address is not set" or exporting spans to ``localhost``.

Vault login from a component pod, both ways:

* **JWT** (the cluster default): ``vault.auth: jwt`` with ``jwt_path`` on a projected
  service-account token whose audience is Vault's. kfp-kubernetes 2.16 cannot add a projected
  volume to a task, so ``use_settings(..., vault_auth="jwt")`` labels the pod
  ``stepguard.dev/vault-auth=jwt`` and the platform's admission policy adds the volume (the
  Kyverno policy is in docs/concepts/kfp.md). A missing token file fails with the path named.
* **Wrapped token**: the submitter mints the step's credentials, wraps them single-use
  (``stepguard.credentials.wrap_for_delivery``) and passes the wrapping token as
  ``secure_train(wrapped_credentials=...)``; the step runner unwraps it once in the pod.

>>> from stepguard_kfp._settings import load_settings
>>> load_settings("", environ={}, in_pod=True)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
stepguard.errors.ConfigurationError: no stepguard settings in this pod ...: /etc/stepguard/...
"""

# No "from __future__ import annotations": the doctest's KFP pipeline needs real annotations.

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from stepguard.errors import ConfigurationError
from stepguard.settings import Settings

__all__ = [
    "SETTINGS_CONFIG_MAP",
    "SETTINGS_DIR",
    "SETTINGS_ENV_KEYS",
    "SETTINGS_FILE",
    "VAULT_AUTH_LABEL",
    "load_settings",
    "settings_file",
    "use_settings",
]

#: Default name of the platform's settings ConfigMap.
SETTINGS_CONFIG_MAP = "stepguard-settings"
#: Where :func:`use_settings` mounts it.
SETTINGS_DIR = "/etc/stepguard"
#: The key (file) holding the stepguard settings.
SETTINGS_FILE = "stepguard.yaml"
#: Optional ConfigMap keys mapped to the variables of the same name.
SETTINGS_ENV_KEYS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_RESOURCE_ATTRIBUTES",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
)
#: Pod label the platform's admission policy matches to add the Vault-audience token.
VAULT_AUTH_LABEL = "stepguard.dev/vault-auth"
#: State (local receipts, audit log) in a pod: on the task's /tmp emptyDir.
POD_STATE_DIR = "/tmp/stepguard"  # noqa: S108 -- an emptyDir private to the pod
_DEFAULT_STATE_DIR = Settings().state_dir


def use_settings(
    task: Any,
    config_map: str = SETTINGS_CONFIG_MAP,
    *,
    mount_path: str = SETTINGS_DIR,
    env_keys: Sequence[str] = SETTINGS_ENV_KEYS,
    vault_auth: Literal["jwt", "wrapped"] | None = None,
) -> Any:
    """Give a KFP ``task`` the platform's settings ConfigMap; returns the task.

    >>> from kfp import dsl
    >>> from stepguard_kfp import use_settings, verify_dataset
    >>> @dsl.pipeline
    ... def p(data: str, manifest: str):
    ...     use_settings(verify_dataset(dataset_path=data, manifest_path=manifest))
    >>> from google.protobuf.json_format import MessageToDict
    >>> k8s = MessageToDict(p.platform_spec)["platforms"]["kubernetes"]["deploymentSpec"]
    >>> k8s["executors"]["exec-verify-dataset"]["configMapAsVolume"][0]["mountPath"]
    '/etc/stepguard'
    """
    from kfp import kubernetes

    if not mount_path.startswith("/") or mount_path.rstrip("/") in ("", "/tmp"):  # noqa: S108
        raise ConfigurationError("settings mount path must be an absolute, dedicated directory",
                                 subject=mount_path)
    if vault_auth not in (None, "jwt", "wrapped"):
        raise ConfigurationError("vault_auth is jwt or wrapped", subject=str(vault_auth))
    kubernetes.use_config_map_as_volume(task, config_map, mount_path=mount_path)
    if env_keys:
        kubernetes.use_config_map_as_env(task, config_map, {k: k for k in env_keys},
                                         optional=True)
    if mount_path.rstrip("/") != SETTINGS_DIR:
        # Only then: kfp.local applies task variables too, and has no such file.
        task.set_env_variable("STEPGUARD_CONFIG", f"{mount_path.rstrip('/')}/{SETTINGS_FILE}")
    if vault_auth is not None:
        kubernetes.add_pod_label(task, label_key=VAULT_AUTH_LABEL, label_value=vault_auth)
    return task


def _in_pod(env: Mapping[str, str]) -> bool:
    return bool(env.get("KFP_POD_NAME") and env.get("KFP_POD_UID")
                and env.get("KUBERNETES_SERVICE_HOST"))


def settings_file(settings_path: str = "", *, environ: Mapping[str, str] | None = None,
                  in_pod: bool | None = None) -> str | None:
    """The settings file a component uses (see :func:`load_settings`); None: the usual search.

    >>> settings_file("/cfg/s.yaml", environ={}), settings_file("", environ={}, in_pod=False)
    ('/cfg/s.yaml', None)
    """
    env = os.environ if environ is None else environ
    pod = _in_pod(env) if in_pod is None else in_pod
    path = settings_path or env.get("STEPGUARD_CONFIG") or ""
    if path:
        return path
    return f"{SETTINGS_DIR}/{SETTINGS_FILE}" if pod else None


def load_settings(settings_path: str = "", *, environ: Mapping[str, str] | None = None,
                  in_pod: bool | None = None) -> Settings:
    """The settings a component runs with.

    ``settings_path`` (the component's parameter) wins, then ``$STEPGUARD_CONFIG``, then the
    mounted ConfigMap's ``/etc/stepguard/stepguard.yaml``. Outside a pod (``kfp.local``) the
    usual :meth:`Settings.load` search applies. Inside a pod, settings must exist, and an OTLP
    audit exporter must have an endpoint: ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` (a
    ConfigMap key), else the settings' ``pods.otlp_endpoint``, which is then exported to this
    process's environment for the exporter and the step runner.
    """
    env = os.environ if environ is None else environ
    pod = _in_pod(env) if in_pod is None else in_pod
    where = settings_file(settings_path, environ=env, in_pod=pod)
    if not pod:
        return Settings.load(where or "auto", environ=env)
    assert where is not None
    if not Path(where).is_file():
        raise ConfigurationError(
            "no stepguard settings in this pod (Vault address, policies, registry)",
            subject=where,
            hint="mount the platform's settings ConfigMap on the task with "
                 "stepguard_kfp.use_settings(task), or pass settings_path")
    settings = Settings.load(where, environ=env)
    if settings.state_dir == _DEFAULT_STATE_DIR and not env.get("STEPGUARD_STATE_DIR"):
        settings = replace(settings, state_dir=POD_STATE_DIR)
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    from_settings = getattr(getattr(settings, "pods", None), "otlp_endpoint", None)
    if not endpoint and from_settings:
        endpoint = str(from_settings)
        if environ is None:  # this process and the step runner it starts export there
            os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    if settings.audit.exporter in ("otlp", "both") and not endpoint:
        raise ConfigurationError(
            f"audit exporter {settings.audit.exporter!r} has no OTLP endpoint in this pod "
            "(spans would go to localhost and be lost)",
            subject="OTEL_EXPORTER_OTLP_ENDPOINT",
            hint="add OTEL_EXPORTER_OTLP_ENDPOINT to the settings ConfigMap, or set "
                 "pods.otlp_endpoint in its stepguard.yaml")
    return settings
