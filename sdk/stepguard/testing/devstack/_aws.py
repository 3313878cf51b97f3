"""Configure the moto server: an admin IAM user, buckets, and a web-identity role."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

ADMIN_USER = "stepguard-admin"
DATA_BUCKET = "stepguard-data"
BUCKETS = (DATA_BUCKET, "stepguard-models", "stepguard-other")
WEB_IDENTITY_ROLE = "stepguard-train"
REGION = "us-east-1"
#: Unauthenticated calls moto allows before it enforces IAM: exactly our bootstrap below.
BOOTSTRAP_CALLS = 3


@dataclass(frozen=True)
class AwsSetup:
    access_key_id: str
    secret_access_key: str
    oidc_provider_arn: str
    web_identity_role_arn: str
    account_id: str


def _client(service: str, endpoint: str, key_id: str, secret: str, *, attempts: int = 2) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=5,
                      read_timeout=30),
    )


def _enforce_now(endpoint: str) -> None:
    """Make moto enforce IAM from now on, whatever its bootstrap counter says."""
    req = urllib.request.Request(  # noqa: S310 -- loopback http
        f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
        headers={"Content-Type": "text/plain"},  # else the body is parsed as a form and lost
    )
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
        resp.read()


def configure_moto(endpoint: str, oidc_issuer: str, sts_audience: str) -> AwsSetup:
    # The first BOOTSTRAP_CALLS requests pass unauthenticated; the dummy key is never checked.
    # No retries: a repeated call would use up the unauthenticated allowance.
    iam0 = _client("iam", endpoint, "bootstrap", "bootstrap", attempts=1)
    user_arn = str(iam0.create_user(UserName=ADMIN_USER)["User"]["Arn"])
    iam0.put_user_policy(
        UserName=ADMIN_USER,
        PolicyName="admin",
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        ),
    )
    key = iam0.create_access_key(UserName=ADMIN_USER)["AccessKey"]
    _enforce_now(endpoint)
    key_id, secret = key["AccessKeyId"], key["SecretAccessKey"]

    iam = _client("iam", endpoint, key_id, secret)
    s3 = _client("s3", endpoint, key_id, secret)
    account_id = user_arn.split(":")[4]  # arn:aws:iam::<account>:user/<name>
    for bucket in BUCKETS:
        s3.create_bucket(Bucket=bucket)
    provider_arn = iam.create_open_id_connect_provider(
        Url=oidc_issuer, ClientIDList=[sts_audience], ThumbprintList=["0" * 40]
    )["OpenIDConnectProviderArn"]
    issuer_host = urlparse(oidc_issuer)
    condition_key = f"{issuer_host.netloc}{issuer_host.path}:aud"
    trust = {
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": {"Federated": provider_arn},
            "Action": "sts:AssumeRoleWithWebIdentity",
            "Condition": {"StringEquals": {condition_key: sts_audience}},
        }],
    }
    role_arn = iam.create_role(
        RoleName=WEB_IDENTITY_ROLE, AssumeRolePolicyDocument=json.dumps(trust),
        MaxSessionDuration=3600,
    )["Role"]["Arn"]
    permissions = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
             "Resource": f"arn:aws:s3:::{DATA_BUCKET}"},
            {"Effect": "Allow",
             "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                        "s3:GetObjectAttributes"],
             "Resource": f"arn:aws:s3:::{DATA_BUCKET}/*"},
        ],
    }
    iam.put_role_policy(
        RoleName=WEB_IDENTITY_ROLE, PolicyName="stepguard-data-rw",
        PolicyDocument=json.dumps(permissions),
    )
    return AwsSetup(key_id, secret, provider_arn, role_arn, account_id)
