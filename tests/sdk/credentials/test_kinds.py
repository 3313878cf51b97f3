"""Secret kinds against the real dev stack: web identity through moto's STS with IAM enforced,
KV v2 (static), the generic dynamic path; and delivery by response wrapping and files."""

from __future__ import annotations

import os
import stat

import pytest

from stepguard.credentials import open_session, unwrap_delivery, wrap_for_delivery
from stepguard.errors import CredentialDenied
from stepguard.spec import CredentialRequest, RunContext

pytestmark = pytest.mark.services


def _s3(dev_stack, values):
    import boto3

    return boto3.client("s3", endpoint_url=dev_stack.moto_endpoint,
                        region_name=dev_stack.aws_region,
                        aws_access_key_id=values.reveal("aws_access_key_id"),
                        aws_secret_access_key=values.reveal("aws_secret_access_key"),
                        aws_session_token=values.reveal("aws_session_token"))


def test_web_identity_reaches_allowed_bucket_only(vault_cfg, dev_stack):
    from botocore.exceptions import ClientError

    req = CredentialRequest(name="aws", kind="aws_web_identity",
                            role=dev_stack.web_identity_role_arn, env_prefix="")
    ctx = RunContext(pipeline="p", run_id="run-42", step="train")
    with open_session([req], settings=vault_cfg, context=ctx, ttl_s=900) as s:
        values = s.values["aws"]
        s3 = _s3(dev_stack, values)
        s3.put_object(Bucket="stepguard-data", Key="t/obj", Body=b"hello")
        assert s3.get_object(Bucket="stepguard-data", Key="t/obj")["Body"].read() == b"hello"
        for bucket in ("models", "other"):
            with pytest.raises(ClientError) as info:
                s3.put_object(Bucket=bucket, Key="x", Body=b"x")
            assert info.value.response["Error"]["Code"] == "AccessDenied"
            with pytest.raises(ClientError):
                s3.list_objects_v2(Bucket=bucket)
        import boto3

        sts = boto3.client("sts", endpoint_url=dev_stack.moto_endpoint,
                           region_name=dev_stack.aws_region,
                           aws_access_key_id=values.reveal("aws_access_key_id"),
                           aws_secret_access_key=values.reveal("aws_secret_access_key"),
                           aws_session_token=values.reveal("aws_session_token"))
        arn = sts.get_caller_identity()["Arn"]
        assert "run-42" in arn and "train" in arn  # RoleSessionName carries run and step
        assert set(s.env()) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                "AWS_SESSION_TOKEN"}
    rec = s.leases[0]
    assert rec.kind == "aws_web_identity" and not rec.revocable and not rec.revoked


def test_web_identity_to_a_role_that_does_not_trust_vault_is_denied(vault_cfg, dev_stack):
    arn = dev_stack.web_identity_role_arn.rsplit("/", 1)[0] + "/no-such-role"
    req = CredentialRequest(name="aws", kind="aws_web_identity", role=arn)
    with pytest.raises(CredentialDenied):
        with open_session([req], settings=vault_cfg, context=RunContext(), ttl_s=900):
            pass


def test_kv_is_static_and_dynamic_path_works(vault_cfg, vault_client):
    vault_client.secrets.kv.v2.create_or_update_secret(
        path="stepguard/api", secret={"api_key": "kv-canary-7781"}, mount_point="secret")
    kv = CredentialRequest(name="api", kind="kv", path="stepguard/api")
    dyn = CredentialRequest(name="pg", kind="dynamic", path="database/creds/stepguard-step")
    with open_session([kv, dyn], settings=vault_cfg, context=RunContext(), ttl_s=60) as s:
        assert s.values["api"].reveal("api_key") == "kv-canary-7781"
        assert s.values["pg"].reveal("username").startswith("v-")
        assert s.env()["API_API_KEY"] == "kv-canary-7781"
    kv_rec, dyn_rec = s.leases
    assert kv_rec.static and not kv_rec.revocable and kv_rec.lease_id_hash is None
    assert dyn_rec.revocable and dyn_rec.revoked and not dyn_rec.static


def test_kv_outside_policy_is_denied(vault_cfg, vault_client):
    vault_client.secrets.kv.v2.create_or_update_secret(
        path="other-team/key", secret={"k": "v"}, mount_point="secret")
    req = CredentialRequest(name="x", kind="kv", path="other-team/key")
    with pytest.raises(CredentialDenied):
        with open_session([req], settings=vault_cfg, context=RunContext(), ttl_s=60):
            pass


def test_wrapped_delivery_is_single_use(vault_cfg, probes, caplog):
    db = CredentialRequest(name="db", kind="database", role="stepguard-step")
    with open_session([db], settings=vault_cfg, context=RunContext(step="pod"),
                      ttl_s=60) as s:
        wrapped = wrap_for_delivery(s, ttl_s=30)
        assert "STEPGUARD_WRAPPED_CREDENTIALS" in wrapped.env()
        assert wrapped.token.get_secret_value() not in repr(wrapped)
        token = wrapped.token.get_secret_value()
        # Inside the pod: the runner unwraps once.
        got = unwrap_delivery(token, settings=vault_cfg)
        user = got.values["db"].reveal("username")
        assert user == s.values["db"].reveal("username")
        assert got.env()["DB_PASSWORD"] == s.values["db"].reveal("password")
        # Someone else tries the same token afterwards (or we are second): refused, audited.
        with pytest.raises(CredentialDenied) as info:
            unwrap_delivery(token, settings=vault_cfg)
        assert "intercepted" in info.value.hint
        assert any("delivery refused" in r.getMessage() for r in caplog.records)
        assert token not in caplog.text and token not in str(info.value)
    assert not probes.role_exists(user)


def test_unwrap_refuses_a_token_not_made_by_wrapping(vault_cfg, vault_client):
    """A substituted wrapping token (here: a wrapped child token) is refused before use."""
    body = vault_client.adapter.post("/v1/auth/token/create", json={"ttl": "60s"},
                                     wrap_ttl="60s")
    token = body["wrap_info"]["token"]
    with pytest.raises(CredentialDenied, match="created by auth/token/create"):
        unwrap_delivery(token, settings=vault_cfg)


def test_write_files_are_0400_and_removed(vault_cfg, tmp_path):
    db = CredentialRequest(name="db", kind="database", role="stepguard-step", delivery="file")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    base = tmp_path if shm is None else __import__("tempfile").mkdtemp(dir=shm)
    with open_session([db], settings=vault_cfg, context=RunContext(), ttl_s=60) as s:
        assert s.env() == {}
        env = s.write_files(base)
        assert set(env) == {"DB_USERNAME_FILE", "DB_PASSWORD_FILE"}
        for path in env.values():
            mode = stat.S_IMODE(os.stat(path).st_mode)
            assert mode == 0o400
        with open(env["DB_PASSWORD_FILE"]) as fh:
            assert fh.read() == s.values["db"].reveal("password")
    assert not any(os.path.exists(p) for p in env.values())
    os.rmdir(base)
