"""moto's server with AWS's web-identity semantics.

Run as ``python -m stepguard.testing.devstack._moto_main``.

Stock moto, with IAM enforcement on, differs from AWS in three ways that matter to stepguard:

* it demands a SigV4 signature on ``AssumeRoleWithWebIdentity``, which AWS serves unsigned (and
  botocore sends unsigned), so the call could never succeed;
* it never looks at the web identity token, so any string would buy the role's credentials;
* an unsigned request to an enforced API crashes it (HTTP 500) instead of being refused.

This launcher fixes both before starting the stock server: the call goes unsigned, and the token
is checked like STS does -- issuer registered as an IAM OIDC provider, signature against the
issuer's published JWKS, expiry, audience in the provider's client ids, and the role's trust
policy (federated principal, ``StringEquals``/``StringLike`` on ``<provider>:aud|sub``); and
unsigned requests get AWS's 403 answer.
"""

from __future__ import annotations

import fnmatch
import json
import sys
import threading
import time
import urllib.request
from typing import Any

UNSIGNED_STS_ACTIONS = frozenset({"AssumeRoleWithWebIdentity", "AssumeRoleWithSAML"})
_JWKS_CACHE: dict[str, tuple[float, dict[str, Any]]] = {}


def _fetch_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 -- issuer is http(s)
        return dict(json.loads(resp.read()))


def _jwks(issuer: str) -> dict[str, Any]:
    cached = _JWKS_CACHE.get(issuer)
    if cached and time.monotonic() - cached[0] < 30:
        return cached[1]
    config = _fetch_json(issuer.rstrip("/") + "/.well-known/openid-configuration")
    keys = _fetch_json(str(config["jwks_uri"]))
    _JWKS_CACHE[issuer] = (time.monotonic(), keys)
    return keys


def _strip_scheme(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _condition_holds(conditions: dict[str, Any], claims: dict[str, Any], prefix: str) -> bool:
    for operator, entries in conditions.items():
        for key, expected in entries.items():
            if not key.startswith(prefix + ":"):
                return False  # a condition we cannot evaluate never grants access
            actual = claims.get(key[len(prefix) + 1 :])  # "<provider>:aud" -> "aud"
            actual_values = [str(v) for v in _as_list(actual)] if actual is not None else []
            wanted = [str(v) for v in _as_list(expected)]
            if operator == "StringEquals":
                ok = any(a == w for a in actual_values for w in wanted)
            elif operator == "StringLike":
                ok = any(fnmatch.fnmatchcase(a, w) for a in actual_values for w in wanted)
            else:
                return False
            if not ok:
                return False
    return True


def validate_web_identity(iam: Any, role_arn: str, token: str) -> None:
    """Raise STSClientError unless ``token`` may assume ``role_arn`` (as AWS STS decides)."""
    import jwt
    from moto.sts.exceptions import STSClientError

    def reject(code: str, message: str) -> STSClientError:
        return STSClientError(code, message)

    try:
        unverified = jwt.decode(token, options={"verify_signature": False})
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise reject("InvalidIdentityToken", "Token is not a valid JWT") from exc
    issuer = str(unverified.get("iss", ""))
    provider = next(
        (p for p in iam.open_id_providers.values() if p.url == _strip_scheme(issuer)), None
    )
    if provider is None:
        raise reject("InvalidIdentityToken", "No OpenIDConnect provider found in your account")
    try:
        keys = {k.get("kid"): k for k in _jwks(issuer).get("keys", [])}
        jwk = keys.get(header.get("kid"))
        if jwk is None:
            raise reject("InvalidIdentityToken", "Signing key not published by the issuer")
        claims = jwt.decode(
            token,
            key=jwt.PyJWK(jwk).key,
            algorithms=["RS256", "RS384", "RS512", "ES256", "ES384"],
            audience=list(provider.client_id_list),
            issuer=issuer,
            options={"require": ["exp", "iat", "aud", "iss", "sub"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise reject("ExpiredTokenException", "Token expired") from exc
    except jwt.InvalidAudienceError as exc:
        raise reject("InvalidIdentityToken", "Incorrect token audience") from exc
    except (jwt.PyJWTError, OSError, ValueError, KeyError) as exc:
        raise reject("InvalidIdentityToken", "Token could not be validated") from exc

    role_name = role_arn.rsplit("/", 1)[-1]
    role = next((r for r in iam.roles.values() if r.name == role_name), None)
    if role is None:
        raise reject("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity")
    trust = role.assume_role_policy_document
    trust = json.loads(trust) if isinstance(trust, str) else trust
    for stmt in _as_list(trust.get("Statement", [])):
        federated = _as_list(stmt.get("Principal", {}).get("Federated", []))
        actions = _as_list(stmt.get("Action", []))
        if (
            stmt.get("Effect") == "Allow"
            and provider.arn in federated
            and ("sts:AssumeRoleWithWebIdentity" in actions or "sts:*" in actions)
            and _condition_holds(stmt.get("Condition", {}), claims, provider.url)
        ):
            return
    raise reject("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity")


def install() -> None:
    """Patch the in-process moto classes (this process only)."""
    from moto.core.exceptions import _RESTError
    from moto.core.responses import BaseResponse
    from moto.iam.access_control import IAMRequestBase, S3IAMRequest
    from moto.iam.models import iam_backends
    from moto.s3.exceptions import S3AccessDeniedError
    from moto.sts.responses import TokenResponse

    original_auth = BaseResponse._authenticate_and_authorize_normal_action

    def auth(self: Any, resource: str = "*") -> None:
        if getattr(self, "service_name", None) == "sts" and (
            self._get_action() in UNSIGNED_STS_ACTIONS
        ):
            return
        original_auth(self, resource)

    original_assume = TokenResponse.assume_role_with_web_identity

    def assume(self: Any) -> Any:
        iam = iam_backends[self.current_account][self.partition]
        validate_web_identity(
            iam, self._get_param("RoleArn") or "", self._get_param("WebIdentityToken") or ""
        )
        return original_assume(self)

    original_init = IAMRequestBase.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        headers = kwargs.get("headers", {})
        path = str(kwargs.get("path", ""))
        presigned = "X-Amz-Signature=" in path or "Signature=" in path
        if "Authorization" not in headers and not presigned:
            if isinstance(self, S3IAMRequest):
                raise S3AccessDeniedError()
            err = _RESTError(
                "MissingAuthenticationToken", "Request is missing Authentication Token"
            )
            err.code = 403
            raise err
        original_init(self, *args, **kwargs)

    IAMRequestBase.__init__ = init  # type: ignore[method-assign]
    BaseResponse._authenticate_and_authorize_normal_action = auth  # type: ignore[method-assign]
    TokenResponse.assume_role_with_web_identity = assume  # type: ignore[method-assign]


def _warm_backends() -> None:
    # moto imports a service's models on its first request; the dev stack's set-up calls
    # would pay for that one by one.
    import moto.s3.models
    import moto.s3.responses  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    from moto.server import main as moto_main

    install()  # imports the IAM and STS models already
    threading.Thread(target=_warm_backends, name="warm", daemon=True).start()
    moto_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
