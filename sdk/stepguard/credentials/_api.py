"""A thin Vault HTTP client: a timeout on every call, bounded jittered retries, typed errors.

Every call gets ``timeout_s`` (never more than what is left of the retry budget), transient
failures (connection errors, timeouts, 429, 502, 503) are retried with jittered exponential
backoff within ``retry_attempts`` and ``retry_total_s``, and 401/403 raise
:class:`~stepguard.errors.CredentialDenied` at once. No request body, response body or token is
ever logged. The HTTP itself is :mod:`stepguard.credentials._transport` (keep-alive, one pool per
session).
"""

from __future__ import annotations

import json as _json
import logging
import ssl
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from stepguard.errors import CredentialDenied, CredentialError, TransientCredentialError

if TYPE_CHECKING:
    from stepguard.credentials._config import VaultConfig
    from stepguard.credentials._transport import Pool

log = logging.getLogger("stepguard.credentials")

_TRANSIENT_STATUS = frozenset({429, 502, 503})
#: Left as they are in request paths (what is legal in a URL path and query); the rest is
#: percent-encoded, as a browser or requests would.
_PATH_SAFE = "/?=&%:@-._~!$'()*+,;"
_REASONS = {400: "bad request", 404: "not found", 405: "unsupported operation",
            412: "precondition failed", 500: "internal error"}


class _Transient(Exception):
    """Internal marker: a failure tenacity may retry."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _vault_errors(body: bytes) -> tuple[str, ...]:
    """Vault's ``{"errors": [...]}`` as short strings (they name paths and reasons, no values)."""
    try:
        errors = _json.loads(body).get("errors") if body else None
    except (ValueError, AttributeError):
        return ()
    if isinstance(errors, list):
        return tuple(str(e)[:300] for e in errors)
    return ()


def vault_status(exc: BaseException) -> int | None:
    """The HTTP status Vault answered with, for a :class:`CredentialError` from a request."""
    status = getattr(exc, "_vault_status", None)
    return status if isinstance(status, int) else None


class VaultApi:
    """One Vault client bound to one token (or none), sharing a connection pool with its clones."""

    def __init__(self, config: VaultConfig, token: str | None = None,
                 _pool: Pool | None = None) -> None:
        from stepguard.credentials._transport import Pool

        self.config = config
        self._pool = _pool if _pool is not None else Pool(config)
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "X-Vault-Request": "true"}
        if token:
            headers["X-Vault-Token"] = token
        if config.namespace:
            headers["X-Vault-Namespace"] = config.namespace
        self._headers = headers

    def with_token(self, token: str | None) -> VaultApi:
        """A client for another token, reusing this one's connections."""
        return VaultApi(self.config, token, _pool=self._pool)

    def close(self) -> None:
        self._pool.close()

    # -- the one place HTTP happens --------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        what: str,
        json: dict[str, Any] | None = None,
        wrap_ttl_s: int | None = None,
        retry: bool = True,
    ) -> dict[str, Any] | None:
        """Call ``/v1/<path>``; returns the JSON body, or None for 204. Raises CredentialError."""
        from tenacity import (
            RetryCallState,
            Retrying,
            retry_if_exception_type,
            stop_after_attempt,
            stop_after_delay,
            wait_random_exponential,
        )

        cfg = self.config
        started = time.monotonic()
        attempts = cfg.retry_attempts if retry else 1

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            reason = exc.reason if isinstance(exc, _Transient) else type(exc).__name__
            log.warning("Vault %s failed (%s); retry %d of %d", what, reason,
                        state.attempt_number, attempts - 1)

        def once() -> dict[str, Any] | None:
            remaining = cfg.retry_total_s - (time.monotonic() - started)
            timeout = max(0.05, min(cfg.timeout_s, remaining))
            return self._once(method, path, what=what, json=json, wrap_ttl_s=wrap_ttl_s,
                              timeout=timeout)

        retrying = Retrying(
            stop=stop_after_attempt(attempts) | stop_after_delay(cfg.retry_total_s),
            wait=wait_random_exponential(multiplier=cfg.retry_backoff_s, max=4.0),
            retry=retry_if_exception_type(_Transient),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            result: dict[str, Any] | None = retrying(once)
        except _Transient as exc:
            elapsed = time.monotonic() - started
            raise TransientCredentialError(
                f"Vault unreachable or overloaded during {what}",
                subject=cfg.addr,
                details=(f"last failure: {exc.reason}",
                         f"gave up after {retrying.statistics.get('attempt_number', 1)} "
                         f"attempt(s) in {elapsed:.1f} s"),
                hint="check that Vault is running and reachable from this process",
            ) from exc.__cause__
        return result

    def _once(self, method: str, path: str, *, what: str, json: dict[str, Any] | None,
              wrap_ttl_s: int | None, timeout: float) -> dict[str, Any] | None:
        import http.client

        headers = self._headers
        if wrap_ttl_s:
            headers = {**headers, "X-Vault-Wrap-TTL": f"{int(wrap_ttl_s)}s"}
        payload = _json.dumps(json).encode() if json is not None else None
        target = "/v1/" + quote(path, safe=_PATH_SAFE)
        try:
            response = self._pool.request(method, target, headers=headers, body=payload,
                                          timeout=timeout)
        except ssl.SSLError as exc:  # before ValueError: certificate errors are ValueErrors too
            # Not transient: a certificate that does not verify may be an interception.
            raise CredentialError(
                "TLS verification of Vault failed", subject=self.config.addr,
                details=(type(exc).__name__,),
                hint="set the Vault CA (VAULT_CACERT / VaultConfig.ca_cert)") from exc
        except ValueError:
            # http.client refuses header values with line breaks or characters outside
            # Latin-1, and its message quotes the value (a token): never chain it.
            raise CredentialError(
                f"invalid header value in the Vault request for {what}", subject=path,
                hint="a Vault token or namespace with a line break or stray characters?",
            ) from None
        except http.client.InvalidURL:
            raise CredentialError(f"invalid Vault request path for {what}",
                                  subject=path) from None
        except TimeoutError as exc:
            raise _Transient(f"timed out after {timeout:.1f} s") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise _Transient(f"connection failed ({type(exc).__name__})") from exc
        status = response.status
        if status in _TRANSIENT_STATUS:
            raise _Transient(f"HTTP {status}")
        if status in (401, 403):
            raise CredentialDenied(
                f"Vault refused {what} (HTTP {status})", subject=path,
                details=_vault_errors(response.body),
                hint="check the token's policies, the auth role and that the token is alive",
            )
        if 200 <= status < 300:
            if status == 204 or not response.body:
                return None
            try:
                body = _json.loads(response.body)
            except ValueError:
                return None
            return body if isinstance(body, dict) else None
        reason = _REASONS.get(status, "unexpected answer")
        err = CredentialError(f"Vault failed {what} (HTTP {status} {reason})", subject=path,
                              details=_vault_errors(response.body))
        err._vault_status = status  # type: ignore[attr-defined]
        raise err
