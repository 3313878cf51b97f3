"""The Vault HTTP transport: keep-alive reuse, idle connections the server closed, proxies from
the environment (plain forward proxy and CONNECT tunnel), and how answers map to errors.

Real OpenBao from the dev stack behind small real TCP/HTTP proxies run by the test."""

from __future__ import annotations

import base64
import json
import logging
import socket
import time
from urllib.parse import urlsplit

import pytest

from stepguard.credentials import VaultConfig, open_session
from stepguard.credentials._api import VaultApi, vault_status
from stepguard.errors import CredentialDenied, CredentialError
from stepguard.spec import CredentialRequest, RunContext

pytestmark = [pytest.mark.services, pytest.mark.usefixtures("no_proxy_env")]


def test_a_session_uses_one_keep_alive_connection(dev_stack, approle_auth, net):
    with net.tcp_forwarder(dev_stack.vault_addr) as relay:
        cfg = VaultConfig(addr=relay.url, auth=approle_auth)
        req = CredentialRequest(name="db", kind="database", role="stepguard-step")
        with open_session([req], settings=cfg, context=RunContext(), ttl_s=60) as s:
            assert s.values["db"]["username"]
        assert s.revocation_ok
        # login, child token, credential, lease revocation, token-tree revocation
        assert relay.connections == 1


def test_idle_connection_the_server_closed_is_replaced_without_a_retry(net, caplog):
    """A server that answers once per connection and then hangs up without saying so (no
    ``Connection: close``): the next call notices before reusing it, so nothing is resent and
    no retry is logged."""
    counted = net.Proxy()

    def handle(client: socket.socket) -> None:
        counted.connections += 1
        counted.lines.append(net.read_head(client).split(b"\r\n", 1)[0].decode())
        body = b'{"ok": true}'
        client.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        client.close()

    with net.serve_tcp(handle) as port:
        api = VaultApi(VaultConfig(addr=f"http://127.0.0.1:{port}", auth=None))
        caplog.set_level(logging.WARNING, logger="stepguard.credentials")
        for _ in range(3):
            assert api.request("GET", "sys/health", what="health") == {"ok": True}
            time.sleep(0.1)  # idle: the server's close reaches us before the next call
        api.close()
    assert counted.connections == 3
    assert len(counted.lines) == 3
    assert not [r for r in caplog.records if "retry" in r.getMessage()]


def test_http_proxy_from_environment_with_credentials(dev_stack, approle_auth, monkeypatch,
                                                     forward_proxy):
    proxy = forward_proxy
    monkeypatch.setenv("HTTP_PROXY", f"http://ops:p%40ss@127.0.0.1:{proxy.port}")
    cfg = VaultConfig(addr=dev_stack.vault_addr, auth=approle_auth)
    with open_session([], settings=cfg, context=RunContext(), ttl_s=30) as s:
        assert s.token is not None and s.token.child
    assert s.revocation_ok
    target = urlsplit(dev_stack.vault_addr)
    assert proxy.lines, "no request went through the proxy"
    assert all(ln.startswith(("POST http://", "GET http://", "PUT http://"))
               and f"{target.hostname}:{target.port}/v1/" in ln for ln in proxy.lines)
    assert set(proxy.auth) == {"Basic " + base64.b64encode(b"ops:p@ss").decode()}


def test_no_proxy_bypasses_the_proxy(dev_stack, approle_auth, monkeypatch, forward_proxy):
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    cfg = VaultConfig(addr=dev_stack.vault_addr, auth=approle_auth)
    with open_session([], settings=cfg, context=RunContext(), ttl_s=30):
        pass
    assert forward_proxy.connections == 0


def test_unreachable_proxy_is_a_transient_failure_naming_vault(dev_stack, approle_auth,
                                                                monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead}")
    cfg = VaultConfig(addr=dev_stack.vault_addr, auth=approle_auth, retry_attempts=2,
                      retry_total_s=2, retry_backoff_s=0.01)
    with pytest.raises(CredentialError, match="unreachable") as info:
        with open_session([], settings=cfg, context=RunContext(), ttl_s=30):
            pass
    assert info.value.subject == dev_stack.vault_addr


def test_answers_map_to_typed_errors_with_vault_reasons(net):
    """400/404 keep Vault's own error strings as details and the status for callers;
    403 is a denial. A local server stands in for Vault's documented error shape."""
    answers = {"/v1/bad": (400, {"errors": ["invalid role or secret ID"]}),
               "/v1/missing": (404, {"errors": []}),
               "/v1/denied": (403, {"errors": ["permission denied"]})}

    def handle(client: socket.socket) -> None:
        while True:
            head = net.read_head(client)
            if not head:
                return
            path = head.split(b" ", 2)[1].decode()
            status, payload = answers[path]
            body = json.dumps(payload).encode()
            client.sendall(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s"
                           % (status, len(body), body))

    with net.serve_tcp(handle) as port:
        api = VaultApi(VaultConfig(addr=f"http://127.0.0.1:{port}", auth=None))
        with pytest.raises(CredentialError) as bad:
            api.request("GET", "bad", what="a login")
        assert vault_status(bad.value) == 400
        assert bad.value.details == ("invalid role or secret ID",)
        assert "HTTP 400" in str(bad.value) and "a login" in str(bad.value)
        with pytest.raises(CredentialError) as missing:
            api.request("GET", "missing", what="a read")
        assert vault_status(missing.value) == 404
        with pytest.raises(CredentialDenied) as denied:
            api.request("GET", "denied", what="a read")
        assert denied.value.details == ("permission denied",)
        api.close()


@pytest.mark.parametrize(("no_proxy", "bypassed"), [
    ("127.0.0.0/8", True),
    ("localhost, 127.0.0.1", True),
    ("*", True),
    ("127.0.0.1:1", False),   # another port: still proxied
    ("10.0.0.0/8", False),
])
def test_no_proxy_cidr_and_port_entries(dev_stack, approle_auth, monkeypatch, forward_proxy,
                                        no_proxy, bypassed):
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    monkeypatch.setenv("NO_PROXY", no_proxy)
    cfg = VaultConfig(addr=dev_stack.vault_addr, auth=approle_auth)
    with open_session([], settings=cfg, context=RunContext(), ttl_s=30):
        pass
    assert (forward_proxy.connections == 0) is bypassed


def test_no_proxy_with_the_vault_port_bypasses(dev_stack, approle_auth, monkeypatch,
                                               forward_proxy):
    port = urlsplit(dev_stack.vault_addr).port
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    monkeypatch.setenv("NO_PROXY", f"example.com,127.0.0.1:{port}")
    cfg = VaultConfig(addr=dev_stack.vault_addr, auth=approle_auth)
    with open_session([], settings=cfg, context=RunContext(), ttl_s=30):
        pass
    assert forward_proxy.connections == 0


def test_https_proxy_url_is_refused_before_its_password_is_sent(dev_stack, approle_auth,
                                                                monkeypatch, net):
    """An https:// proxy would need TLS to the proxy itself; sending its password over a plain
    connection instead is refused, before anything is sent."""
    from stepguard.errors import ConfigurationError

    seen = net.Proxy()

    def handle(client: socket.socket) -> None:
        seen.connections += 1
        seen.lines.append(net.read_head(client).decode("latin-1"))

    with net.serve_tcp(handle) as port:
        monkeypatch.setenv("HTTP_PROXY", f"https://alice:s3cret-proxy-pw@127.0.0.1:{port}")
        cfg = VaultConfig(addr=dev_stack.vault_addr, auth=approle_auth)
        with pytest.raises(ConfigurationError, match="https:// proxies") as info:
            with open_session([], settings=cfg, context=RunContext(), ttl_s=30):
                pass
    assert seen.connections == 0
    assert "s3cret" not in info.value.diagnostics()


def test_token_with_a_line_break_never_reaches_an_error_message(dev_stack):
    """http.client quotes a refused header value in its own error: that text must not travel."""
    import traceback

    token = "hvs.CANARYtoken1234567890\n"
    api = VaultApi(VaultConfig(addr=dev_stack.vault_addr, auth=None), token=token)
    with pytest.raises(CredentialError, match="invalid header value") as info:
        api.request("GET", "auth/token/lookup-self", what="token lookup")
    text = "".join(traceback.format_exception(info.value)) + repr(info.value)
    assert "CANARY" not in text
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_paths_are_percent_encoded(dev_stack, vault_client):
    """A KV secret whose name has a space and a non-ASCII letter is read as such."""
    vault_client.secrets.kv.v2.create_or_update_secret(path="my app/café",
                                                       secret={"k": "v"})
    api = VaultApi(VaultConfig(addr=dev_stack.vault_addr, auth=None),
                   token=dev_stack.vault_root_token)
    body = api.request("GET", "secret/data/my app/café", what="kv read")
    assert body["data"]["data"] == {"k": "v"}
    api.close()
