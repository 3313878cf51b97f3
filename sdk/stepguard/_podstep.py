"""A step in a pod: the step runner (``stepguard exec``) is the pod's entrypoint.

Part of the composition layer, beside :mod:`stepguard.step`. For ``isolation.mode: pod`` the
orchestrator does not run the lifecycle itself; it prepares the pod and reads its receipt:

::

    spec + settings -> ConfigMap (step.json, settings.json, Vault CA, policy keys; no secret)
                    -> [wrapped login: mint credentials here, wrap them single-use]
                    -> NetworkPolicy (Vault, DNS, object store, OTLP only) + ConfigMap + Pod
                       running `stepguard exec --spec /etc/stepguard/step.json ... -- BODY`
                    -> inside: login (unwrap, or Vault JWT auth with the projected token),
                       verify inputs (object store), run the body, upload outputs, receipt
                    -> the receipt line read back, checked, returned -> everything deleted

Two ways for the pod to get its credentials (``pods.vault_login``):

* ``wrapped`` (default) -- the orchestrator opens the step's credential session and hands over
  one response-wrapped, single-use token (``STEPGUARD_WRAPPED_CREDENTIALS`` in the pod's env,
  TTL ``pods.wrap_ttl_s``). The env is where a pod spec puts values, but this value is worth
  nothing once the runner unwrapped it, and if anyone unwraps it first the runner's unwrap
  fails loudly -- a file would need a Secret or a ConfigMap, which is the same etcd. The
  orchestrator's session owns the leases and revokes them when the pod ends, however it ends.
* ``jwt`` -- nothing is minted outside the pod. The pod gets a projected service-account token
  whose audience is Vault's only (``pods.jwt_audience``), valid ``pods.token_expiry_s``, and
  the runner logs in with Vault's JWT auth (``pods.jwt_role``). The automounted API token stays
  off. A pod killed mid-step leaves leases that expire within the step token's heartbeat.

Inputs and outputs must be object-store URIs: a pod cannot bind the orchestrator's paths.
The receipt comes back as the runner's last log line (``stepguard-receipt: {...}``); when
``receipts.policy`` is set it must verify, and it must name this run and step. A step with an
object-store output also leaves the same receipt next to that output (``receipt.json``).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from stepguard._artifacts import is_uri
from stepguard.errors import (
    BodyFailed,
    ConfigurationError,
    IntegrityError,
    OperationalError,
    StepguardError,
)
from stepguard.receipt import Receipt
from stepguard.settings import Settings
from stepguard.spec import RunContext, StepSpec


class Step(typing.Protocol):
    """What a pod run needs of a :class:`stepguard.step.Step` (a protocol, so this module,
    which ``Step.run`` calls for ``mode: pod``, does not import the step module back)."""

    spec: StepSpec
    settings: Settings
    context: RunContext
    tracer_provider: object | None

__all__ = ["RECEIPT_MARKER", "check_pod_spec", "jwt_login", "pod_config", "pod_egress",
           "run_in_pod"]

#: Prefix of the one line the step runner prints with its receipt (``stepguard exec
#: --receipt-line``).
RECEIPT_MARKER = "stepguard-receipt: "
_CONFIG_DIR = "/etc/stepguard"
_TOKEN_PATH = "/var/run/secrets/stepguard/vault/token"  # noqa: S105 -- a path


def check_pod_spec(spec: StepSpec) -> None:
    """Refuse what a pod step cannot do: reach Vault or the object store with no network,
    host paths as inputs or outputs. Called where the spec is parsed (the Airflow operators at
    DAG parse) and again before the pod is made.

    >>> check_pod_spec(StepSpec.from_dict({"name": "t", "isolation": {"mode": "pod"},
    ...     "credentials": [{"name": "api", "kind": "kv", "path": "x"}]}))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    stepguard.errors.ConfigurationError: a pod with no network cannot reach Vault or the ...
    """
    if spec.isolation.network == "none" and (
            spec.credentials or any(is_uri(i.path) for i in spec.inputs)
            or any(is_uri(o.path) for o in spec.outputs)):
        # The step runner inside the pod reaches Vault and the object store itself.
        raise ConfigurationError(
            "a pod with no network cannot reach Vault or the object store",
            subject="isolation.network",
            hint="network: [] opens only Vault, DNS, the object store and OTLP (from "
                 "settings); add host:port entries for anything else")
    for kind, items in (("inputs", spec.inputs), ("outputs", spec.outputs)):
        for item in items:
            if not is_uri(item.path):
                raise ConfigurationError(
                    "a pod cannot bind host paths; give an object-store URI (s3://...)",
                    subject=f"{kind}.{item.name}.path")


def jwt_login(spec: StepSpec, settings: Settings) -> bool:
    """Whether the pod logs in itself with its projected token: ``pods.vault_login: jwt``, or a
    spec that asks for the token (``isolation.vault_kubernetes_auth``) -- the runner is then
    pointed at it, never left with a token it does not use."""
    return settings.pods.vault_login == "jwt" or spec.isolation.vault_kubernetes_auth


def _host_port(url: str, field: str) -> str:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    host = parts.hostname or ""
    if host == "localhost":
        host = "127.0.0.1"
    if not host:
        raise ConfigurationError("not a URL with a host", subject=field)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{host}:{port}"


def pod_egress(spec: StepSpec, settings: Settings) -> tuple[str, ...]:
    """The pod's egress allowlist: the spec's entries plus Vault, the object store and the
    OTLP collector as the pod sees them (DNS is always added by the policy).

    >>> s = Settings.from_dict({"vault": {"addr": "http://localhost:8200"},
    ...                         "pods": {"otlp_endpoint": "http://10.0.0.9:4318"}})
    >>> pod_egress(StepSpec.from_dict({"name": "t", "isolation": {"mode": "pod",
    ...     "network": []}, "credentials": [{"name": "api", "kind": "kv", "path": "x"}]}), s)
    ('127.0.0.1:8200', '10.0.0.9:4318')
    """
    entries = [] if spec.isolation.network == "none" else list(spec.isolation.network)
    vault = settings.pods.vault_addr or settings.vault.addr
    if vault and (spec.credentials or jwt_login(spec, settings)
                  or settings.receipts.signer == "transit"):
        entries.append(_host_port(vault, "pods.vault_addr"))
    if spec.storage is not None and spec.storage.endpoint_url:
        entries.append(_host_port(spec.storage.endpoint_url, "storage.endpoint_url"))
    if settings.pods.otlp_endpoint:
        entries.append(_host_port(settings.pods.otlp_endpoint, "pods.otlp_endpoint"))
    return tuple(dict.fromkeys(entries))


def pod_config(spec: StepSpec, settings: Settings) -> dict[str, str]:
    """The ConfigMap's files: ``step.json`` (run as ``process`` inside the pod, which is the
    isolation), ``settings.json`` (Vault as the pod sees it, the CA and policy keys by their
    mounted paths) and those files. Nothing secret can be in it: settings hold no secret, and a
    receipt signing key file is refused (sign receipts with Transit from a pod)."""
    files: dict[str, str] = {}
    inner = spec.to_dict()
    # The pod is the isolation; what the runner inside still checks is the GPU request (fail
    # clearly where none is visible, unless optional). shm_size is the pod's (a mounted
    # /dev/shm), so it stays outside.
    inner["isolation"] = {"mode": "process", "network": "none", "gpus": spec.isolation.gpus,
                          "gpus_optional": spec.isolation.gpus_optional}
    for i, inp in enumerate(inner.get("inputs") or ()):
        # A producer's receipt or a manifest on the orchestrator's disk travels in the
        # ConfigMap (neither holds a secret); an object URI or JSON text stays as it is.
        if inp.get("receipt") and not _inline(inp["receipt"]):
            inp["receipt"] = _read(inp["receipt"], f"inputs.{inp['name']}.receipt")
        if inp.get("manifest") and not _inline(inp["manifest"]):
            files[f"manifest-{i}.json"] = _read(inp["manifest"], f"inputs.{inp['name']}.manifest")
            inp["manifest"] = f"{_CONFIG_DIR}/manifest-{i}.json"
    data = settings.to_dict()
    data.pop("pods", None)
    data["state_dir"] = "/tmp/.stepguard"  # noqa: S108 -- the pod's private emptyDir
    data["audit"] = {"exporter": "both" if settings.pods.otlp_endpoint else "jsonl"}
    vault = dict(data.get("vault") or {})
    vault["addr"] = settings.pods.vault_addr or settings.vault.addr
    if settings.vault.ca_cert:
        files["vault-ca.pem"] = _read(settings.vault.ca_cert, "vault.ca_cert")
        vault["ca_cert"] = f"{_CONFIG_DIR}/vault-ca.pem"
    if jwt_login(spec, settings):
        if not settings.pods.jwt_role:
            raise ConfigurationError("JWT login from the pod needs a role",
                                     subject="pods.jwt_role")
        vault.update(auth="jwt", role=settings.pods.jwt_role, mount=settings.pods.jwt_mount,
                     jwt_path=_TOKEN_PATH)
    else:
        vault.update(auth="token", role=None, mount=None, jwt_path=None)
    data["vault"] = vault
    receipts = dict(data.get("receipts") or {})
    transit = receipts.get("signer") == "transit" or (
        receipts.get("policy") and settings.policy(receipts["policy"]).kind == "transit")
    if transit and not jwt_login(spec, settings):
        raise ConfigurationError(
            "receipts signed or checked with Transit need a Vault login inside the pod",
            subject="pods.vault_login", hint="set pods.vault_login: jwt (and pods.jwt_role)")
    if receipts.get("signer") == "key":
        raise ConfigurationError(
            "a receipt signing key file cannot be handed to a pod (a ConfigMap is not a secret)",
            subject="receipts.signer", hint="sign receipts with receipts.signer: transit")
    data["receipts"] = receipts
    for pname, policy in (data.get("policies") or {}).items():
        keys = []
        for i, path in enumerate(policy.get("public_keys") or ()):
            fname = f"policy-{pname}-{i}.pem"
            files[fname] = _read(path, f"policies.{pname}.public_keys")
            keys.append(f"{_CONFIG_DIR}/{fname}")
        if keys:
            policy["public_keys"] = keys
    files["step.json"] = json.dumps(inner, sort_keys=True)
    files["settings.json"] = json.dumps(data, sort_keys=True)
    return files


def _inline(value: str) -> bool:
    return is_uri(value) or value.lstrip().startswith("{")


def _read(path: str, field: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot read ({exc.strerror})", subject=field) from exc


def runner_command(command: Sequence[str], ctx: RunContext) -> list[str]:
    """The pod's command: the step runner around the body."""
    return ["stepguard", "exec", "--spec", f"{_CONFIG_DIR}/step.json",
            "--settings", f"{_CONFIG_DIR}/settings.json", "--receipt-line",
            "--pipeline", ctx.pipeline, "--run-id", ctx.run_id, "--step-id", ctx.step,
            "--try-number", str(ctx.try_number), "--orchestrator", ctx.orchestrator,
            "--", *command]


def receipt_from_log(log: bytes, ctx: RunContext, subject: str) -> Receipt | None:
    """The receipt on the runner's last marker line, if it printed one."""
    found = None
    for line in log.decode(errors="replace").splitlines():
        if line.startswith(RECEIPT_MARKER):
            found = line[len(RECEIPT_MARKER):]
    if found is None:
        return None
    receipt = Receipt.from_json(found)
    if receipt.context.run_id != ctx.run_id or receipt.context.step != ctx.step:
        raise IntegrityError("the pod's receipt is for another run or step", subject=subject,
                             details=[f"receipt: {receipt.context.run_id}/"
                                      f"{receipt.context.step}"])
    return receipt


class _Tee(io.RawIOBase):
    """The pod's log: kept (for the receipt line) and passed on to ``sink``."""

    def __init__(self, sink: Any) -> None:
        self.buf = bytearray()
        self.sink = sink

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.buf += data
        if self.sink is not None:
            self.sink.write(data)
        return len(data)

    def flush(self) -> None:
        if self.sink is not None:
            self.sink.flush()


@contextlib.contextmanager
def _handover(step: Step, ctx: RunContext) -> Iterator[tuple[dict[str, str], Any]]:
    """``(wrapped token env, session)``: the orchestrator's part of the wrapped login."""
    spec, settings = step.spec, step.settings
    if jwt_login(spec, settings) or not spec.credentials:
        yield {}, None
        return
    from stepguard.credentials import open_session, wrap_for_delivery
    from stepguard.wiring import vault_config

    ttl = spec.deadline_s + settings.vault.ttl_margin_s + settings.pods.wrap_ttl_s
    with open_session(spec.credentials, settings=vault_config(settings), context=ctx,
                      ttl_s=ttl, policies=spec.policies) as session:
        delivery = wrap_for_delivery(session, ttl_s=settings.pods.wrap_ttl_s)
        yield delivery.env(), session


def run_in_pod(step: Step, command: Sequence[str], *, kube_api: Any = None,
               stdout: Any = None, poll_s: float = 1.0,
               volumes: Sequence[Mapping[str, Any]] = (),
               volume_mounts: Sequence[Mapping[str, Any]] = ()) -> Receipt:
    """Run ``command`` under the step runner in a pod; return the pod's checked receipt.

    ``volumes``/``volume_mounts`` (plain Kubernetes dicts) are added to the pod's own (merged by
    :func:`stepguard.isolation.merge_volumes`: a clash with scratch, home or ``/dev/shm`` is
    refused, never a silent replacement)."""
    import dataclasses

    from stepguard.isolation import default_pod_name, run_isolated
    from stepguard.wiring import StepAudit, check_receipt

    spec, settings, ctx = step.spec, step.settings, step.context
    check_pod_spec(spec)
    if not settings.pods.image and not spec.isolation.image:
        raise ConfigurationError("a pod step needs the runtime image", subject="pods.image")
    iso = dataclasses.replace(
        spec.isolation, image=spec.isolation.image or settings.pods.image,
        network=pod_egress(spec, settings) if spec.isolation.network != "none" else "none",
        vault_kubernetes_auth=jwt_login(spec, settings))
    files = pod_config(spec, settings)
    name = default_pod_name(ctx)
    env = {**spec.env, "STEPGUARD_POD": name}
    if settings.pods.otlp_endpoint:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = settings.pods.otlp_endpoint
    audit = StepAudit(settings, step.tracer_provider)
    tee = _Tee(stdout if stdout is not None else getattr(sys.stdout, "buffer", None))
    started = time.monotonic()
    with audit.step(spec, ctx), _handover(step, ctx) as (wrapped, _session):
        env.update(audit.trace_env())
        with audit.control("isolation", "run", mode="pod"):
            result = run_isolated(
                runner_command(command, ctx), iso, env=env, deadline_s=spec.deadline_s,
                context=ctx, kube_api=kube_api, wrapped_token_env=wrapped or None,
                pod_name=name,
                stdout=typing.cast("typing.IO[bytes]", tee), pod_options={
                    "config_map": files, "poll_s": poll_s,
                    "vault_audience": settings.pods.jwt_audience,
                    "vault_token_expiry_s": settings.pods.token_expiry_s,
                    "user_volumes": tuple(volumes), "user_volume_mounts": tuple(volume_mounts)})
    audit.flush()
    subject = f"pod {result.pod_name}"
    receipt = receipt_from_log(bytes(tee.buf), ctx, subject)
    if receipt is None:
        raise OperationalError(
            f"the pod ended (exit {result.exit_code}) without a receipt from its step runner",
            subject=subject, details=[f"after {time.monotonic() - started:.1f}s"])
    receipt = check_receipt(receipt, settings)
    if receipt.status != "succeeded" or result.exit_code != 0:
        raise _failure(receipt, spec.name, result.exit_code)
    return receipt


def _failure(receipt: Receipt, name: str, exit_code: int) -> StepguardError:
    """The pod step's own typed error (an integrity verdict stays one), receipt attached."""
    from stepguard import errors

    rec = receipt.error
    cls = getattr(errors, rec.type, None) if rec is not None else None
    err: StepguardError
    if rec is not None and isinstance(cls, type) and issubclass(cls, StepguardError):
        err = cls(f"in the pod: {rec.message}", subject=rec.subject or name)
    else:
        err = BodyFailed(f"the step in the pod failed (exit {exit_code})", subject=name)
    err.receipt = receipt  # type: ignore[attr-defined]
    return err
