"""The one Vault client: every Vault call stepguard makes goes through :class:`VaultClient`.

The credential session, response wrapping, Transit signing and verification, the CLI and the
``config check`` probe all use it, so there is one TLS/CA/namespace/timeout/retry policy (from
:class:`~stepguard.credentials.VaultConfig`):

* every call gets ``timeout_s`` (never more than what is left of the retry budget);
* transient failures (connection errors, timeouts, 429, 502, 503) are retried with jittered
  exponential backoff (tenacity) within ``retry_attempts`` and ``retry_total_s``;
* 401/403 raise :class:`~stepguard.errors.CredentialDenied` at once (never retried);
* a standby node's ``307``/``308`` redirect is followed to the active node (Vault HA without
  request forwarding), at most :data:`MAX_REDIRECTS` hops, never from https down to http;
* no request body, response body or token is ever logged.

Two ways to talk, one client:

* :meth:`VaultClient.request` -- the five calls on a secured step's critical path (login, child
  token, issue, revoke) go through :mod:`stepguard.credentials._transport`, a keep-alive
  :mod:`http.client` pool. ``benchmarks/bench_credentials.py`` measures it next to the same calls
  through hvac in the same run (docs/performance.md): hvac's requests stack costs more per call
  than the server's own work, which the <= 20 ms p95 credential budget cannot carry.
* :meth:`VaultClient.hvac` -- the hvac client for every other API surface (Transit), built here
  and nowhere else, with the same address, token, namespace, CA, timeout and a bounded retry on
  429/502/503. :meth:`VaultClient.call` runs one hvac call and maps its errors onto the
  stepguard tree.

>>> from stepguard.credentials import VaultClient, VaultConfig
>>> client = VaultClient(VaultConfig(addr="http://127.0.0.1:8200", auth=None))
>>> client
VaultClient('http://127.0.0.1:8200', token=False)
>>> client.close()
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
    from collections.abc import Callable

    from stepguard.credentials._config import Login, VaultConfig
    from stepguard.credentials._transport import Pool, Response

log = logging.getLogger("stepguard.credentials")

_TRANSIENT_STATUS = frozenset({429, 502, 503})
_REDIRECT_STATUS = frozenset({307, 308})
#: Redirect hops followed per request (a standby points at the active node: one hop).
MAX_REDIRECTS = 3
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


class _Redirect(Exception):
    """Internal marker: a redirect that is not followed (downgrade, loop, no Location)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _suppress() -> Any:
    import contextlib

    return contextlib.suppress(Exception)


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


class _Pools:
    """The keep-alive pools of one client and its clones: the configured address, and the
    active node a standby redirected to."""

    def __init__(self, config: VaultConfig) -> None:
        from stepguard.credentials._transport import Pool

        self.config = config
        self.home = Pool(config)
        self._by_origin: dict[str, Pool] = {self.home.origin: self.home}

    def for_origin(self, origin: str) -> Pool:
        import dataclasses

        from stepguard.credentials._transport import Pool

        pool = self._by_origin.get(origin)
        if pool is None:
            pool = Pool(dataclasses.replace(self.config, addr=origin))
            self._by_origin[origin] = pool
        return pool

    def close(self) -> None:
        for pool in self._by_origin.values():
            pool.close()


class VaultClient:
    """One Vault client bound to one token (or none), sharing connections with its clones."""

    def __init__(self, config: VaultConfig, token: str | None = None,
                 _pools: _Pools | None = None) -> None:
        self.config = config
        self._pools = _pools if _pools is not None else _Pools(config)
        self._token = token
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "X-Vault-Request": "true"}
        if token:
            headers["X-Vault-Token"] = token
        if config.namespace:
            headers["X-Vault-Namespace"] = config.namespace
        self._headers = headers
        self._hvac: Any = None

    def __repr__(self) -> str:
        return f"VaultClient({self.config.addr!r}, token={self._token is not None})"

    @property
    def _pool(self) -> Pool:
        return self._pools.home

    def with_token(self, token: str | None) -> VaultClient:
        """A client for another token, reusing this one's connections."""
        return VaultClient(self.config, token, _pools=self._pools)

    def close(self) -> None:
        """Close the connections of this client and its clones."""
        if self._hvac is not None:
            with _suppress():
                self._hvac.adapter.close()
        self._pools.close()

    def login(self, mount: str, payload: dict[str, Any], what: str) -> Login:
        """``auth/<mount>/login`` with ``payload``; bad login material (Vault's 400) is a
        :class:`~stepguard.errors.CredentialDenied`, not a fault to retry."""
        from stepguard.credentials._config import login_result

        path = f"auth/{mount}/login"
        try:
            body = self.with_token(None).request("POST", path, what=what, json=payload)
        except CredentialError as exc:
            # Vault answers bad login material with 400 ("invalid role or secret ID", "error
            # validating token"): for the caller that is a refusal, not a fault to retry.
            if type(exc) is CredentialError and vault_status(exc) == 400:
                raise CredentialDenied(f"Vault refused {what}", subject=path,
                                       details=exc.details,
                                       hint="check the role and the login material") from exc
            raise
        return login_result(body, path)

    def health(self) -> dict[str, Any]:
        """Vault's unauthenticated ``sys/health`` (standbys count as reachable): one clear
        :class:`~stepguard.errors.TransientCredentialError` when Vault cannot answer."""
        try:
            response = self._send("GET", "/v1/sys/health?standbyok=true&perfstandbyok=true",
                                  headers={"Accept": "application/json"},
                                  payload=None, timeout=self.config.timeout_s)
        except (OSError, ValueError) as exc:
            raise TransientCredentialError(
                f"cannot reach Vault at {self.config.addr} ({type(exc).__name__})",
                subject="vault.addr") from exc
        except Exception as exc:  # http.client.HTTPException
            raise TransientCredentialError(
                f"cannot reach Vault at {self.config.addr} ({type(exc).__name__})",
                subject="vault.addr") from exc
        if response.status in (429, 472, 473):  # standby / performance standby: reachable
            return {"code": response.status}
        if response.status != 200:
            raise TransientCredentialError(
                f"Vault at {self.config.addr} answered HTTP {response.status} "
                "(sealed or not initialised?)", subject="vault.addr")
        try:
            body = _json.loads(response.body or b"{}")
        except ValueError:
            body = {}
        return body if isinstance(body, dict) else {}

    # -- hvac, for the API surface beyond the critical path --------------------------------------

    def hvac(self) -> Any:
        """The ``hvac.Client`` for this client's token: the only place one is constructed.

        Same address, token, namespace, CA (or ``unsafe_skip_tls_verify``) and timeout as
        :meth:`request`; 429/502/503 and connection failures are retried a bounded number of
        times with backoff (``retry_attempts``, ``retry_backoff_s``); redirects from a standby
        are followed by requests.
        """
        if self._hvac is None:
            import hvac
            import requests
            from requests.adapters import HTTPAdapter
            from urllib3.util.retry import Retry

            cfg = self.config
            session = requests.Session()
            retry = Retry(total=cfg.retry_attempts - 1, connect=cfg.retry_attempts - 1,
                          read=0, status=cfg.retry_attempts - 1,
                          backoff_factor=cfg.retry_backoff_s, backoff_jitter=cfg.retry_backoff_s,
                          status_forcelist=sorted(_TRANSIENT_STATUS), allowed_methods=None,
                          raise_on_status=False, respect_retry_after_header=True)
            for prefix in ("http://", "https://"):
                session.mount(prefix, HTTPAdapter(max_retries=retry))
            verify: bool | str = (False if cfg.unsafe_skip_tls_verify
                                  else (cfg.ca_cert or True))
            self._hvac = hvac.Client(url=cfg.addr, token=self._token, namespace=cfg.namespace,
                                     verify=verify, timeout=cfg.timeout_s, session=session)
        return self._hvac

    def call(self, what: str, fn: Callable[[Any], Any], *, subject: str) -> Any:
        """Run ``fn(self.hvac())`` and map hvac's and requests' errors onto the stepguard tree:
        refusals are :class:`~stepguard.errors.CredentialDenied`, a missing path a
        :class:`~stepguard.errors.ConfigurationError`, an unreachable or overloaded Vault a
        :class:`~stepguard.errors.TransientCredentialError`."""
        import hvac.exceptions as hx
        import requests

        from stepguard.errors import ConfigurationError, OperationalError

        try:
            return fn(self.hvac())
        except (hx.Forbidden, hx.Unauthorized) as exc:
            raise CredentialDenied(f"Vault refused {what}", subject=subject) from exc
        except hx.InvalidPath as exc:
            raise ConfigurationError(f"Vault has no such path ({what})",
                                     subject=subject) from exc
        except (hx.VaultDown, hx.InternalServerError, hx.BadGateway, hx.RateLimitExceeded,
                requests.ConnectionError, requests.Timeout) as exc:
            raise TransientCredentialError(f"Vault unreachable during {what}",
                                           subject=subject) from exc
        except (hx.VaultError, requests.RequestException) as exc:
            raise OperationalError(f"Vault failed during {what}: {type(exc).__name__}",
                                   subject=subject) from exc

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

    def _send(self, method: str, target: str, *, headers: dict[str, str],
              payload: bytes | None, timeout: float) -> Response:
        """One request, following a standby's redirect to the active node."""
        from urllib.parse import urlsplit

        pool = self._pool
        for _hop in range(MAX_REDIRECTS + 1):
            response = pool.request(method, target, headers=headers, body=payload,
                                    timeout=timeout)
            if response.status not in _REDIRECT_STATUS:
                return response
            if not response.location:
                raise _Redirect(f"HTTP {response.status} without a Location")
            loc = urlsplit(response.location)
            if loc.scheme not in ("http", "https") or not loc.hostname:
                raise _Redirect("redirect to a location that is not an http(s) URL")
            if pool.https and loc.scheme != "https":
                raise _Redirect("redirect from https to plain http")
            port = loc.port or (443 if loc.scheme == "https" else 80)
            pool = self._pools.for_origin(f"{loc.scheme}://{loc.hostname}:{port}")
            # The Location names the whole path on the active node, /v1/... included.
            target = (loc.path or "/") + (f"?{loc.query}" if loc.query else "")
        raise _Redirect(f"more than {MAX_REDIRECTS} redirects")

    def _once(self, method: str, path: str, *, what: str, json: dict[str, Any] | None,
              wrap_ttl_s: int | None, timeout: float) -> dict[str, Any] | None:
        import http.client

        headers = self._headers
        if wrap_ttl_s:
            headers = {**headers, "X-Vault-Wrap-TTL": f"{int(wrap_ttl_s)}s"}
        payload = _json.dumps(json).encode() if json is not None else None
        target = "/v1/" + quote(path, safe=_PATH_SAFE)
        try:
            response = self._send(method, target, headers=headers, payload=payload,
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
        except _Redirect as exc:
            raise CredentialError(f"Vault redirect refused during {what}", subject=path,
                                  details=(exc.reason,)) from None
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


#: The name this client had before it served every Vault caller; kept for internal callers.
VaultApi = VaultClient
