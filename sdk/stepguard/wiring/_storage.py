"""Just-in-time credentials -> S3 clients, for every place data moves.

A step, an operator or the registry never holds static AWS keys: the keys come from one of the
step's credentials (``aws_web_identity`` through Vault identity tokens, ``aws_sts`` or
``aws_iam`` from the AWS secrets engine), minted for the step and gone when it ends. Without a
credential the client is boto3's default chain (an instance or pod role); a worker with
nothing there cannot reach the bucket, and the call fails as an operational error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

_KEYS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")


def _reveal(values: Mapping[str, Any], key: str) -> str | None:
    value = values.get(key)
    if value is None:
        return None
    reveal = getattr(value, "get_secret_value", None)
    text = reveal() if callable(reveal) else value
    return str(text) if text else None


def s3_client(credential: Mapping[str, Any] | None = None, *,
              endpoint_url: str | None = None, region: str | None = None) -> Any:
    """A boto3 S3 client made from one just-in-time AWS credential's values.

    ``credential`` is a credential's values as a step holds them (``session.values[name]``,
    ``step_env.credentials[name]``: values that never print) or a plain mapping with
    ``aws_access_key_id``/``aws_secret_access_key``/``aws_session_token``. ``endpoint_url``
    defaults to ``AWS_ENDPOINT_URL``. Ambient keys in the environment are never mixed with the
    credential's.

    >>> from stepguard.credentials import SecretMapping
    >>> creds = SecretMapping({"aws_access_key_id": "AKIDEXAMPLE",
    ...                        "aws_secret_access_key": "canary-secret"})
    >>> client = s3_client(creds, endpoint_url="http://127.0.0.1:9", region="us-east-1")
    >>> client.meta.endpoint_url
    'http://127.0.0.1:9'
    """
    import boto3
    from botocore.config import Config

    kwargs: dict[str, Any] = {
        "region_name": region or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "config": Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10,
                         read_timeout=60, max_pool_connections=32),
    }
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    if credential is not None:
        keys = {k: _reveal(credential, k) for k in _KEYS}
        if not keys["aws_access_key_id"] or not keys["aws_secret_access_key"]:
            from stepguard.errors import ConfigurationError

            raise ConfigurationError("the credential holds no AWS keys (use an aws_* kind)",
                                     subject="storage.credential")
        kwargs.update(keys)
    return boto3.session.Session().client("s3", **kwargs)
