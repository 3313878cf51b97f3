"""The dev OpenBao is configured for real: database engine, transit, JWT, AppRole, OIDC, policies."""

from __future__ import annotations

import base64
import json
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from stepguard.testing.devstack import DevStackInfo, PostgresInfo

pytestmark = pytest.mark.services


def client(info: DevStackInfo, token: str | None = None) -> hvac.Client:
    return hvac.Client(url=info.vault_addr, token=token, timeout=10)


def jwt_login(info: DevStackInfo, token: str) -> dict[str, Any]:
    return client(info).auth.jwt.jwt_login(role=info.jwt_role, jwt=token, use_token=False)["auth"]


def approle_login(info: DevStackInfo) -> dict[str, Any]:
    assert info.approle_secret_id_file is not None
    secret_id = info.approle_secret_id_file.read_text().strip()
    return client(info).auth.approle.login(
        role_id=info.approle_role_id, secret_id=secret_id, use_token=False
    )["auth"]


def pg_connect(pg: PostgresInfo, user: str, password: str) -> Any:
    import psycopg2

    return psycopg2.connect(
        host=pg.host, port=pg.port, dbname=pg.database, user=user, password=password,
        connect_timeout=5, sslmode="disable",
    )


def pg_role_exists(pg: PostgresInfo, name: str) -> bool:
    conn = pg_connect(pg, pg.admin_user, pg.admin_password)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT rolvaliduntil IS NOT NULL FROM pg_roles WHERE rolname = %s", (name,))
            row = cur.fetchone()
    finally:
        conn.close()
    if row is not None:
        assert row[0], "dynamic users must carry VALID UNTIL"
    return row is not None


def test_database_credentials_issued_usable_and_really_dropped_on_revoke(
    dev_stack: DevStackInfo, dev_postgres: PostgresInfo, vault_client: hvac.Client
) -> None:
    import psycopg2

    role = vault_client.secrets.database.read_role("stepguard-step")["data"]
    assert (role["default_ttl"], role["max_ttl"]) == (300, 3600)
    creds = vault_client.secrets.database.generate_credentials("stepguard-step")
    user, password = creds["data"]["username"], creds["data"]["password"]
    assert creds["lease_duration"] == 300
    assert pg_role_exists(dev_postgres, user)

    conn = pg_connect(dev_postgres, user, password)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM public.features")
        assert cur.fetchone()[0] >= 2
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute("INSERT INTO public.features (name) VALUES ('poison')")

    vault_client.sys.revoke_lease(creds["lease_id"])
    assert not pg_role_exists(dev_postgres, user)
    # Its open session was ended, not merely its future logins refused.
    with pytest.raises(psycopg2.Error), conn.cursor() as cur:
        cur.execute("SELECT 1")
    conn.close()
    with pytest.raises(psycopg2.OperationalError):
        pg_connect(dev_postgres, user, password)
    with pytest.raises(hvac.exceptions.InvalidRequest):
        vault_client.sys.read_lease(creds["lease_id"])


def test_transit_signing_key(dev_stack: DevStackInfo, vault_client: hvac.Client, mint_jwt: Any) -> None:
    key = vault_client.secrets.transit.read_key("stepguard-signing")["data"]
    assert key["type"] == "ecdsa-p256"
    assert key["exportable"] is False and key["deletion_allowed"] is False

    step = client(dev_stack, jwt_login(dev_stack, mint_jwt())["client_token"])
    data = base64.b64encode(b"model digest").decode()
    sig = step.secrets.transit.sign_data("stepguard-signing", hash_input=data)["data"]["signature"]
    ok = step.secrets.transit.verify_signed_data("stepguard-signing", hash_input=data, signature=sig)
    assert ok["data"]["valid"] is True
    tampered = base64.b64encode(b"model digest!").decode()
    bad = step.secrets.transit.verify_signed_data(
        "stepguard-signing", hash_input=tampered, signature=sig
    )
    assert bad["data"]["valid"] is False
    # A step may not sign with keys outside its policy.
    vault_client.secrets.transit.create_key("unrelated-key", key_type="ecdsa-p256")
    with pytest.raises(hvac.exceptions.Forbidden):
        step.secrets.transit.sign_data("unrelated-key", hash_input=data)


def test_jwt_login_accepts_our_key_and_refuses_forgeries(
    dev_stack: DevStackInfo, mint_jwt: Any, tmp_path: Path
) -> None:
    auth = jwt_login(dev_stack, mint_jwt(sub="train-step"))
    assert set(auth["policies"]) == {"default", "stepguard-step"}
    assert auth["lease_duration"] <= 15 * 60

    for bad in (
        mint_jwt(aud="sts.amazonaws.com"),  # another audience
        mint_jwt(ttl=-120),  # expired
        mint_jwt(issuer="https://evil.example"),  # another issuer
    ):
        with pytest.raises((hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden)):
            jwt_login(dev_stack, bad)

    attacker = tmp_path / "attacker.pem"
    attacker.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises((hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden)):
        jwt_login(dev_stack, mint_jwt(key_path=attacker))


def test_jwt_signing_key_is_private(dev_stack: DevStackInfo) -> None:
    assert dev_stack.jwt_private_key_path is not None
    assert dev_stack.jwt_private_key_path.stat().st_mode & 0o777 == 0o600
    assert dev_stack.approle_secret_id_file is not None
    assert dev_stack.approle_secret_id_file.stat().st_mode & 0o777 == 0o600


def test_approle_login_and_orchestrator_least_privilege(
    dev_stack: DevStackInfo, vault_client: hvac.Client
) -> None:
    auth = approle_login(dev_stack)
    assert {"stepguard-orchestrator", "stepguard-step"} <= set(auth["policies"])
    with pytest.raises((hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden)):
        client(dev_stack).auth.approle.login(
            role_id=dev_stack.approle_role_id, secret_id=str(uuid.uuid4()), use_token=False
        )
    orch = client(dev_stack, auth["client_token"])

    vault_client.secrets.kv.v2.create_or_update_secret(
        path="stepguard/app", secret={"k": "v"}, mount_point="secret"
    )
    vault_client.secrets.kv.v2.create_or_update_secret(
        path="elsewhere/app", secret={"k": "v"}, mount_point="secret"
    )
    assert orch.secrets.kv.v2.read_secret_version(
        path="stepguard/app", mount_point="secret", raise_on_deleted_version=True
    )["data"]["data"] == {"k": "v"}
    with pytest.raises(hvac.exceptions.Forbidden):
        orch.secrets.kv.v2.read_secret_version(
            path="elsewhere/app", mount_point="secret", raise_on_deleted_version=True
        )
    with pytest.raises(hvac.exceptions.Forbidden):
        orch.sys.create_or_update_policy(name="x", policy='path "*" { capabilities = ["sudo"] }')

    # A per-step child token through the token role carries only the step policy ...
    child = orch.auth.token.create(role_name="stepguard-step", ttl="10m", policies=["stepguard-step"])
    assert set(child["auth"]["policies"]) == {"default", "stepguard-step"}
    # ... and it cannot be widened beyond what its parent holds.
    with pytest.raises((hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest)):
        orch.auth.token.create(policies=["root"], ttl="10m")

    # Response wrapping: single use.
    wrapped = orch.auth.token.create(
        role_name="stepguard-step", ttl="10m", wrap_ttl="60s"
    )["wrap_info"]["token"]
    unwrapped = client(dev_stack, wrapped).sys.unwrap()
    assert unwrapped["auth"]["client_token"]
    with pytest.raises((hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden)):
        client(dev_stack, wrapped).sys.unwrap()

    # Revoking the child revokes its leases.
    step = client(dev_stack, child["auth"]["client_token"])
    orch.auth.token.revoke(child["auth"]["client_token"])
    with pytest.raises(hvac.exceptions.Forbidden):
        step.auth.token.lookup_self()


def test_step_token_cannot_reach_beyond_its_policy(dev_stack: DevStackInfo, mint_jwt: Any) -> None:
    step = client(dev_stack, jwt_login(dev_stack, mint_jwt())["client_token"])
    with pytest.raises(hvac.exceptions.Forbidden):
        step.sys.list_mounted_secrets_engines()
    with pytest.raises(hvac.exceptions.Forbidden):
        step.secrets.kv.v2.read_secret_version(path="elsewhere/app", mount_point="secret")
    with pytest.raises(hvac.exceptions.Forbidden):
        step.auth.token.create(policies=["stepguard-orchestrator"], ttl="5m")
    with pytest.raises(hvac.exceptions.Forbidden):
        step.adapter.get("/v1/auth/approle/role/stepguard-orchestrator/role-id")


def test_identity_token_for_sts_carries_run_and_step(dev_stack: DevStackInfo, mint_jwt: Any) -> None:
    step = client(
        dev_stack, jwt_login(dev_stack, mint_jwt(run_id="run-42", step_id="train"))["client_token"]
    )
    token = step.adapter.get("/v1/identity/oidc/token/stepguard-step")["data"]["token"]
    with urllib.request.urlopen(f"{dev_stack.oidc_issuer}/.well-known/keys", timeout=5) as resp:
        jwks = json.loads(resp.read())
    kid = pyjwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwks["keys"] if k["kid"] == kid)
    claims = pyjwt.decode(
        token, key=pyjwt.PyJWK(key).key, algorithms=["RS256"], audience="sts.amazonaws.com",
        issuer=dev_stack.oidc_issuer,
    )
    assert claims["stepguard"]["run_id"] == "run-42"
    assert claims["stepguard"]["step_id"] == "train"


def test_vault_configuration_is_idempotent(
    dev_stack: DevStackInfo, vault_client: hvac.Client
) -> None:
    from stepguard.testing.devstack import _vault

    before = vault_client.secrets.transit.read_key("stepguard-signing")["data"]["latest_version"]
    setup = _vault.configure_vault(
        vault_client, dev_stack.state_dir, vault_addr=dev_stack.vault_addr, postgres=None,
        vault_pg_password=None,
    )
    assert setup.approle_role_id == dev_stack.approle_role_id
    assert setup.jwt_private_key_path == dev_stack.jwt_private_key_path
    after = vault_client.secrets.transit.read_key("stepguard-signing")["data"]["latest_version"]
    assert before == after
