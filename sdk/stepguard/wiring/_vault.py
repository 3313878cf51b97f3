"""Settings -> the Vault configuration and an authenticated :class:`VaultClient`.

Settings name the address, limits, auth method, role and mount; the auth method's secret
material (a token, a secret-id, a JWT) comes from its usual environment variable or file and is
read by the auth class itself (``AppRoleAuth.from_env`` etc.), never copied into settings.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from stepguard.errors import ConfigurationError
from stepguard.settings import Settings

if TYPE_CHECKING:
    from stepguard.credentials import CredentialSession, VaultAuth, VaultClient, VaultConfig


def _auth(settings: Settings, env: Mapping[str, str]) -> VaultAuth:
    from stepguard.credentials import AppRoleAuth, JwtAuth, KubernetesAuth, TokenAuth

    vs = settings.vault
    if vs.auth == "approle":
        return AppRoleAuth.from_env(env, role_id=vs.role, mount=vs.mount)
    if vs.auth == "jwt":
        return JwtAuth.from_env(env, role=vs.role, jwt_path=vs.jwt_path, mount=vs.mount)
    if vs.auth == "kubernetes":
        return KubernetesAuth.from_env(env, role=vs.role, mount=vs.mount)
    return TokenAuth.from_env(env)


def vault_config(settings: Settings, environ: Mapping[str, str] | None = None) -> VaultConfig:
    """The Vault client configuration for a step: address and limits from settings, the auth
    method's secret material (token, secret-id, JWT) from its usual environment or file.

    >>> from stepguard.settings import Settings
    >>> s = Settings.from_dict({"vault": {"addr": "http://127.0.0.1:8200", "auth": "approle",
    ...                                   "role": "orchestrator"}})
    >>> vault_config(s, {"VAULT_SECRET_ID": "s-1"}).auth
    AppRoleAuth(role_id='orchestrator', mount='approle')
    >>> vault_config(Settings.from_dict({}), {})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    stepguard.errors.ConfigurationError: Vault address is not set, ...: vault.addr
    """
    from stepguard.credentials import VaultConfig

    env = os.environ if environ is None else environ
    vs = settings.vault
    if not vs.addr:
        raise ConfigurationError("Vault address is not set, but the step asks for credentials",
                                 subject="vault.addr",
                                 hint="set VAULT_ADDR or vault.addr in stepguard.yaml")
    return VaultConfig(
        addr=vs.addr,
        auth=_auth(settings, env),
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


def unauthenticated_config(settings: Settings) -> VaultConfig:
    """Address, CA, namespace and limits alone: for unwrapping a handed-over token and for the
    health probe, which log in with nothing."""
    from stepguard.credentials import VaultConfig

    vs = settings.vault
    if not vs.addr:
        raise ConfigurationError("Vault address is not set", subject="vault.addr",
                                 hint="set VAULT_ADDR or vault.addr in stepguard.yaml")
    return VaultConfig(addr=vs.addr, auth=None, namespace=vs.namespace, ca_cert=vs.ca_cert,
                       timeout_s=vs.timeout_s)


@contextlib.contextmanager
def vault_client(settings: Settings, *,
                 session: CredentialSession | None = None) -> Iterator[VaultClient]:
    """An authenticated :class:`~stepguard.credentials.VaultClient` for calls beyond a
    credential session (Transit signing and verification).

    With an open ``session`` the step token is used (no second login; its policies must allow
    the calls -- the dev stack's ``stepguard-step`` policy allows Transit signing). Otherwise
    the configured auth method logs in for this block, and a token that login created is
    revoked when the block ends.
    """
    if session is not None and not session.closed:
        yield session.step_api()
        return
    from stepguard.credentials import VaultClient

    cfg = vault_config(settings)
    client = VaultClient(cfg)
    try:
        assert cfg.auth is not None
        login = cfg.auth.login(client)
        authed = client.with_token(login.token)
        try:
            yield authed
        finally:
            if login.owned:
                with contextlib.suppress(Exception):
                    authed.request("POST", "auth/token/revoke-self",
                                   what="login token revocation", retry=False)
    finally:
        client.close()


def probe_vault(settings: Settings) -> dict[str, object]:
    """Ask Vault's unauthenticated health endpoint; one clear error when it cannot answer."""
    from stepguard.credentials import VaultClient

    client = VaultClient(unauthenticated_config(settings))
    try:
        return dict(client.health())
    finally:
        client.close()
