"""Sigstore keyless, tested up to the network boundary.

The public Sigstore services (Fulcio, Rekor) cannot be reached from here. A local stand-in HTTP
server plays Fulcio and Rekor at the URLs of a private trust config: the test checks the signer
turns our OIDC token into a Fulcio signing-certificate request of the right shape at the
configured URL, that the failure surfaces as a typed error, and that the token never appears in
errors or reprs. Verification of real keyless bundles is not exercised here.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from stepguard.errors import ConfigurationError, OperationalError, StepguardError
from stepguard.signing import SigstorePolicy, SigstoreSigner, build_model_statement


def _b64url(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _fake_token() -> str:
    now = int(time.time())
    claims = {"iss": "https://oidc.example.test", "sub": "ci@example.test", "aud": "sigstore",
              "email": "ci@example.test", "email_verified": True, "iat": now, "nbf": now,
              "exp": now + 600}
    return f"{_b64url({'alg': 'ES256', 'typ': 'JWT'})}.{_b64url(claims)}.c2lnbmF0dXJl"


@pytest.fixture
def standin():
    seen: list[tuple[str, str, dict, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            seen.append((self.command, self.path, dict(self.headers), self.rfile.read(n)))
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"message": "stand-in: no certificates issued here"}')

        do_GET = do_POST = _any

        def log_message(self, *args):
            pass

    srv = HTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", seen
    finally:
        srv.shutdown()


def _trust_config(tmp_path: Path, url: str) -> Path:
    import sigstore

    store = Path(sigstore.__file__).parent / "_store" / "https%3A%2F%2Ftuf-repo-cdn.sigstore.dev"
    root = json.loads((store / "trusted_root.json").read_text())
    svc = {"url": url, "majorApiVersion": 1, "validFor": {"start": "2020-01-01T00:00:00Z"},
           "operator": "stand-in"}
    cfg = {
        "mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json",
        "trustedRoot": root,
        "signingConfig": {
            "mediaType": "application/vnd.dev.sigstore.signingconfig.v0.2+json",
            "caUrls": [svc], "oidcUrls": [svc], "rekorTlogUrls": [svc], "tsaUrls": [],
            "rekorTlogConfig": {"selector": "ANY"}, "tsaConfig": {"selector": "ANY"},
        },
    }
    p = tmp_path / "trust.json"
    p.write_text(json.dumps(cfg))
    return p


def test_keyless_request_reaches_configured_fulcio(tmp_path, standin):
    url, seen = standin
    token = _fake_token()
    signer = SigstoreSigner(identity_token=token, trust_config=_trust_config(tmp_path, url))
    assert token not in repr(signer)
    assert signer.identity == "sigstore:ci@example.test@https://oidc.example.test"
    with pytest.raises(StepguardError) as exc:
        signer.sign_dsse(build_model_statement("m", {"a": "0" * 64}))
    assert isinstance(exc.value, OperationalError)
    assert token not in exc.value.diagnostics()
    posts = [s for s in seen if s[0] == "POST"]
    assert posts, "no request reached the stand-in Fulcio"
    method, path, headers, body = posts[0]
    assert path == "/api/v2/signingCert"
    # Fulcio v2: the OIDC token as bearer credential, a base64 PEM CSR in the body
    assert headers.get("Authorization") == f"Bearer {token}"
    req = json.loads(body)
    csr = base64.b64decode(req["certificateSigningRequest"]).decode()
    assert csr.startswith("-----BEGIN CERTIFICATE REQUEST-----")


def test_keyless_without_token_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("SIGSTORE_ID_TOKEN", raising=False)
    signer = SigstoreSigner(identity_token=None, use_ambient_credentials=False,
                            trust_config=_trust_config(tmp_path, "http://127.0.0.1:9"))
    with pytest.raises(ConfigurationError, match="identity token"):
        signer.sign_dsse(b"{}")


def test_sigstore_policy_refuses_key_bundle(tmp_path, keys, model):
    from stepguard.errors import SignatureError
    from stepguard.signing import KeySigner, sign_model

    signed = sign_model(model, KeySigner(keys.private))
    policy = SigstorePolicy("ci@example.test", "https://oidc.example.test",
                            trust_config=_trust_config(tmp_path, "http://127.0.0.1:9"))
    from stepguard.signing import verify_model

    with pytest.raises(SignatureError):
        verify_model(model, signed.bundle, policy)
