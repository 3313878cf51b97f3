"""Handing credentials to a pod or KFP container as a response-wrapped, single-use token."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stepguard.credentials._secret import SecretStr, guard, hashed_id
from stepguard.credentials._set import CredentialSet
from stepguard.errors import ConfigurationError, CredentialDenied, CredentialError

if TYPE_CHECKING:
    from stepguard.credentials._config import VaultConfig
    from stepguard.credentials._session import CredentialSession

log = logging.getLogger("stepguard.credentials")

#: Environment variable the step runner reads the wrapping token from.
WRAPPED_ENV = "STEPGUARD_WRAPPED_CREDENTIALS"
_FORMAT = "stepguard.credentials/v1"
_CREATION_PATH = "sys/wrapping/wrap"


@dataclass(frozen=True)
class WrappedDelivery:
    """A single-use wrapping token standing for a step's credentials.

    Only the token travels (pod env, KFP parameter); it is worthless once unwrapped or after
    ``ttl_s``. ``accessor_hash`` lets the audit trail match wrap and unwrap.
    """

    token: SecretStr = field(repr=False)
    accessor_hash: str
    ttl_s: int
    creation_time: str

    def env(self) -> dict[str, str]:
        """``{STEPGUARD_WRAPPED_CREDENTIALS: token}`` for the pod or container."""
        return {WRAPPED_ENV: self.token.get_secret_value()}


def wrap_for_delivery(session: CredentialSession, *, ttl_s: float | None = None) -> WrappedDelivery:
    """Wrap the session's credentials in a single-use token (TTL ``ttl_s``, default
    ``settings.wrap_ttl_s``) for a runner in another process, pod or container.

    The leases stay owned by the session: keep it open while the consumer runs, and its exit
    revokes them. Unwrapping happens with :func:`unwrap_delivery`.
    """
    ttl = int(ttl_s if ttl_s is not None else session.config.wrap_ttl_s)
    if not 1 <= ttl <= 3600:
        raise ConfigurationError("wrap TTL must be between 1 s and 1 h", subject="wrap_ttl_s")
    payload: dict[str, Any] = {
        "format": _FORMAT,
        "pipeline": session.context.pipeline, "run_id": session.context.run_id,
        "step": session.context.step,
        "credentials": session._credentials._export(),
    }
    body = session.step_api().request("POST", _CREATION_PATH, what="credential wrapping",
                                      json=payload, wrap_ttl_s=ttl, retry=False)
    info = (body or {}).get("wrap_info") or {}
    if not info.get("token"):
        raise CredentialError("Vault returned no wrapping token", subject=_CREATION_PATH)
    guard(str(info["token"]))
    return WrappedDelivery(token=SecretStr(str(info["token"])),
                           accessor_hash=hashed_id(str(info.get("accessor", ""))),
                           ttl_s=int(info.get("ttl") or ttl),
                           creation_time=str(info.get("creation_time", "")))


class DeliveredCredentials(CredentialSet):
    """Credentials unwrapped inside the step runner: ``values``, ``env()``, ``write_files()``.

    Their leases belong to the orchestrator's session, which revokes them.
    """

    def close(self) -> None:
        """Remove the files written by :meth:`write_files`."""
        self._remove_files()

    def __enter__(self) -> DeliveredCredentials:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _refused(reason: str, token_hash: str) -> CredentialDenied:
    log.error("wrapped credential delivery refused (%s); wrapping token %s", reason, token_hash)
    try:
        from opentelemetry import trace

        trace.get_current_span().add_event(
            "stepguard.credentials.unwrap_refused",
            {"stepguard.credentials.reason": reason,
             "stepguard.credentials.wrap_token_hash": token_hash})
    except Exception:  # auditing must not mask the refusal itself
        log.debug("could not record the unwrap refusal on the current span")
    return CredentialDenied(
        f"wrapped credentials refused: {reason}", subject=f"wrapping token {token_hash}",
        hint="a wrapping token works once: if this runner did not use it, someone else did -- "
             "treat the step's credentials as intercepted")


def unwrap_delivery(token: str | SecretStr, *, settings: VaultConfig | None = None
                    ) -> DeliveredCredentials:
    """Unwrap credentials handed over by :func:`wrap_for_delivery` (once).

    The token is first looked up to check it was made by ``sys/wrapping/wrap`` (a substituted
    token wrapping something else is refused); a token that is unknown, expired or already
    unwrapped raises :class:`~stepguard.errors.CredentialDenied` and records an
    ``unwrap_refused`` event on the current span.
    """
    from stepguard.credentials._api import VaultApi, vault_status
    from stepguard.credentials._config import VaultConfig

    cfg = settings if settings is not None else VaultConfig.from_env(require_auth=False)
    raw = token.get_secret_value() if isinstance(token, SecretStr) else token
    if not raw:
        raise ConfigurationError("empty wrapping token", subject=WRAPPED_ENV)
    guard(raw)
    token_hash = hashed_id(raw)
    api = VaultApi(cfg)
    try:
        try:
            looked = api.with_token(None).request("POST", "sys/wrapping/lookup",
                                                  what="wrapping token lookup",
                                                  json={"token": raw})
        except CredentialError as exc:
            if isinstance(exc, CredentialDenied) or vault_status(exc) == 400:
                raise _refused("token unknown, expired or already used", token_hash) from exc
            raise
        creation_path = str(((looked or {}).get("data") or {}).get("creation_path", ""))
        if creation_path != _CREATION_PATH:
            raise _refused(f"token was created by {creation_path or 'an unknown path'}",
                           token_hash)
        try:
            body = api.with_token(raw).request("POST", "sys/wrapping/unwrap",
                                               what="credential unwrap", retry=False)
        except CredentialError as exc:
            if isinstance(exc, CredentialDenied) or vault_status(exc) == 400:
                raise _refused("token already used", token_hash) from exc
            raise
    finally:
        api.close()
    data = (body or {}).get("data") or {}
    if data.get("format") != _FORMAT:
        raise _refused("unexpected payload format", token_hash)
    out = DeliveredCredentials()
    for entry in data.get("credentials") or []:
        out._add(str(entry["name"]), str(entry["kind"]), str(entry.get("delivery", "env")),
                 str(entry.get("prefix", "")),
                 {str(k): str(v) for k, v in (entry.get("values") or {}).items()})
    return out
