"""Kubernetes auth through the real OpenBao ``kubernetes`` auth method.

No Kubernetes API server can run here, so a small local HTTP server stands in for the one
endpoint Vault calls, ``POST /apis/authentication.k8s.io/v1/tokenreviews``, answering as the
documented TokenReview API does. Configured here with the root token (the dev stack does not
mount it): auth mount ``kubernetes-test/``, role ``train`` bound to service account
``train`` in namespace ``ml``, policy ``stepguard-step``.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stepguard.credentials import KubernetesAuth, VaultConfig, open_session
from stepguard.errors import CredentialDenied
from stepguard.spec import CredentialRequest, RunContext

pytestmark = pytest.mark.services

UID = "6b2ffd55-8b53-4a42-8f6d-4f8bd3d8c9a1"


def _sa_jwt(name: str = "train", namespace: str = "ml") -> str:
    """A service-account token shaped like a legacy one (Vault reads its claims; only the
    stand-in API server's TokenReview decides whether it is authentic)."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    # Vault only accepts asymmetric algorithms here; it does not check the signature itself.
    return jwt.encode({"iss": "kubernetes/serviceaccount",
                       "sub": f"system:serviceaccount:{namespace}:{name}",
                       "kubernetes.io/serviceaccount/namespace": namespace,
                       "kubernetes.io/serviceaccount/service-account.name": name,
                       "kubernetes.io/serviceaccount/service-account.uid": UID},
                      ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")


GOOD = _sa_jwt()
REVIEWS: list[dict] = []


class _TokenReview(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        REVIEWS.append(body)
        token = body["spec"]["token"]
        status = ({"authenticated": True,
                   "user": {"username": "system:serviceaccount:ml:train",
                            "uid": UID,
                            "groups": ["system:serviceaccounts"]}}
                  if token == GOOD else {"authenticated": False, "error": "invalid token"})
        out = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                          "status": status}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


def _self_signed_ca() -> str:
    # Required by the config API; unused over plain HTTP to the stand-in server.
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stand-in kubernetes CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def k8s_mount(dev_stack):
    import hvac

    server = ThreadingHTTPServer(("127.0.0.1", 0), _TokenReview)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = hvac.Client(url=dev_stack.vault_addr, token=dev_stack.vault_root_token, timeout=10)
    if "kubernetes-test/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method(method_type="kubernetes", path="kubernetes-test")
    root.adapter.post("/v1/auth/kubernetes-test/config", json={
        "kubernetes_host": f"http://127.0.0.1:{server.server_address[1]}",
        "disable_local_ca_jwt": True, "kubernetes_ca_cert": _self_signed_ca()})
    root.adapter.post("/v1/auth/kubernetes-test/role/train", json={
        "bound_service_account_names": ["train"], "bound_service_account_namespaces": ["ml"],
        "token_policies": ["stepguard-step"], "token_ttl": "10m"})
    yield "kubernetes-test"
    server.shutdown()


def test_pod_service_account_logs_in_and_gets_a_lease(dev_stack, k8s_mount, tmp_path, probes):
    sa = tmp_path / "token"
    sa.write_text(GOOD)
    cfg = VaultConfig(addr=dev_stack.vault_addr, child_token=False,
                      auth=KubernetesAuth(role="train", jwt_path=str(sa), mount=k8s_mount))
    with open_session([CredentialRequest(name="db", kind="database", role="stepguard-step")],
                      settings=cfg, context=RunContext(step="train"), ttl_s=60) as s:
        user = s.values["db"].reveal("username")
        assert probes.role_exists(user)
    assert REVIEWS and REVIEWS[-1]["spec"]["token"] == GOOD
    assert not probes.role_exists(user) and s.token.revoked


def test_token_the_api_server_rejects_is_denied(dev_stack, k8s_mount, tmp_path):
    sa = tmp_path / "token"
    sa.write_text(_sa_jwt(name="attacker"))
    cfg = VaultConfig(addr=dev_stack.vault_addr, child_token=False,
                      auth=KubernetesAuth(role="train", jwt_path=str(sa), mount=k8s_mount))
    with pytest.raises(CredentialDenied):
        with open_session([], settings=cfg, context=RunContext(), ttl_s=60):
            pass
