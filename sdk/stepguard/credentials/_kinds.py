"""Issuing one credential per :class:`~stepguard.spec.CredentialRequest` kind."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stepguard.errors import (
    ConfigurationError,
    CredentialDenied,
    CredentialError,
    TransientCredentialError,
)

if TYPE_CHECKING:
    from stepguard.credentials._api import VaultApi
    from stepguard.spec import CredentialRequest, RunContext

log = logging.getLogger("stepguard.credentials")

#: STS RoleSessionName: 2..64 of [\w+=,.@-].
_SESSION_CHARS = re.compile(r"[^\w+=,.@-]")


@dataclass(frozen=True)
class Issued:
    """What one issuance produced. ``values`` are plain strings: wrap them before exposing."""

    kind: str
    values: dict[str, str] = field(repr=False)
    lease_id: str | None = field(default=None, repr=False)
    lease_duration_s: int = 0
    renewable: bool = False
    revocable: bool = False
    static: bool = False
    #: Wall-clock seconds Vault (or STS) took to mint it, for the benchmark.
    issue_s: float = 0.0


def session_name(ctx: RunContext) -> str:
    """An STS RoleSessionName carrying the run and step ids (AWS allows 64 characters).

    >>> from stepguard.spec import RunContext
    >>> session_name(RunContext(pipeline="p", run_id="manual__2026-01-01T00:00:00", step="train"))
    'sg.manual__2026-01-01T00-00-00.train.1'
    """
    run = _SESSION_CHARS.sub("-", ctx.run_id)
    step = _SESSION_CHARS.sub("-", ctx.step)
    suffix = f".{step[:24]}.{ctx.try_number}"
    return f"sg.{run[: 64 - 3 - len(suffix)]}{suffix}"


def _data(body: dict[str, Any] | None, path: str) -> dict[str, Any]:
    data = (body or {}).get("data")
    if not isinstance(data, dict):
        raise CredentialError("Vault returned no data", subject=path)
    return data


def _strings(data: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        if value is None:
            continue
        out[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return out


def _lease(body: dict[str, Any] | None) -> tuple[str | None, int, bool]:
    b = body or {}
    return (str(b["lease_id"]) if b.get("lease_id") else None,
            int(b.get("lease_duration") or 0), bool(b.get("renewable")))


def issue(api: VaultApi, req: CredentialRequest, ctx: RunContext, *, ttl_s: float) -> Issued:
    """Mint the credential ``req`` asks for with ``api``'s (step) token."""
    started = time.monotonic()
    issued = _ISSUERS[req.kind](api, req, ctx, ttl_s)
    return Issued(kind=issued.kind, values=issued.values, lease_id=issued.lease_id,
                  lease_duration_s=issued.lease_duration_s, renewable=issued.renewable,
                  revocable=issued.revocable, static=issued.static,
                  issue_s=time.monotonic() - started)


def _database(api: VaultApi, req: CredentialRequest, ctx: RunContext, ttl_s: float) -> Issued:
    path = f"{req.mount or 'database'}/creds/{req.role}"
    body = api.request("GET", path, what=f"database credential {req.name!r}")
    data = _data(body, path)
    if not data.get("username") or not data.get("password"):
        raise CredentialError("database credential lacks username/password", subject=path)
    lease_id, duration, renewable = _lease(body)
    return Issued("database", {"username": str(data["username"]),
                               "password": str(data["password"])},
                  lease_id, duration, renewable, revocable=lease_id is not None)


def _aws_values(data: dict[str, Any], path: str) -> dict[str, str]:
    key_id, secret = data.get("access_key"), data.get("secret_key")
    if not key_id or not secret:
        raise CredentialError("AWS credential lacks access_key/secret_key", subject=path)
    values = {"aws_access_key_id": str(key_id), "aws_secret_access_key": str(secret)}
    # Vault < 1.13 names it security_token; later versions session_token.
    session = data.get("session_token") or data.get("security_token")
    if session:
        values["aws_session_token"] = str(session)
    return values


def _aws_iam(api: VaultApi, req: CredentialRequest, ctx: RunContext, ttl_s: float) -> Issued:
    path = f"{req.mount or 'aws'}/creds/{req.role}"
    body = api.request("GET", path, what=f"AWS IAM-user credential {req.name!r}")
    values = _aws_values(_data(body, path), path)
    lease_id, duration, renewable = _lease(body)
    timeout = float(req.params.get("propagation_timeout_s",
                                   api.config.iam_propagation_timeout_s))
    if req.params.get("wait_until_usable", "true").lower() != "false":
        try:
            wait_until_usable(values, endpoint=req.params.get("sts_endpoint")
                              or api.config.sts_endpoint,
                              region=req.params.get("region") or api.config.aws_region,
                              timeout_s=timeout, subject=path)
        except BaseException:
            # The session never sees this lease: revoke the IAM user here, not at TTL.
            if lease_id:
                try:
                    api.request("PUT", "sys/leases/revoke", what="unusable IAM user revocation",
                                json={"lease_id": lease_id})
                except CredentialError as exc:
                    log.warning("revoking the unusable IAM user failed (%s)",
                                type(exc).__name__)
            raise
    return Issued("aws_iam", values, lease_id, duration, renewable,
                  revocable=lease_id is not None)


def _aws_sts(api: VaultApi, req: CredentialRequest, ctx: RunContext, ttl_s: float) -> Issued:
    path = f"{req.mount or 'aws'}/sts/{req.role}"
    payload: dict[str, Any] = {"ttl": req.params.get("ttl", f"{max(900, int(ttl_s))}s")}
    if req.params.get("role_arn"):
        payload["role_arn"] = req.params["role_arn"]
    if req.params.get("session_name", "true").lower() != "false":
        payload["role_session_name"] = session_name(ctx)
    body = api.request("POST", path, what=f"AWS STS credential {req.name!r}", json=payload)
    values = _aws_values(_data(body, path), path)
    lease_id, duration, _ = _lease(body)
    # STS credentials cannot be revoked, only expire: record that honestly.
    return Issued("aws_sts", values, lease_id, duration, renewable=False, revocable=False)


def _sts_client(endpoint: str | None, region: str, *, unsigned: bool = False,
                values: dict[str, str] | None = None) -> Any:
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    cfg = Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 3,
                                                             "mode": "standard"},
                 signature_version=UNSIGNED if unsigned else None)
    kwargs: dict[str, Any] = {"region_name": region, "config": cfg}
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    if values is not None:
        kwargs.update(aws_access_key_id=values["aws_access_key_id"],
                      aws_secret_access_key=values["aws_secret_access_key"],
                      aws_session_token=values.get("aws_session_token"))
    elif unsigned:
        # Never pick up ambient keys for a call that must prove it needs none.
        kwargs.update(aws_access_key_id="unused", aws_secret_access_key="unused")  # noqa: S106
    return boto3.session.Session().client("sts", **kwargs)


def wait_until_usable(values: dict[str, str], *, endpoint: str | None, region: str,
                      timeout_s: float, subject: str) -> float:
    """Poll STS GetCallerIdentity with new IAM keys until IAM has propagated them (bounded).

    Returns the seconds waited. IAM is eventually consistent: fresh keys can be refused for
    5-10 s, so a step would otherwise fail at random on its first call. Every refusal is
    retried, after 0.2 s doubling to at most 2 s (plus up to 0.2 s of jitter, so steps that
    start together do not poll in step), until the next wait would pass ``timeout_s``; then
    :class:`~stepguard.errors.TransientCredentialError` names the last refusal.
    """
    from botocore.exceptions import BotoCoreError, ClientError
    from tenacity import (
        RetryCallState,
        Retrying,
        retry_if_exception_type,
        stop_before_delay,
        wait_exponential_jitter,
    )

    def reason(exc: BaseException | None) -> str:
        if isinstance(exc, ClientError):
            return str(exc.response.get("Error", {}).get("Code", "ClientError"))
        return type(exc).__name__

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.info("new AWS IAM keys not usable yet (%s); polling", reason(exc))

    started = time.monotonic()
    retrying = Retrying(
        retry=retry_if_exception_type((ClientError, BotoCoreError)),
        stop=stop_before_delay(timeout_s),
        wait=wait_exponential_jitter(initial=0.2, max=2.0, jitter=0.2),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        retrying(lambda: _sts_client(endpoint, region, values=values).get_caller_identity())
    except (ClientError, BotoCoreError) as exc:
        # Not chained: the refusal carries nothing the details below do not say.
        raise TransientCredentialError(
            "new AWS IAM keys did not become usable in time", subject=subject,
            details=(f"last failure: {reason(exc)}", f"waited {timeout_s:.0f} s"),
            hint="IAM is eventually consistent; raise propagation_timeout_s if this recurs",
        ) from None
    return time.monotonic() - started


def _aws_web_identity(api: VaultApi, req: CredentialRequest, ctx: RunContext,
                      ttl_s: float) -> Issued:
    from botocore.exceptions import BotoCoreError, ClientError

    assert req.role
    if req.role.startswith("arn:"):
        role_arn, oidc_role = req.role, req.params.get("oidc_role", api.config.oidc_role)
    else:
        oidc_role, role_arn = req.role, req.params.get("role_arn", "")
        if not role_arn:
            raise ConfigurationError("aws_web_identity needs the AWS role ARN (role: arn:... or "
                                     "params.role_arn)", subject=f"credentials.{req.name}")
    path = f"identity/oidc/token/{oidc_role}"
    started = time.monotonic()
    body = api.request("GET", path, what=f"identity token for {req.name!r}")
    token = _data(body, path).get("token")
    if not token:
        raise CredentialError("Vault returned no identity token", subject=path)
    # AWS roles allow one hour unless raised (MaxSessionDuration); asking for more fails the
    # whole step, so longer sessions are opt-in through params.duration_s.
    duration = int(req.params.get("duration_s", max(900, min(int(ttl_s), 3600))))
    endpoint = req.params.get("sts_endpoint") or api.config.sts_endpoint
    region = req.params.get("region") or api.config.aws_region
    try:
        resp = _sts_client(endpoint, region, unsigned=True).assume_role_with_web_identity(
            RoleArn=role_arn, RoleSessionName=session_name(ctx), WebIdentityToken=str(token),
            DurationSeconds=duration)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "ClientError"))
        if code in {"AccessDenied", "InvalidIdentityToken", "ExpiredTokenException",
                    "IDPRejectedClaim"}:
            raise CredentialDenied(f"STS refused the web identity ({code})",
                                   subject=role_arn) from exc
        raise CredentialError(f"STS AssumeRoleWithWebIdentity failed ({code})",
                              subject=role_arn) from exc
    except BotoCoreError as exc:
        raise TransientCredentialError(
            f"STS unreachable ({type(exc).__name__})", subject=endpoint or "sts") from exc
    creds = resp["Credentials"]
    values = {"aws_access_key_id": str(creds["AccessKeyId"]),
              "aws_secret_access_key": str(creds["SecretAccessKey"]),
              "aws_session_token": str(creds["SessionToken"])}
    del started
    return Issued("aws_web_identity", values, None, duration, renewable=False, revocable=False)


def _kv(api: VaultApi, req: CredentialRequest, ctx: RunContext, ttl_s: float) -> Issued:
    assert req.path
    path = f"{req.mount or 'secret'}/data/{req.path.strip('/')}"
    if req.params.get("version"):
        path += f"?version={int(req.params['version'])}"
    body = api.request("GET", path, what=f"KV secret {req.name!r}")
    data = _data(body, path).get("data")
    if not isinstance(data, dict):
        raise CredentialError("KV secret has no data (deleted version?)", subject=path)
    return Issued("kv", _strings(data), None, 0, renewable=False, revocable=False, static=True)


def _dynamic(api: VaultApi, req: CredentialRequest, ctx: RunContext, ttl_s: float) -> Issued:
    assert req.path
    path = (f"{req.mount.strip('/')}/" if req.mount else "") + req.path.strip("/")
    method = req.params.get("method", "GET").upper()
    if method not in {"GET", "POST", "PUT"}:
        raise ConfigurationError("method must be GET, POST or PUT",
                                 subject=f"credentials.{req.name}.params.method")
    payload = {k: v for k, v in req.params.items() if k != "method"} if method != "GET" else None
    body = api.request(method, path, what=f"dynamic secret {req.name!r}", json=payload)
    lease_id, duration, renewable = _lease(body)
    return Issued("dynamic", _strings(_data(body, path)), lease_id, duration, renewable,
                  revocable=lease_id is not None, static=lease_id is None)


_ISSUERS = {
    "database": _database,
    "aws_iam": _aws_iam,
    "aws_sts": _aws_sts,
    "aws_web_identity": _aws_web_identity,
    "kv": _kv,
    "dynamic": _dynamic,
}
