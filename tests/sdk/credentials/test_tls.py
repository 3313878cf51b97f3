"""TLS to Vault: the configured CA is used, and a certificate that does not verify is a hard
error at once (never retried as if it were a network blip). Runs its own ``bao server -dev-tls``."""

from __future__ import annotations

import socket
import subprocess
import time
import warnings

import pytest

from stepguard.credentials import TokenAuth, VaultConfig, open_session
from stepguard.errors import CredentialError, TransientCredentialError
from stepguard.spec import RunContext

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def tls_vault(tmp_path_factory):
    from stepguard.testing import devstack

    bao = devstack.find_bao()
    if bao is None:
        pytest.skip("bao binary not available")
    certs = tmp_path_factory.mktemp("bao-tls")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(bao), "server", "-dev", "-dev-tls", f"-dev-tls-cert-dir={certs}",
         f"-dev-listen-address=127.0.0.1:{port}", "-dev-root-token-id=tls-root-token"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ca = certs / "vault-ca.pem"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            if ca.exists():
                break
        except OSError:
            time.sleep(0.2)
    try:
        yield f"https://127.0.0.1:{port}", str(ca)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _auth():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TokenAuth("tls-root-token")


def test_ca_cert_verifies_vault(tls_vault):
    addr, ca = tls_vault
    cfg = VaultConfig(addr=addr, auth=_auth(), ca_cert=ca, default_policies=("default",))
    with open_session([], settings=cfg, context=RunContext(), ttl_s=30) as s:
        assert s.token.child
    assert s.token.revoked


def test_unverifiable_certificate_fails_at_once(tls_vault):
    addr, _ = tls_vault
    cfg = VaultConfig(addr=addr, auth=_auth(), default_policies=("default",))
    t0 = time.monotonic()
    with pytest.raises(CredentialError, match="TLS verification") as info:
        with open_session([], settings=cfg, context=RunContext(), ttl_s=30):
            pass
    assert not isinstance(info.value, TransientCredentialError)
    assert time.monotonic() - t0 < 3


def test_https_through_a_connect_proxy_still_verifies_vault(tls_vault, forward_proxy,
                                                            no_proxy_env, monkeypatch):
    """HTTPS_PROXY tunnels with CONNECT; the certificate is still checked against the CA (the
    proxy cannot read or alter the traffic), and without the CA the tunnel does not help."""
    addr, ca = tls_vault
    monkeypatch.setenv("HTTPS_PROXY", forward_proxy.url)
    cfg = VaultConfig(addr=addr, auth=_auth(), ca_cert=ca, default_policies=("default",))
    with open_session([], settings=cfg, context=RunContext(), ttl_s=30) as s:
        assert s.token.child
    assert s.token.revoked
    port = addr.rsplit(":", 1)[1]
    assert forward_proxy.lines and all(ln.startswith(f"CONNECT 127.0.0.1:{port} ")
                                       for ln in forward_proxy.lines)
    bad = VaultConfig(addr=addr, auth=_auth(), default_policies=("default",))
    with pytest.raises(CredentialError, match="TLS verification"):
        with open_session([], settings=bad, context=RunContext(), ttl_s=30):
            pass
