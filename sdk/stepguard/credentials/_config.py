"""How to reach Vault (:class:`VaultConfig`) and how to log in (one small class per method).

This module imports nothing else of the credentials package: an auth method's ``login`` is
handed the :class:`~stepguard.credentials.VaultClient` to call with (see :class:`VaultCaller`).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from stepguard.errors import ConfigurationError, CredentialDenied, CredentialError

#: Where Kubernetes projects a pod's service-account token.
K8S_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105


@dataclass(frozen=True)
class Login:
    """The token a login produced. ``owned`` tokens are revoked by the session that made them."""

    token: str = field(repr=False)
    accessor: str = field(repr=False)
    ttl_s: int
    renewable: bool
    policies: tuple[str, ...]
    owned: bool


class VaultCaller(Protocol):
    """What an auth method needs of :class:`~stepguard.credentials.VaultClient`."""

    def with_token(self, token: str | None) -> VaultCaller: ...

    def request(self, method: str, path: str, *, what: str, json: dict[str, Any] | None = None,
                wrap_ttl_s: int | None = None, retry: bool = True) -> dict[str, Any] | None: ...

    def login(self, mount: str, payload: dict[str, Any], what: str) -> Login: ...


@runtime_checkable
class VaultAuth(Protocol):
    """An auth method: turns configuration into a Vault token."""

    def login(self, api: VaultCaller) -> Login: ...


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def login_result(body: dict[str, Any] | None, what: str) -> Login:
    """The :class:`Login` in a Vault login answer."""
    auth = (body or {}).get("auth") or {}
    token = auth.get("client_token")
    if not token:
        raise CredentialError(f"Vault {what} returned no token", subject=what)
    return Login(
        token=str(token),
        accessor=str(auth.get("accessor", "")),
        ttl_s=int(auth.get("lease_duration") or 0),
        renewable=bool(auth.get("renewable")),
        policies=tuple(auth.get("policies") or ()),
        owned=True,
    )


def _read_token_file(path: str, what: str) -> str:
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} ({exc.strerror})", subject=path) from exc
    if not value:
        raise ConfigurationError(f"{what} is empty", subject=path)
    return value


@dataclass(frozen=True)
class TokenAuth:
    """An existing Vault token (an orchestrator's token, or a dev root token). Development only.

    A long-lived token in the environment is what stepguard exists to remove, so this warns.
    The token is never revoked by stepguard (it is not ours); child tokens made from it are.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     auth = TokenAuth("hvs.dev-only")
    >>> auth
    TokenAuth(accessor_hint=None)
    >>> "development" in str(caught[0].message)
    True
    """

    token: str = field(repr=False)
    accessor_hint: str | None = None

    def __post_init__(self) -> None:
        if not self.token:
            raise ConfigurationError("empty Vault token", subject="VAULT_TOKEN")
        warnings.warn("TokenAuth uses a pre-issued Vault token: for development only; use "
                      "AppRoleAuth, JwtAuth or KubernetesAuth in pipelines",
                      UserWarning, stacklevel=3)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TokenAuth:
        """``VAULT_TOKEN``, or the file named by ``VAULT_TOKEN_FILE``."""
        e = _env(env)
        token = (e.get("VAULT_TOKEN") or "").strip()  # a stray newline from `echo` or a file
        if not token and e.get("VAULT_TOKEN_FILE"):
            token = _read_token_file(e["VAULT_TOKEN_FILE"], "Vault token file")
        if not token:
            raise ConfigurationError("no Vault token", subject="VAULT_TOKEN")
        return cls(token)

    def login(self, api: VaultCaller) -> Login:
        body = api.with_token(self.token).request("GET", "auth/token/lookup-self",
                                                  what="token lookup")
        data = (body or {}).get("data") or {}
        return Login(token=self.token, accessor=str(data.get("accessor", "")),
                     ttl_s=int(data.get("ttl") or 0), renewable=bool(data.get("renewable")),
                     policies=tuple(data.get("policies") or ()), owned=False)


@dataclass(frozen=True)
class AppRoleAuth:
    """AppRole login with a role-id and a secret-id, or a response-wrapped secret-id.

    A wrapped secret-id (``wrapped_secret_id``: the wrapping token) is unwrapped once, on the
    first login; a second unwrap would fail, which is how interception is noticed.

    >>> AppRoleAuth(role_id="r-1", secret_id="s-1")
    AppRoleAuth(role_id='r-1', mount='approle')
    >>> AppRoleAuth(role_id="r-1")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    stepguard.errors.ConfigurationError: AppRole needs exactly one of secret_id or ...
    """

    role_id: str
    secret_id: str | None = field(default=None, repr=False)
    wrapped_secret_id: str | None = field(default=None, repr=False)
    mount: str = "approle"
    _unwrapped: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.role_id:
            raise ConfigurationError("AppRole needs a role_id", subject="vault.auth.approle")
        if bool(self.secret_id) == bool(self.wrapped_secret_id):
            raise ConfigurationError("AppRole needs exactly one of secret_id or wrapped_secret_id",
                                     subject="vault.auth.approle")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, role_id: str | None = None,
                 mount: str | None = None) -> AppRoleAuth:
        """``VAULT_ROLE_ID`` (else ``role_id``) with ``VAULT_SECRET_ID`` /
        ``VAULT_SECRET_ID_FILE`` / ``VAULT_WRAPPED_SECRET_ID``; ``mount``, else
        ``VAULT_APPROLE_MOUNT``, else ``approle``."""
        e = _env(env)
        secret = e.get("VAULT_SECRET_ID") or None
        if not secret and e.get("VAULT_SECRET_ID_FILE"):
            secret = _read_token_file(e["VAULT_SECRET_ID_FILE"], "AppRole secret-id file")
        return cls(role_id=e.get("VAULT_ROLE_ID") or role_id or "", secret_id=secret,
                   wrapped_secret_id=e.get("VAULT_WRAPPED_SECRET_ID") or None,
                   mount=mount or e.get("VAULT_APPROLE_MOUNT", "approle"))

    def _secret(self, api: VaultCaller) -> str:
        if self.secret_id:
            return self.secret_id
        assert self.wrapped_secret_id
        with self._lock:
            if "secret_id" not in self._unwrapped:
                try:
                    body = api.with_token(self.wrapped_secret_id).request(
                        "POST", "sys/wrapping/unwrap", what="AppRole secret-id unwrap",
                        retry=False)
                except CredentialError as exc:
                    raise CredentialDenied(
                        "the wrapped AppRole secret-id could not be unwrapped (already used or "
                        "expired): treat it as intercepted", subject="vault.auth.approle",
                        hint="issue a new wrapped secret-id and investigate who unwrapped it",
                    ) from exc
                data = (body or {}).get("data") or {}
                if not data.get("secret_id"):
                    raise CredentialDenied("wrapping token did not hold a secret-id",
                                           subject="vault.auth.approle")
                self._unwrapped["secret_id"] = str(data["secret_id"])
            return self._unwrapped["secret_id"]

    def login(self, api: VaultCaller) -> Login:
        return api.login(self.mount, {"role_id": self.role_id,
                                        "secret_id": self._secret(api)}, "AppRole login")


@dataclass(frozen=True)
class JwtAuth:
    """JWT/OIDC login (``auth/<mount>/login``) with a token read from a file or a variable.

    The file is read at every login, so a rotating projected service-account token works.

    >>> JwtAuth(role="stepguard-step", jwt_path="/run/tokens/vault")
    JwtAuth(role='stepguard-step', jwt_path='/run/tokens/vault', jwt_env=None, mount='jwt')
    """

    role: str
    jwt_path: str | None = None
    jwt_env: str | None = None
    mount: str = "jwt"

    def __post_init__(self) -> None:
        if not self.role:
            raise ConfigurationError("JWT auth needs a role", subject="vault.auth.jwt.role")
        if bool(self.jwt_path) == bool(self.jwt_env):
            raise ConfigurationError("JWT auth needs exactly one of jwt_path or jwt_env",
                                     subject="vault.auth.jwt")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, role: str | None = None,
                 jwt_path: str | None = None, mount: str | None = None) -> JwtAuth:
        """``VAULT_JWT_ROLE`` (else ``role``), ``VAULT_JWT_PATH`` (else ``jwt_path``) or
        ``VAULT_JWT_ENV`` (the variable holding the JWT); ``mount``, else ``VAULT_JWT_MOUNT``,
        else ``jwt``."""
        e = _env(env)
        jwt_env = e.get("VAULT_JWT_ENV") or None
        path = e.get("VAULT_JWT_PATH") or (None if jwt_env else jwt_path)
        return cls(role=e.get("VAULT_JWT_ROLE") or role or "", jwt_path=path, jwt_env=jwt_env,
                   mount=mount or e.get("VAULT_JWT_MOUNT", "jwt"))

    def _jwt(self) -> str:
        if self.jwt_path:
            return _read_token_file(self.jwt_path, "JWT file")
        assert self.jwt_env
        value = os.environ.get(self.jwt_env, "").strip()
        if not value:
            raise ConfigurationError("JWT variable is empty or unset", subject=self.jwt_env)
        return value

    def login(self, api: VaultCaller) -> Login:
        return api.login(self.mount, {"role": self.role, "jwt": self._jwt()}, "JWT login")


@dataclass(frozen=True)
class KubernetesAuth:
    """Kubernetes auth: the pod's service-account token, reviewed by Vault at the API server.

    >>> KubernetesAuth(role="train").jwt_path
    '/var/run/secrets/kubernetes.io/serviceaccount/token'
    """

    role: str
    jwt_path: str = K8S_TOKEN_PATH
    mount: str = "kubernetes"

    def __post_init__(self) -> None:
        if not self.role:
            raise ConfigurationError("Kubernetes auth needs a role",
                                     subject="vault.auth.kubernetes.role")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, role: str | None = None,
                 mount: str | None = None) -> KubernetesAuth:
        """``VAULT_K8S_ROLE`` (else ``role``), ``VAULT_K8S_TOKEN_PATH``; ``mount``, else
        ``VAULT_K8S_MOUNT``, else ``kubernetes``."""
        e = _env(env)
        return cls(role=e.get("VAULT_K8S_ROLE") or role or "",
                   jwt_path=e.get("VAULT_K8S_TOKEN_PATH", K8S_TOKEN_PATH),
                   mount=mount or e.get("VAULT_K8S_MOUNT", "kubernetes"))

    def login(self, api: VaultCaller) -> Login:
        jwt = _read_token_file(self.jwt_path, "service-account token")
        return api.login(self.mount, {"role": self.role, "jwt": jwt}, "Kubernetes login")


def auth_from_env(env: Mapping[str, str] | None = None) -> VaultAuth:
    """Pick the auth method from ``STEPGUARD_VAULT_AUTH`` (token, approle, jwt, kubernetes), or
    from which variables are set (AppRole, then JWT, then Kubernetes, then a token)."""
    e = _env(env)
    method = e.get("STEPGUARD_VAULT_AUTH", "").strip().lower()
    if not method:
        if e.get("VAULT_ROLE_ID"):
            method = "approle"
        elif e.get("VAULT_JWT_ROLE"):
            method = "jwt"
        elif e.get("VAULT_K8S_ROLE"):
            method = "kubernetes"
        elif e.get("VAULT_TOKEN") or e.get("VAULT_TOKEN_FILE"):
            method = "token"
        else:
            raise ConfigurationError("no Vault auth method configured",
                                     subject="STEPGUARD_VAULT_AUTH",
                                     hint="set VAULT_ROLE_ID/VAULT_SECRET_ID, VAULT_JWT_ROLE, "
                                          "VAULT_K8S_ROLE or (development only) VAULT_TOKEN")
    factories: dict[str, Any] = {"token": TokenAuth, "approle": AppRoleAuth, "jwt": JwtAuth,
                                 "kubernetes": KubernetesAuth}
    if method not in factories:
        raise ConfigurationError(f"unknown Vault auth method {method!r}",
                                 subject="STEPGUARD_VAULT_AUTH")
    auth: VaultAuth = factories[method].from_env(e)
    return auth


def _float(e: Mapping[str, str], key: str, default: float) -> float:
    raw = e.get(key)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigurationError("not a number", subject=key) from exc


@dataclass(frozen=True)
class VaultConfig:
    """Where Vault is, how to log in, and the limits every call runs under.

    ``timeout_s`` bounds each HTTP call; transient failures are retried at most
    ``retry_attempts`` times (<= 4) within ``retry_total_s`` (<= 30 s). ``token_heartbeat_s`` is
    the TTL a step token gets between renewals, so a killed process leaves nothing usable for
    longer than that; the token can never outlive the step's ``ttl_s`` (explicit max TTL).

    >>> cfg = VaultConfig(addr="http://127.0.0.1:8200", auth=None)
    >>> cfg.timeout_s, cfg.retry_attempts, cfg.retry_total_s
    (5.0, 4, 30.0)
    >>> VaultConfig(addr="http://127.0.0.1:8200", auth=None, retry_attempts=10)
    Traceback (most recent call last):
    ...
    stepguard.errors.ConfigurationError: must be between 1 and 4: vault.retry_attempts
    """

    addr: str
    auth: VaultAuth | None
    namespace: str | None = None
    ca_cert: str | None = None
    timeout_s: float = 5.0
    retry_attempts: int = 4
    retry_total_s: float = 30.0
    retry_backoff_s: float = 0.25
    #: Step-token TTL between renewals (the step's ``ttl_s`` caps it as explicit max TTL).
    token_heartbeat_s: float = 300.0
    #: Create a child token per step. False: the (owned) login token is the step token, for
    #: in-pod JWT/Kubernetes logins whose role may not create tokens.
    child_token: bool = True
    #: Optional token role for child tokens (``auth/token/create/<role>``).
    token_role: str | None = None
    #: Policies of a step that declares none.
    default_policies: tuple[str, ...] = ("stepguard-step",)
    #: Identity (OIDC) token role exchanged at STS for ``aws_web_identity``.
    oidc_role: str = "stepguard-step"
    #: STS endpoint (None: AWS's own); IAM propagation checks and web identity use it.
    sts_endpoint: str | None = None
    aws_region: str = "us-east-1"
    #: Bound on waiting for new IAM-user keys to become usable.
    iam_propagation_timeout_s: float = 15.0
    #: TTL of a response-wrapped delivery token.
    wrap_ttl_s: float = 60.0
    unsafe_skip_tls_verify: bool = False

    def __post_init__(self) -> None:
        if not self.addr.startswith(("http://", "https://")):
            raise ConfigurationError("Vault address must start with http:// or https://",
                                     subject="vault.addr")
        if not 1 <= self.retry_attempts <= 4:
            raise ConfigurationError("must be between 1 and 4", subject="vault.retry_attempts")
        if not 0 < self.retry_total_s <= 30:
            raise ConfigurationError("must be in (0, 30]", subject="vault.retry_total_s")
        if not 0 < self.timeout_s <= 30:
            raise ConfigurationError("must be in (0, 30]", subject="vault.timeout_s")
        if self.token_heartbeat_s < 2:
            raise ConfigurationError("must be at least 2 s", subject="vault.token_heartbeat_s")
        if not 1 <= self.wrap_ttl_s <= 3600:
            raise ConfigurationError("must be between 1 s and 1 h", subject="vault.wrap_ttl_s")
        if self.unsafe_skip_tls_verify:
            warnings.warn("TLS verification of Vault is disabled (unsafe_skip_tls_verify)",
                          UserWarning, stacklevel=3)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *,
                 require_auth: bool = True) -> VaultConfig:
        """``VAULT_ADDR``, ``VAULT_NAMESPACE``, ``VAULT_CACERT``, ``STEPGUARD_VAULT_TIMEOUT_S``,
        ``STEPGUARD_VAULT_HEARTBEAT_S``, ``STEPGUARD_STS_ENDPOINT``, ``AWS_REGION`` and the auth
        variables of :func:`auth_from_env`.

        >>> cfg = VaultConfig.from_env({"VAULT_ADDR": "http://127.0.0.1:8200",
        ...                             "VAULT_ROLE_ID": "r", "VAULT_SECRET_ID": "s"})
        >>> cfg.auth
        AppRoleAuth(role_id='r', mount='approle')
        """
        e = _env(env)
        addr = e.get("VAULT_ADDR", "")
        if not addr:
            raise ConfigurationError("VAULT_ADDR is not set", subject="VAULT_ADDR")
        auth: VaultAuth | None
        try:
            auth = auth_from_env(e)
        except ConfigurationError:
            if require_auth:
                raise
            auth = None
        return cls(
            addr=addr,
            auth=auth,
            namespace=e.get("VAULT_NAMESPACE") or None,
            ca_cert=e.get("VAULT_CACERT") or None,
            timeout_s=_float(e, "STEPGUARD_VAULT_TIMEOUT_S", 5.0),
            token_heartbeat_s=_float(e, "STEPGUARD_VAULT_HEARTBEAT_S", 300.0),
            sts_endpoint=e.get("STEPGUARD_STS_ENDPOINT") or None,
            aws_region=e.get("AWS_REGION") or e.get("AWS_DEFAULT_REGION") or "us-east-1",
        )
