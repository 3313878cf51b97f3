"""Auth methods: AppRole (plain and response-wrapped secret-id) and JWT against the real
OpenBao; Kubernetes auth's request shape against a local replay server (no Kubernetes API
server can run here to review tokens), plus configuration from the environment."""

from __future__ import annotations

import json
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stepguard.credentials import (
    AppRoleAuth,
    JwtAuth,
    KubernetesAuth,
    TokenAuth,
    VaultConfig,
    auth_from_env,
    open_session,
)
from stepguard.credentials._api import VaultApi
from stepguard.errors import ConfigurationError, CredentialDenied
from stepguard.spec import CredentialRequest, RunContext

DB = CredentialRequest(name="db", kind="database", role="stepguard-step")


@pytest.mark.services
def test_wrapped_secret_id_is_unwrapped_once(dev_stack, vault_client, probes):
    body = vault_client.adapter.post(
        "/v1/auth/approle/role/stepguard-orchestrator/secret-id", json={}, wrap_ttl="60s")
    wrapped = body["wrap_info"]["token"]
    auth = AppRoleAuth(role_id=dev_stack.approle_role_id, wrapped_secret_id=wrapped)
    cfg = VaultConfig(addr=dev_stack.vault_addr, auth=auth)
    for _ in range(2):  # the same auth logs in again with the secret-id it unwrapped
        with open_session([DB], settings=cfg, context=RunContext(), ttl_s=60) as s:
            assert probes.role_exists(s.values["db"].reveal("username"))
    # Anyone else holding the wrapping token now fails: interception becomes visible.
    thief = AppRoleAuth(role_id=dev_stack.approle_role_id, wrapped_secret_id=wrapped)
    with pytest.raises(CredentialDenied, match="intercepted"):
        with open_session([DB], settings=VaultConfig(addr=dev_stack.vault_addr, auth=thief),
                          context=RunContext(), ttl_s=60):
            pass


@pytest.mark.services
def test_wrong_secret_id_is_denied(dev_stack):
    auth = AppRoleAuth(role_id=dev_stack.approle_role_id, secret_id="not-the-secret-id")
    with pytest.raises(CredentialDenied):
        with open_session([DB], settings=VaultConfig(addr=dev_stack.vault_addr, auth=auth),
                          context=RunContext(), ttl_s=60):
            pass


@pytest.mark.services
def test_jwt_login_in_pod_uses_owned_login_token(dev_stack, mint_jwt, tmp_path, probes,
                                                 vault_client):
    """In a pod the step logs in itself with a projected token; the JWT role cannot create
    tokens, so the (owned, short-lived) login token is the step token and is revoked at exit."""
    jwt_file = tmp_path / "token"
    jwt_file.write_text(mint_jwt(run_id="run-7", step_id="train"))
    cfg = VaultConfig(addr=dev_stack.vault_addr, child_token=False,
                      auth=JwtAuth(role="stepguard-step", jwt_path=str(jwt_file)))
    with open_session([DB], settings=cfg, context=RunContext(step="train"), ttl_s=60) as s:
        user = s.values["db"].reveal("username")
        token = s._step_token
        assert not s.token.child
    assert not probes.role_exists(user)
    assert s.token.revoked
    import hvac.exceptions

    with pytest.raises(hvac.exceptions.Forbidden):
        vault_client.adapter.post("/v1/auth/token/lookup", json={"token": token})


@pytest.mark.services
def test_jwt_signed_by_another_key_is_denied(dev_stack, mint_jwt, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other = tmp_path / "attacker.pem"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    jwt_file = tmp_path / "token"
    jwt_file.write_text(mint_jwt(key_path=other))
    cfg = VaultConfig(addr=dev_stack.vault_addr, child_token=False,
                      auth=JwtAuth(role="stepguard-step", jwt_path=str(jwt_file)))
    with pytest.raises(CredentialDenied):
        with open_session([DB], settings=cfg, context=RunContext(), ttl_s=60):
            pass


def test_kubernetes_auth_request_shape(tmp_path):
    """Kubernetes auth needs a Kubernetes API server for TokenReview, which cannot run here:
    this checks our request against a local server replaying Vault's documented response."""
    seen = {}

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            seen["path"] = self.path
            seen["body"] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen["namespace"] = self.headers.get("X-Vault-Namespace")
            out = json.dumps({"auth": {"client_token": "hvs.replayed", "accessor": "acc",
                                       "policies": ["default", "train"],
                                       "lease_duration": 600, "renewable": True}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        sa = tmp_path / "sa-token"
        sa.write_text("eyJ.projected.token\n")
        auth = KubernetesAuth(role="train", jwt_path=str(sa), mount="k8s-prod")
        cfg = VaultConfig(addr=f"http://127.0.0.1:{server.server_address[1]}", auth=auth,
                          namespace="team-a")
        login = auth.login(VaultApi(cfg))
    finally:
        server.shutdown()
    assert seen["path"] == "/v1/auth/k8s-prod/login"
    assert seen["body"] == {"role": "train", "jwt": "eyJ.projected.token"}
    assert seen["namespace"] == "team-a"
    assert login.owned and login.ttl_s == 600 and login.policies == ("default", "train")
    assert "hvs.replayed" not in repr(login)


def test_from_env_picks_the_method():
    assert isinstance(auth_from_env({"VAULT_ROLE_ID": "r", "VAULT_SECRET_ID": "s"}),
                      AppRoleAuth)
    assert isinstance(auth_from_env({"VAULT_JWT_ROLE": "r", "VAULT_JWT_PATH": "/t"}), JwtAuth)
    assert isinstance(auth_from_env({"VAULT_K8S_ROLE": "r"}), KubernetesAuth)
    with pytest.warns(UserWarning, match="development"):
        assert isinstance(auth_from_env({"VAULT_TOKEN": "t"}), TokenAuth)
    with pytest.raises(ConfigurationError):
        auth_from_env({})
    with pytest.raises(ConfigurationError):
        auth_from_env({"STEPGUARD_VAULT_AUTH": "ldap"})
    cfg = VaultConfig.from_env({"VAULT_ADDR": "https://vault:8200", "VAULT_NAMESPACE": "ns",
                                "VAULT_CACERT": "/ca.pem", "VAULT_K8S_ROLE": "train",
                                "STEPGUARD_VAULT_TIMEOUT_S": "2.5"})
    assert (cfg.namespace, cfg.ca_cert, cfg.timeout_s) == ("ns", "/ca.pem", 2.5)
    with pytest.raises(ConfigurationError):
        VaultConfig.from_env({"VAULT_ADDR": "vault:8200", "VAULT_K8S_ROLE": "r"})
    with pytest.raises(ConfigurationError):
        VaultConfig(addr="http://v", auth=None, retry_total_s=60)


def test_secret_fields_do_not_print():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = [TokenAuth("tok-canary-1"), AppRoleAuth(role_id="r", secret_id="sid-canary-1")]
    for item in items:
        assert "canary" not in repr(item) and "canary" not in str(item)
