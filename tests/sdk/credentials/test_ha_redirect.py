"""Vault HA: a standby node without request forwarding answers every request with a redirect
to the active node. The one Vault client follows it, for the credential session's own transport
and for the hvac client Transit uses, and refuses redirects that would weaken the connection.

The "standby" is a small real HTTP server run by the test in front of the dev stack's real
OpenBao (the active node); no second OpenBao node is started, since a real HA pair needs a
shared storage backend that ``bao server -dev`` does not offer."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator

import pytest

from stepguard.credentials import VaultClient, VaultConfig, open_session
from stepguard.errors import CredentialError
from stepguard.spec import CredentialRequest, RunContext

pytestmark = [pytest.mark.services, pytest.mark.usefixtures("no_proxy_env")]


@contextlib.contextmanager
def standby(active: str, status: int = 307) -> Iterator[tuple[str, list[str]]]:
    """A server that redirects every request to ``active`` + the same path; yields its URL and
    the request lines it saw."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _redirect(self) -> None:
            seen.append(f"{self.command} {self.path}")
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            self.send_response(status)
            self.send_header("Location", active.rstrip("/") + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = do_DELETE = _redirect

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_a_session_through_a_standby_reaches_the_active_node(dev_stack, approle_auth):
    with standby(dev_stack.vault_addr) as (url, seen):
        cfg = VaultConfig(addr=url, auth=approle_auth)
        req = CredentialRequest(name="db", kind="database", role="stepguard-step")
        with open_session([req], settings=cfg, context=RunContext(), ttl_s=60) as s:
            assert s.values["db"]["username"]
        assert s.revocation_ok
    # login, child token, credential, revocations: every one was redirected, none failed
    assert any("auth/approle/login" in line for line in seen)
    assert any("database/creds" in line for line in seen)


def test_308_is_followed_too_and_hvac_follows_for_transit(dev_stack):
    with standby(dev_stack.vault_addr, status=308) as (url, seen):
        client = VaultClient(VaultConfig(addr=url, auth=None), dev_stack.vault_root_token)
        try:
            body = client.request("GET", "auth/token/lookup-self", what="lookup")
            assert body is not None and body["data"]["policies"] == ["root"]
            keys = client.call("reading a Transit key",
                               lambda h: h.secrets.transit.read_key(name="stepguard-signing"),
                               subject="transit/keys/stepguard-signing")
            assert keys["data"]["type"] == "ecdsa-p256"
        finally:
            client.close()
    assert len(seen) == 2


def _self_signed(tmp_path):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    crt, pem = tmp_path / "standby.crt", tmp_path / "standby.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


def test_a_redirect_from_https_down_to_plain_http_is_refused(dev_stack, tmp_path):
    """A standby reached over TLS that points at a plain-http node would send the token in
    clear: the client refuses with a typed error and sends nothing there."""
    import ssl

    crt, pem = _self_signed(tmp_path)
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(307)
            self.send_header("Location", dev_stack.vault_addr.rstrip("/") + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, pem)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}"
        client = VaultClient(VaultConfig(addr=url, auth=None, ca_cert=str(crt)),
                             dev_stack.vault_root_token)
        with pytest.raises(CredentialError, match="redirect refused") as exc:
            client.request("GET", "auth/token/lookup-self", what="lookup")
        assert any("https to plain http" in d for d in exc.value.details)
        assert dev_stack.vault_root_token not in exc.value.diagnostics()
        client.close()
    finally:
        server.shutdown()
        server.server_close()
    assert len(seen) == 1


def test_a_redirect_loop_ends_in_a_typed_error():
    holder: dict[str, str] = {}

    class Loop(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(307)
            self.send_header("Location", holder["url"] + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Loop)
    holder["url"] = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = VaultClient(VaultConfig(addr=holder["url"], auth=None))
        with pytest.raises(CredentialError, match="redirect refused") as exc:
            client.request("GET", "sys/health", what="health")
        assert any("more than" in d for d in exc.value.details)
        client.close()
    finally:
        server.shutdown()
        server.server_close()
