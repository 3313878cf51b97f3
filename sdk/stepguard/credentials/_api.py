"""A thin Vault HTTP client: hvac underneath, a timeout on every call, bounded jittered retries.

hvac sends each request once with a 30 s timeout. Here every call gets ``timeout_s`` (never more
than what is left of the retry budget), transient failures (connection errors, timeouts, 429,
502, 503) are retried with jittered exponential backoff within ``retry_attempts`` and
``retry_total_s``, and 401/403 raise :class:`~stepguard.errors.CredentialDenied` at once.
No request body, response body or token is ever logged.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from stepguard.errors import CredentialDenied, CredentialError, TransientCredentialError

if TYPE_CHECKING:
    from stepguard.credentials._config import VaultConfig

log = logging.getLogger("stepguard.credentials")

_TRANSIENT_STATUS = frozenset({429, 502, 503})


class _Transient(Exception):
    """Internal marker: a failure tenacity may retry."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _vault_errors(exc: BaseException) -> tuple[str, ...]:
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list | tuple):
        return tuple(str(e)[:300] for e in errors)
    return ()


class VaultApi:
    """One Vault client bound to one token (or none), sharing a connection pool with its clones."""

    def __init__(self, config: VaultConfig, token: str | None = None,
                 _session: Any = None) -> None:
        import hvac
        import requests

        self.config = config
        self._session = _session if _session is not None else requests.Session()
        verify: bool | str = config.ca_cert if config.ca_cert else True
        if config.unsafe_skip_tls_verify:
            verify = False
        # hvac prefers a given session's own ``verify`` over its argument: set it there.
        self._session.verify = verify
        self._client = hvac.Client(
            url=config.addr,
            token=token,
            namespace=config.namespace,
            verify=verify,
            timeout=config.timeout_s,
            session=self._session,
        )

    def with_token(self, token: str | None) -> VaultApi:
        """A client for another token, reusing this one's connections."""
        return VaultApi(self.config, token, _session=self._session)

    def close(self) -> None:
        self._session.close()

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
        import hvac.exceptions
        import requests

        kwargs: dict[str, Any] = {"timeout": timeout}
        if json is not None:
            kwargs["json"] = json
        if wrap_ttl_s:
            kwargs["wrap_ttl"] = f"{int(wrap_ttl_s)}s"
        try:
            response = self._client.adapter.request(method, f"/v1/{path}", **kwargs)
        except requests.exceptions.SSLError as exc:
            # Not transient: a certificate that does not verify may be an interception.
            raise CredentialError(
                "TLS verification of Vault failed", subject=self.config.addr,
                hint="set the Vault CA (VAULT_CACERT / VaultConfig.ca_cert)") from exc
        except requests.exceptions.Timeout as exc:
            raise _Transient(f"timed out after {timeout:.1f} s") from exc
        except requests.exceptions.ConnectionError as exc:
            raise _Transient("connection failed") from exc
        except (hvac.exceptions.Unauthorized, hvac.exceptions.Forbidden) as exc:
            status = 401 if isinstance(exc, hvac.exceptions.Unauthorized) else 403
            raise CredentialDenied(
                f"Vault refused {what} (HTTP {status})", subject=path,
                details=_vault_errors(exc),
                hint="check the token's policies, the auth role and that the token is alive",
            ) from exc
        except (hvac.exceptions.RateLimitExceeded, hvac.exceptions.BadGateway,
                hvac.exceptions.VaultDown) as exc:
            status = {hvac.exceptions.RateLimitExceeded: 429, hvac.exceptions.BadGateway: 502,
                      hvac.exceptions.VaultDown: 503}[type(exc)]
            raise _Transient(f"HTTP {status}") from exc
        except hvac.exceptions.VaultError as exc:
            raise CredentialError(f"Vault failed {what} ({type(exc).__name__})", subject=path,
                                  details=_vault_errors(exc)) from exc
        if isinstance(response, dict):
            return response
        status = getattr(response, "status_code", 0)
        if status in _TRANSIENT_STATUS:
            raise _Transient(f"HTTP {status}")
        if status == 204:
            return None
        if 200 <= status < 300:
            try:
                body = response.json()
            except ValueError:
                return None
            return body if isinstance(body, dict) else None
        raise CredentialError(f"Vault failed {what} (HTTP {status})", subject=path)
