"""Fixtures for the credentials tests: Vault configs on the dev stack, PostgreSQL probes, and a
small fault-injecting HTTP proxy placed in front of the real OpenBao."""

from __future__ import annotations

import contextlib
import http.client
import select
import socket
import socketserver
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest

from stepguard.credentials import AppRoleAuth, TokenAuth, VaultConfig
from stepguard.testing.devstack import DevStackInfo


@pytest.fixture
def approle_auth(dev_stack: DevStackInfo) -> AppRoleAuth:
    assert dev_stack.approle_secret_id_file is not None
    return AppRoleAuth(role_id=dev_stack.approle_role_id,
                       secret_id=dev_stack.approle_secret_id_file.read_text().strip())


@pytest.fixture
def vault_cfg(dev_stack: DevStackInfo, approle_auth: AppRoleAuth) -> VaultConfig:
    """The orchestrator's config: AppRole login, short retries so fault tests stay fast."""
    return VaultConfig(addr=dev_stack.vault_addr, auth=approle_auth, timeout_s=5,
                       retry_total_s=10, sts_endpoint=dev_stack.moto_endpoint,
                       aws_region=dev_stack.aws_region)


@pytest.fixture
def root_cfg(dev_stack: DevStackInfo) -> VaultConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auth = TokenAuth(dev_stack.vault_root_token)
    return VaultConfig(addr=dev_stack.vault_addr, auth=auth, timeout_s=5)


@pytest.fixture
def pg_admin(dev_postgres: Any) -> Iterator[Callable[..., list[tuple[Any, ...]]]]:
    """Run SQL as the cluster superuser: ``pg_admin("select ...", params)`` -> rows."""
    import psycopg2

    conn = psycopg2.connect(dev_postgres.admin_dsn)
    conn.autocommit = True

    def query(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

    yield query
    conn.close()


def role_exists(pg_admin: Callable[..., list[tuple[Any, ...]]], name: str) -> bool:
    return bool(pg_admin("select 1 from pg_roles where rolname = %s", (name,)))


def wait_for(pred: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def lease_exists(vault_client: Any, lease_id: str) -> bool:
    import hvac.exceptions

    try:
        vault_client.adapter.put("/v1/sys/leases/lookup", json={"lease_id": lease_id})
        return True
    except hvac.exceptions.InvalidRequest:
        return False


def leases_under(vault_client: Any, prefix: str) -> list[str]:
    """Lease ids currently alive under ``prefix`` (e.g. database/creds/stepguard-step/)."""
    import hvac.exceptions

    try:
        body = vault_client.adapter.list(f"/v1/sys/leases/lookup/{prefix}")
    except hvac.exceptions.InvalidPath:
        return []
    return [prefix + k for k in ((body or {}).get("data") or {}).get("keys", [])]


class Probes:
    """Checks at the source of truth: pg_roles, Vault's lease table (root token)."""

    def __init__(self, pg: Callable[..., list[tuple[Any, ...]]] | None, vault: Any) -> None:
        self.pg, self.vault = pg, vault

    def role_exists(self, name: str) -> bool:
        assert self.pg is not None
        return role_exists(self.pg, name)

    def lease_exists(self, lease_id: str) -> bool:
        return lease_exists(self.vault, lease_id)

    def leases_under(self, prefix: str) -> list[str]:
        return leases_under(self.vault, prefix)

    def dynamic_roles(self) -> set[str]:
        assert self.pg is not None
        return {r[0] for r in self.pg("select rolname from pg_roles where rolname like 'v-%%'")}

    wait_for = staticmethod(wait_for)


@pytest.fixture
def probes(pg_admin: Any, vault_client: Any) -> Probes:
    return Probes(pg_admin, vault_client)


# -- a fault-injecting proxy ------------------------------------------------------------------


@dataclass
class FaultProxy:
    """HTTP proxy to the real OpenBao. ``rules`` decide per request: a callable
    ``(method, path, n) -> action`` where n counts requests to that path; actions:
    ``"pass"``, ``("status", code)``, ``("delay", seconds)``, ``"drop_response"`` (forward the
    request, then close the connection without answering), ``"refuse"`` (close at once)."""

    upstream: str
    port: int = 0
    rule: Callable[[str, str, int], Any] = field(default=lambda m, p, n: "pass")
    seen: list[tuple[str, str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    up = urlsplit(proxy.upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _do(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            path = self.path.split("?")[0]
            n = proxy.counts.get(path, 0) + 1
            proxy.counts[path] = n
            action = proxy.rule(self.command, path, n)
            proxy.seen.append((self.command, path, action))
            if action == "refuse":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if isinstance(action, tuple) and action[0] == "status":
                payload = b'{"errors":["injected"]}'
                self.send_response(action[1])
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            if isinstance(action, tuple) and action[0] == "delay":
                time.sleep(action[1])
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            if action == "drop_response":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in {"transfer-encoding", "connection", "content-length"}:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_LIST = _do

    return Handler


@pytest.fixture
def fault_proxy(dev_stack: DevStackInfo) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream=dev_stack.vault_addr)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy))
    server.daemon_threads = True
    proxy.server = server
    proxy.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield proxy
    server.shutdown()
    server.server_close()


# -- real TCP/HTTP proxies for the transport tests ------------------------------------------------


def _pipe(a: socket.socket, b: socket.socket) -> None:
    socks = [a, b]
    try:
        while True:
            readable, _, _ = select.select(socks, [], [], 5)
            if not readable:
                continue
            for s in readable:
                data = s.recv(65536)
                if not data:
                    return
                (b if s is a else a).sendall(data)
    except OSError:
        return
    finally:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()


@dataclass
class Proxy:
    """What a proxy saw: accepted client connections, request lines, proxy auth headers."""

    port: int = 0
    connections: int = 0
    lines: list[str] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def read_head(sock: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return head


@contextlib.contextmanager
def serve_tcp(handle: Any) -> Iterator[int]:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            handle(self.request)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def tcp_forwarder(upstream: str) -> Iterator[Proxy]:
    """Plain TCP relay to ``upstream``: counts the connections made through it."""
    up = urlsplit(upstream)
    seen = Proxy()

    def handle(client: socket.socket) -> None:
        seen.connections += 1
        _pipe(client, socket.create_connection((up.hostname, up.port)))

    with serve_tcp(handle) as port:
        seen.port = port
        yield seen


@contextlib.contextmanager
def http_proxy() -> Iterator[Proxy]:
    """A forward proxy: absolute-URI requests (plain http) and CONNECT tunnels (https)."""
    seen = Proxy()

    def handle(client: socket.socket) -> None:
        seen.connections += 1
        head = read_head(client)
        lines = head.decode("latin-1").split("\r\n")
        seen.lines.append(lines[0])
        seen.auth += [ln.split(":", 1)[1].strip() for ln in lines
                      if ln.lower().startswith("proxy-authorization:")]
        method, target, _ = lines[0].split(" ", 2)
        if method == "CONNECT":
            host, port = target.rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)))
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            _pipe(client, upstream)
            return
        url = urlsplit(target)
        upstream = socket.create_connection((url.hostname, url.port))
        path = url.path + (f"?{url.query}" if url.query else "")
        rest = head.split(b"\r\n", 1)[1]
        upstream.sendall(f"{method} {path} HTTP/1.1\r\n".encode() + rest)
        _pipe(client, upstream)  # one request per proxied connection is enough here

    with serve_tcp(handle) as port:
        seen.port = port
        yield seen


class NetTools:
    """The helpers above, for tests (conftest modules are not importable by name here)."""

    Proxy = Proxy
    serve_tcp = staticmethod(serve_tcp)
    tcp_forwarder = staticmethod(tcp_forwarder)
    http_proxy = staticmethod(http_proxy)
    read_head = staticmethod(read_head)


@pytest.fixture
def net() -> type[NetTools]:
    return NetTools


@pytest.fixture
def forward_proxy() -> Iterator[Proxy]:
    with http_proxy() as proxy:
        yield proxy


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy variables from the machine running the tests."""
    for name in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
