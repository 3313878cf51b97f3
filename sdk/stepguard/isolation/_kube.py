"""Running a body as a restricted pod through the Kubernetes API.

Only these calls are made, so a stand-in needs exactly them (the tests use a small in-memory fake
because no API server can run in CI):

* ``networking.create_namespaced_network_policy(namespace, body)``
* ``networking.delete_namespaced_network_policy(name, namespace)``
* ``core.create_namespaced_pod(namespace, body)``
* ``core.read_namespaced_pod(name, namespace)`` -> ``.status.phase``, ``.status.reason``,
  ``.status.container_statuses[0].state.terminated.exit_code``
* ``core.read_namespaced_pod_log(name, namespace, follow=True, _preload_content=False)`` ->
  an object with ``.stream(amt)`` yielding bytes and ``.release_conn()``
* ``core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)``
* ``core.create_namespaced_config_map(namespace, body)`` and
  ``core.delete_namespaced_config_map(name, namespace)`` -- only when the step runner in the pod
  gets a ConfigMap (its spec, settings and Vault CA; never a secret)

The NetworkPolicy is created before the pod, so the pod never runs unfenced, then the ConfigMap,
then the pod; all three are deleted in ``finally`` -- after success, failure, the deadline,
KeyboardInterrupt or SIGTERM.

:class:`stepguard.testing.kubeplay.PodmanKube` implements exactly these calls with ``podman kube
play`` of the same manifests, so the tests run our pods in a real container runtime; the API
server itself (admission, NetworkPolicy enforcement) stays at the contract level.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from stepguard._private.signals import Terminated, unwind_on
from stepguard.errors import ConfigurationError, IsolationError, StepTimeout
from stepguard.isolation._check import assert_pod_ok
from stepguard.isolation._pod import build_config_map, build_network_policy, build_pod
from stepguard.isolation._result import RunResult
from stepguard.spec import IsolationSpec, RunContext

_SCHEDULE_SLACK_S = 120.0
_FINAL_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass
class KubeApi:
    """The two API groups used; build one from the kubernetes client, or pass a stand-in."""

    core: Any
    networking: Any

    @classmethod
    def from_environment(cls) -> KubeApi:
        """``$STEPGUARD_KUBE_API`` (``module:factory``, a callable returning a KubeApi: e.g.
        ``stepguard.testing.kubeplay:from_environment`` runs pods in podman), else the
        in-cluster configuration when running in a pod, else the local kubeconfig."""
        factory = os.environ.get("STEPGUARD_KUBE_API", "").strip()
        if factory:
            import importlib

            module, _, attr = factory.partition(":")
            try:
                made = getattr(importlib.import_module(module), attr or "from_environment")()
            except (ImportError, AttributeError) as exc:
                raise ConfigurationError("cannot load the Kubernetes API factory",
                                         subject="STEPGUARD_KUBE_API") from exc
            if not isinstance(made, KubeApi):
                raise ConfigurationError("the factory did not return a KubeApi",
                                         subject="STEPGUARD_KUBE_API")
            return made
        try:
            from kubernetes import client, config  # type: ignore[import-untyped]
        except ImportError as exc:
            raise IsolationError("the kubernetes client is not installed", subject="kubernetes",
                                 hint="pip install kubernetes") from exc
        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config()
            except (config.ConfigException, OSError) as exc:
                raise IsolationError("no Kubernetes configuration found",
                                     subject="kubeconfig") from exc
        return cls(client.CoreV1Api(), client.NetworkingV1Api())


def _follow_logs(api: KubeApi, name: str, namespace: str, sink: IO[bytes]) -> None:
    try:
        resp = api.core.read_namespaced_pod_log(name, namespace, follow=True,
                                                _preload_content=False)
    except Exception:  # logs are best effort; the exit status is the verdict
        return
    try:
        for chunk in resp.stream(4096):
            sink.write(chunk)
            sink.flush()
    except Exception:  # noqa: S110 -- a dropped log stream must not fail the step
        pass
    finally:
        with contextlib.suppress(Exception):
            resp.release_conn()


def _exit_code(pod: Any) -> int | None:
    statuses = getattr(pod.status, "container_statuses", None) or []
    for st in statuses:
        term = getattr(getattr(st, "state", None), "terminated", None)
        if term is not None:
            return int(term.exit_code)
    return None


def _poll_until_done(observe: Callable[[], str], *, end: float, poll_s: float) -> str:
    """Call ``observe()`` every ``poll_s`` seconds until it returns a final phase
    (``Succeeded``/``Failed``), or ``"Timeout"`` once the monotonic clock passes ``end``.

    A watch on a deadline, not a retry: an exception from ``observe`` (a lost pod, Ctrl-C,
    SIGTERM) ends the poll at once and propagates; the interval is fixed, it is the caller's
    seam (tests poll every few milliseconds).

    >>> phases = iter(["Pending", "Running", "Succeeded"])
    >>> _poll_until_done(lambda: next(phases), end=time.monotonic() + 5, poll_s=0.001)
    'Succeeded'
    >>> _poll_until_done(lambda: "Running", end=time.monotonic() + 0.01, poll_s=0.001)
    'Timeout'
    """
    from tenacity import Retrying, retry_if_result, wait_fixed

    poll = Retrying(
        retry=retry_if_result(lambda phase: phase not in _FINAL_PHASES),
        stop=lambda state: time.monotonic() >= end,
        wait=wait_fixed(poll_s),
        retry_error_callback=lambda state: "Timeout",
    )
    phase: str = poll(observe)
    return phase


def default_pod_name(context: RunContext) -> str:
    """``sg-<step>-<random>``: unique, DNS-1123, traceable to the step."""
    step = "".join(ch if ch.isalnum() else "-" for ch in context.step.lower())[:40].strip("-")
    return f"sg-{step or 'step'}-{secrets.token_hex(4)}"


def run_pod(
    command: Sequence[str],
    spec: IsolationSpec,
    *,
    env: Mapping[str, str],
    secret_files: Mapping[str, bytes],
    deadline_s: float,
    context: RunContext,
    name: str | None = None,
    stdout: Any = None,
    api: KubeApi | None = None,
    gpus: int | None = None,
    wrapped_token_env: Mapping[str, str] | None = None,
    poll_s: float = 1.0,
    config_map: Mapping[str, str] | None = None,
    vault_audience: str | None = None,
    vault_token_expiry_s: int | None = None,
    user_volumes: Sequence[Mapping[str, Any]] = (),
    user_volume_mounts: Sequence[Mapping[str, Any]] = (),
) -> RunResult:
    """Create NetworkPolicy (+ ConfigMap) + Pod, follow the logs, wait, and delete them all on
    every path. ``config_map`` (file name -> text) is mounted read-only at ``/etc/stepguard``;
    ``user_volumes``/``user_volume_mounts`` are merged into the pod's own (``build_pod``)."""
    if secret_files:
        raise ConfigurationError(
            "secret files cannot be handed to a pod without storing them in the cluster; "
            "the step runner inside the pod obtains credentials itself",
            subject="secret_files",
        )
    if gpus is not None and gpus != spec.gpus:
        from dataclasses import replace

        spec = replace(spec, gpus=gpus)
    if deadline_s <= 0:
        raise StepTimeout("the deadline passed before the pod could be created",
                          subject=name or context.step)
    name = name or default_pod_name(context)
    namespace = spec.namespace or "default"
    extra: dict[str, Any] = {}
    if vault_audience is not None:
        extra["vault_audience"] = vault_audience
    if vault_token_expiry_s is not None:
        extra["vault_token_expiry_s"] = vault_token_expiry_s
    cmap = None if config_map is None else build_config_map(
        name, config_map, context=context, namespace=spec.namespace)
    pod = build_pod(spec, name=name, command=command, env=env, context=context,
                    wrapped_token_env=wrapped_token_env, deadline_s=deadline_s,
                    config_map=name if cmap is not None else None,
                    user_volumes=user_volumes, user_volume_mounts=user_volume_mounts, **extra)
    policy = build_network_policy(spec, name=name, context=context)
    # Our own manifests, checked like anyone's: a regression here must fail before creation.
    assert_pod_ok(pod, schema=False)
    api = api or KubeApi.from_environment()
    sink: IO[bytes]
    close_sink = False
    if stdout is None:
        sink = sys.stdout.buffer
    elif isinstance(stdout, (str, os.PathLike)):
        sink = open(os.fspath(stdout), "wb")  # noqa: SIM115 -- closed in finally below
        close_sink = True
    else:
        sink = stdout
    created_policy = created_pod = created_cmap = False
    start = time.monotonic()
    logs: threading.Thread | None = None
    try:
        with unwind_on(signal.SIGTERM, take_over=True):
            try:
                api.networking.create_namespaced_network_policy(namespace, policy)
                created_policy = True
                if cmap is not None:
                    api.core.create_namespaced_config_map(namespace, cmap)
                    created_cmap = True
                api.core.create_namespaced_pod(namespace, pod)
                created_pod = True
            except Exception as exc:
                raise IsolationError(f"could not create the pod ({type(exc).__name__})",
                                     subject=f"{namespace}/{name}",
                                     details=list(getattr(exc, "details", None) or [])) from exc
            end = start + deadline_s + _SCHEDULE_SLACK_S
            current: Any = None

            def observe() -> str:
                nonlocal current, logs
                try:
                    current = api.core.read_namespaced_pod(name, namespace)
                except Exception as exc:
                    raise IsolationError(f"lost track of the pod ({type(exc).__name__})",
                                         subject=f"{namespace}/{name}") from exc
                phase = str(current.status.phase)
                if logs is None and phase != "Pending":
                    logs = threading.Thread(target=_follow_logs, args=(api, name, namespace, sink),
                                            daemon=True)
                    logs.start()
                return phase

            phase = _poll_until_done(observe, end=end, poll_s=poll_s)
            if logs is not None:
                logs.join(timeout=10)
            duration = time.monotonic() - start
            reason = str(getattr(current.status, "reason", "") or "")
            timed_out = phase == "Timeout" or reason == "DeadlineExceeded"
            code = _exit_code(current)
            result = RunResult(
                exit_code=code if code is not None else (-int(signal.SIGKILL) if timed_out else 1),
                duration_s=duration, mode="pod", killed_by_deadline=timed_out,
                limits=tuple(f"pod:{k}={v}" for k, v in sorted(
                    pod["spec"]["containers"][0]["resources"]["limits"].items())),
                gpus_visible=spec.gpus > 0,
                network="none" if spec.network == "none" else "allowlist",
                stdout_path=os.fspath(stdout) if close_sink else None,
                pod_name=name,
            )
            if timed_out:
                err = StepTimeout(f"pod exceeded its deadline of {deadline_s:.1f}s and was deleted",
                                  subject=f"{namespace}/{name}", details=[f"phase: {phase}"])
                err.result = result  # type: ignore[attr-defined]
                raise err
            return result
    except Terminated:
        raise IsolationError("terminated (SIGTERM); the pod and its policy were deleted",
                             subject=f"{namespace}/{name}") from None
    finally:
        problems: list[str] = []
        if created_pod:
            try:
                api.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
            except Exception as exc:  # reported below; the policy is still deleted
                problems.append(f"pod {namespace}/{name}: {type(exc).__name__}")
        if created_cmap:
            try:
                api.core.delete_namespaced_config_map(name, namespace)
            except Exception as exc:
                problems.append(f"configmap {namespace}/{name}: {type(exc).__name__}")
        if created_policy:
            try:
                api.networking.delete_namespaced_network_policy(name, namespace)
            except Exception as exc:
                problems.append(f"networkpolicy {namespace}/{name}: {type(exc).__name__}")
        if close_sink:
            sink.close()
        if problems and sys.exc_info()[0] is None:
            raise IsolationError("could not delete what the step created",
                                 subject=f"{namespace}/{name}", details=problems)
