"""The HTTP underneath :class:`~stepguard.credentials._api.VaultApi`: keep-alive connections to
one Vault address, shared by the clients of one session and safe to use from several threads.

A secured step makes five Vault calls on its critical path, each a few hundred microseconds of
server time on a local Vault; a general-purpose client stack (requests + hvac's adapter) costs
more than that per call in Python alone, so the calls go through :mod:`http.client` directly.
What that stack would otherwise have done for us is done here once per pool, not per call:
proxy resolution from the environment (``HTTPS_PROXY``/``HTTP_PROXY`` with an http:// proxy,
tunnelled with CONNECT for https; ``NO_PROXY`` with names, domain suffixes, addresses, CIDR
ranges and ports) and the TLS context (``VaultConfig.ca_cert``, else the system store).
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import select
import ssl
import threading
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from stepguard.credentials._config import VaultConfig

#: Idle connections kept per pool (the renewal thread and the step's own calls at most overlap).
_MAX_IDLE = 4


@dataclass(frozen=True)
class Response:
    """Status and body of one answered request."""

    status: int
    body: bytes
    #: The ``Location`` header of a redirect (a Vault standby names the active node there).
    location: str | None = None


def _tls_context(config: VaultConfig) -> ssl.SSLContext:
    if config.unsafe_skip_tls_verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=config.ca_cert or None)


def no_proxy_matches(host: str, port: int, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` exempts ``host:port``: ``*``, host names and domain suffixes
    (``example.com``/``.example.com``), IP addresses, CIDR ranges, each optionally with
    ``:port`` (IPv6 in brackets).

    >>> no_proxy_matches("vault.internal", 8200, "localhost, .internal")
    True
    >>> no_proxy_matches("10.1.2.3", 8200, "10.0.0.0/8")
    True
    >>> no_proxy_matches("vault.internal", 8200, "vault.internal:443")
    False
    >>> no_proxy_matches("vault.example.com", 8200, "ample.com")
    False
    """
    host = host.lower().strip("[]")
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for raw in no_proxy.replace(" ", ",").split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        name, want_port = entry, None
        if entry.startswith("["):  # [v6] or [v6]:port
            name, _, rest = entry[1:].partition("]")
            want_port = rest[1:] if rest.startswith(":") else None
        elif entry.count(":") == 1:  # name:port or v4:port
            name, _, want_port = entry.partition(":")
        if want_port is not None and want_port != str(port):
            continue
        if "/" in name:
            if ip is not None:
                try:
                    if ip in ipaddress.ip_network(name, strict=False):
                        return True
                except ValueError:
                    pass
            continue
        if ip is not None:
            try:
                if ip == ipaddress.ip_address(name):
                    return True
            except ValueError:
                pass
            continue
        name = name.lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """True when an idle keep-alive connection was closed by the server (or sent garbage)."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class Pool:
    """Keep-alive connections to ``config.addr``; one request at a time per connection.

    Errors surface as the standard library raises them (``OSError`` and its ``TimeoutError``,
    ``ssl.SSLError``, ``http.client.HTTPException``); :class:`VaultApi` maps them.
    """

    def __init__(self, config: VaultConfig) -> None:
        url = urlsplit(config.addr)
        self.https = url.scheme == "https"
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (443 if self.https else 80)
        self.prefix = url.path.rstrip("/")
        self._tls = _tls_context(config) if self.https else None
        self._proxy = self._resolve_proxy(url.scheme)
        # A plain-http proxy sees each request and wants its credentials on every one; an
        # https tunnel sends them once, with CONNECT.
        self._per_request: dict[str, str] = (
            self._proxy[2] if self._proxy is not None and not self.https else {})
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def _resolve_proxy(self, scheme: str) -> tuple[str, int, dict[str, str]] | None:
        proxies = urllib.request.getproxies_environment()
        if no_proxy_matches(self.host, self.port, proxies.get("no", "")):
            return None
        raw = proxies.get(scheme)
        if not raw:
            return None
        purl = urlsplit(raw if "://" in raw else f"http://{raw}")
        if purl.scheme != "http":
            # TLS to the proxy itself (https://) or SOCKS would need more than http.client has;
            # sending the proxy password over a plain connection instead is not an option.
            from stepguard.errors import ConfigurationError

            raise ConfigurationError(
                f"{purl.scheme}:// proxies are not supported for Vault",
                subject=f"{scheme.upper()}_PROXY",
                hint="use an http:// proxy (Vault over https is still tunnelled end to end "
                     "with CONNECT), or exempt Vault with NO_PROXY")
        headers: dict[str, str] = {}
        if purl.username is not None:
            cred = f"{unquote(purl.username)}:{unquote(purl.password or '')}"
            headers["Proxy-Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
        return purl.hostname or "", purl.port or 80, headers

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self._proxy is None:
            if self.https:
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                                   context=self._tls)
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            return conn
        phost, pport, pheaders = self._proxy
        if self.https:
            conn = http.client.HTTPSConnection(phost, pport, timeout=timeout, context=self._tls)
            conn.set_tunnel(self.host, self.port, headers=pheaders)
        else:
            conn = http.client.HTTPConnection(phost, pport, timeout=timeout)
        return conn

    def _target(self, path: str) -> str:
        if self._proxy is not None and not self.https:
            # A plain-http proxy wants the absolute URI.
            return f"http://{self.host}:{self.port}{self.prefix}{path}"
        return f"{self.prefix}{path}"

    @property
    def origin(self) -> str:
        """``scheme://host:port`` this pool connects to."""
        return f"{'https' if self.https else 'http'}://{self.host}:{self.port}"

    def _checkout(self) -> http.client.HTTPConnection | None:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if _dropped(conn):
                    conn.close()
                    continue
                return conn
        return None

    def _checkin(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < _MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def request(self, method: str, path: str, *, headers: dict[str, str], body: bytes | None,
                timeout: float) -> Response:
        """Send one request and read the whole answer; the connection goes back to the pool.

        An idle connection the server has closed is noticed before reuse and replaced. A
        failure after the request was sent is raised, never silently resent: the caller's
        retry policy decides (issuing a credential is not idempotent).
        """
        conn = self._checkout()
        if conn is None:
            conn = self._connect(timeout)
        try:
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            if self._per_request:
                headers = {**headers, **self._per_request}
            conn.request(method, self._target(path), body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except BaseException:
            conn.close()
            raise
        if resp.will_close:
            conn.close()
        else:
            self._checkin(conn)
        return Response(resp.status, data, resp.getheader("Location"))

    def close(self) -> None:
        """Close every idle connection; connections in use close when their request ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
