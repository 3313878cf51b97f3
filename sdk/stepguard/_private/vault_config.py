"""Map stepguard :class:`Settings` onto the credentials package's ``VaultConfig``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from stepguard.errors import ConfigurationError
from stepguard.settings import Settings

if TYPE_CHECKING:
    from stepguard.credentials import VaultAuth, VaultConfig


def vault_config(settings: Settings, environ: Mapping[str, str] | None = None) -> VaultConfig:
    """The Vault client configuration for a step: address and limits from settings, the auth
    method's secret material (token, secret-id, JWT) from its usual environment or file."""
    from stepguard.credentials import (
        AppRoleAuth,
        JwtAuth,
        KubernetesAuth,
        TokenAuth,
        VaultConfig,
    )

    env = dict(os.environ if environ is None else environ)
    vs = settings.vault
    if not vs.addr:
        raise ConfigurationError("Vault address is not set, but the step asks for credentials",
                                 subject="vault.addr",
                                 hint="set VAULT_ADDR or vault.addr in stepguard.yaml")
    # The auth classes read their own variables; settings name the method and role.
    env["VAULT_ADDR"] = vs.addr
    if vs.role:
        env.setdefault({"approle": "VAULT_ROLE_ID", "jwt": "VAULT_JWT_ROLE",
                        "kubernetes": "VAULT_K8S_ROLE"}.get(vs.auth, "_UNUSED"), vs.role)
    if vs.jwt_path:
        env.setdefault("VAULT_JWT_PATH", vs.jwt_path)
    if vs.mount:
        env["VAULT_" + {"approle": "APPROLE", "jwt": "JWT", "kubernetes": "K8S",
                        "token": "TOKEN"}[vs.auth] + "_MOUNT"] = vs.mount
    factories: dict[str, Any] = {"token": TokenAuth, "approle": AppRoleAuth, "jwt": JwtAuth,
                                 "kubernetes": KubernetesAuth}
    auth: VaultAuth = factories[vs.auth].from_env(env)
    return VaultConfig(
        addr=vs.addr,
        auth=auth,
        namespace=vs.namespace,
        ca_cert=vs.ca_cert,
        timeout_s=vs.timeout_s,
        token_heartbeat_s=vs.heartbeat_s,
        # An in-pod JWT/Kubernetes login already yields a token for this step alone (revoked at
        # the end); its role need not be allowed to create children.
        child_token=vs.auth not in ("jwt", "kubernetes"),
        sts_endpoint=env.get("STEPGUARD_STS_ENDPOINT") or env.get("AWS_ENDPOINT_URL") or None,
        aws_region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
    )
