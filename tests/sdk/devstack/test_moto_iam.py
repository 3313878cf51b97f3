"""moto enforces IAM, and serves web-identity federation from the dev OpenBao like AWS STS."""

from __future__ import annotations

import json
import time
from typing import Any

import boto3
import hvac
import jwt as pyjwt
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from stepguard.testing.devstack import DevStackInfo

pytestmark = pytest.mark.services

NO_RETRY = Config(retries={"max_attempts": 1})


def unsigned(info: DevStackInfo, service: str) -> Any:
    return boto3.client(
        service, endpoint_url=info.moto_endpoint, region_name=info.aws_region,
        config=Config(signature_version=UNSIGNED, retries={"max_attempts": 1}),
    )


def with_keys(info: DevStackInfo, service: str, key: str, secret: str, token: str | None = None) -> Any:
    return boto3.client(
        service, endpoint_url=info.moto_endpoint, region_name=info.aws_region,
        aws_access_key_id=key, aws_secret_access_key=secret, aws_session_token=token,
        config=NO_RETRY,
    )


def error_code(exc: ClientError) -> tuple[int, str]:
    return exc.response["ResponseMetadata"]["HTTPStatusCode"], exc.response["Error"]["Code"]


def identity_token(info: DevStackInfo, mint_jwt: Any, **claims: Any) -> str:
    c = hvac.Client(url=info.vault_addr, timeout=10)
    auth = c.auth.jwt.jwt_login(role=info.jwt_role, jwt=mint_jwt(**claims), use_token=False)
    step = hvac.Client(url=info.vault_addr, token=auth["auth"]["client_token"], timeout=10)
    return str(step.adapter.get("/v1/identity/oidc/token/stepguard-step")["data"]["token"])


def test_admin_keys_work_and_buckets_exist(dev_stack: DevStackInfo, aws_admin_session: Any) -> None:
    s3 = aws_admin_session.client("s3", endpoint_url=dev_stack.moto_endpoint)
    names = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    assert {"stepguard-data", "stepguard-models", "stepguard-other"} <= names


def test_unsigned_and_unknown_callers_are_refused(dev_stack: DevStackInfo) -> None:
    with pytest.raises(ClientError) as caught:
        unsigned(dev_stack, "s3").list_buckets()
    assert error_code(caught.value) == (403, "AccessDenied")
    with pytest.raises(ClientError) as caught:
        unsigned(dev_stack, "s3").get_object(Bucket="stepguard-data", Key="x")
    assert error_code(caught.value)[0] == 403
    with pytest.raises(ClientError) as caught:
        with_keys(dev_stack, "iam", "AKIAFAKEFAKEFAKEFAKE", "x" * 40).list_users()
    assert error_code(caught.value) == (403, "InvalidClientTokenId")
    # The right key id with the wrong secret: signature mismatch.
    with pytest.raises(ClientError) as caught:
        with_keys(dev_stack, "s3", dev_stack.aws_access_key_id, "y" * 40).list_buckets()
    assert error_code(caught.value)[0] == 403


def test_user_without_policy_is_refused(dev_stack: DevStackInfo, aws_admin_session: Any) -> None:
    iam = aws_admin_session.client("iam", endpoint_url=dev_stack.moto_endpoint)
    iam.create_user(UserName="nobody")
    key = iam.create_access_key(UserName="nobody")["AccessKey"]
    try:
        with pytest.raises(ClientError) as caught:
            with_keys(dev_stack, "s3", key["AccessKeyId"], key["SecretAccessKey"]).list_buckets()
        assert error_code(caught.value) == (403, "AccessDenied")
    finally:
        iam.delete_access_key(UserName="nobody", AccessKeyId=key["AccessKeyId"])
        iam.delete_user(UserName="nobody")


def test_web_identity_from_vault_reaches_only_its_bucket(dev_stack: DevStackInfo, mint_jwt: Any) -> None:
    token = identity_token(dev_stack, mint_jwt, run_id="run-7", step_id="train")
    resp = unsigned(dev_stack, "sts").assume_role_with_web_identity(
        RoleArn=dev_stack.web_identity_role_arn, RoleSessionName="run-7.train",
        WebIdentityToken=token, DurationSeconds=900,
    )
    assert resp["AssumedRoleUser"]["Arn"].endswith("stepguard-train/run-7.train")
    creds = resp["Credentials"]
    s3 = with_keys(
        dev_stack, "s3", creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"]
    )
    s3.put_object(Bucket="stepguard-data", Key="in/a.csv", Body=b"1,2\n")
    assert s3.get_object(Bucket="stepguard-data", Key="in/a.csv")["Body"].read() == b"1,2\n"
    for bucket in ("stepguard-models", "stepguard-other"):
        with pytest.raises(ClientError) as caught:
            s3.put_object(Bucket=bucket, Key="x", Body=b"x")
        assert error_code(caught.value)[0] == 403
        with pytest.raises(ClientError):
            s3.list_objects_v2(Bucket=bucket)
    with pytest.raises(ClientError):
        s3.list_buckets()


def test_forged_or_foreign_web_identity_tokens_are_refused(
    dev_stack: DevStackInfo, mint_jwt: Any, aws_admin_session: Any
) -> None:
    sts = unsigned(dev_stack, "sts")

    def assume(token: str, role_arn: str | None = None) -> tuple[int, str]:
        with pytest.raises(ClientError) as caught:
            sts.assume_role_with_web_identity(
                RoleArn=role_arn or dev_stack.web_identity_role_arn,
                RoleSessionName="attacker", WebIdentityToken=token,
            )
        return error_code(caught.value)

    assert assume("not-a-jwt")[1] == "InvalidIdentityToken"
    # Right issuer and audience, but signed with a key the issuer never published.
    now = int(time.time())
    forged = pyjwt.encode(
        {"iss": dev_stack.oidc_issuer, "aud": "sts.amazonaws.com", "sub": "x",
         "iat": now, "exp": now + 300},
        dev_stack.jwt_private_key_path.read_bytes(), algorithm="ES256",  # type: ignore[union-attr]
        headers={"kid": "forged"},
    )
    assert assume(forged)[1] == "InvalidIdentityToken"
    # A genuine token, but for an issuer not registered as an IAM OIDC provider.
    genuine_login_jwt = mint_jwt(aud="sts.amazonaws.com")
    assert assume(genuine_login_jwt)[1] == "InvalidIdentityToken"

    # A genuine Vault identity token, presented to a role that trusts another audience.
    iam = aws_admin_session.client("iam", endpoint_url=dev_stack.moto_endpoint)
    issuer = dev_stack.oidc_issuer.split("://", 1)[1]
    trust = {
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow", "Principal": {"Federated": dev_stack.oidc_provider_arn},
            "Action": "sts:AssumeRoleWithWebIdentity",
            "Condition": {"StringEquals": {f"{issuer}:aud": "someone-else"}},
        }],
    }
    other = iam.create_role(RoleName="stepguard-other-aud", AssumeRolePolicyDocument=json.dumps(trust))
    try:
        token = identity_token(dev_stack, mint_jwt)
        assert assume(token, other["Role"]["Arn"])[1] == "AccessDenied"
    finally:
        iam.delete_role(RoleName="stepguard-other-aud")
