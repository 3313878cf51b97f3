"""The pod runner's lifecycle: create policy + pod, follow logs, wait, delete both on every path.

No Kubernetes API server can run here, so the runner talks to ``FakeKube`` below: a small
in-memory stand-in implementing only the calls the runner makes (listed in
``stepguard.isolation._kube``). It records every object created and deleted, so the tests can
assert that nothing is left behind -- on success, failure, deadline, KeyboardInterrupt, SIGTERM,
and when creation itself fails.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from stepguard.errors import ConfigurationError, IsolationError, StepTimeout
from stepguard.isolation import check_pod, run_isolated
from stepguard.isolation._kube import KubeApi, run_pod
from stepguard.spec import IsolationSpec, RunContext

IMAGE = "ghcr.io/acme/train@sha256:" + "ab" * 32
SPEC = IsolationSpec(mode="pod", image=IMAGE, namespace="ml")
CTX = RunContext(pipeline="p", run_id="r-1", step="train")


class _Logs:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.released = False

    def stream(self, amt: int) -> Any:
        yield from self.chunks

    def release_conn(self) -> None:
        self.released = True


class FakeKube:
    """Pods go Pending -> Running -> (Succeeded | Failed) after ``run_polls`` reads."""

    def __init__(self, *, exit_code: int = 0, run_polls: int = 2, logs: list[bytes] | None = None,
                 fail_create_pod: bool = False, never_finish: bool = False,
                 deadline_exceeded: bool = False) -> None:
        self.exit_code = exit_code
        self.run_polls = run_polls
        self.logs = logs or [b"epoch 1\n", b"epoch 2\n"]
        self.fail_create_pod = fail_create_pod
        self.never_finish = never_finish
        self.deadline_exceeded = deadline_exceeded
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.policies: dict[tuple[str, str], dict[str, Any]] = {}
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.reads = 0
        self.core = self
        self.networking = self

    # networking.k8s.io/v1
    def create_namespaced_network_policy(self, namespace: str, body: dict[str, Any]) -> None:
        self.policies[(namespace, body["metadata"]["name"])] = body
        self.created.append("networkpolicy")

    def delete_namespaced_network_policy(self, name: str, namespace: str) -> None:
        del self.policies[(namespace, name)]
        self.deleted.append("networkpolicy")

    # core/v1
    def create_namespaced_pod(self, namespace: str, body: dict[str, Any]) -> None:
        if self.fail_create_pod:
            raise RuntimeError("403 Forbidden: violates PodSecurity")
        assert (namespace, body["metadata"]["name"]) in self.policies, "pod before its policy"
        self.pods[(namespace, body["metadata"]["name"])] = body
        self.created.append("pod")

    def read_namespaced_pod(self, name: str, namespace: str) -> Any:
        assert (namespace, name) in self.pods
        self.reads += 1
        if self.reads == 1:
            return SimpleNamespace(status=SimpleNamespace(phase="Pending", reason=None,
                                                          container_statuses=None))
        if self.never_finish or self.reads <= self.run_polls:
            return SimpleNamespace(status=SimpleNamespace(phase="Running", reason=None,
                                                          container_statuses=[]))
        if self.deadline_exceeded:
            return SimpleNamespace(status=SimpleNamespace(
                phase="Failed", reason="DeadlineExceeded", container_statuses=[]))
        term = SimpleNamespace(exit_code=self.exit_code)
        return SimpleNamespace(status=SimpleNamespace(
            phase="Succeeded" if self.exit_code == 0 else "Failed", reason=None,
            container_statuses=[SimpleNamespace(state=SimpleNamespace(terminated=term))]))

    def read_namespaced_pod_log(self, name: str, namespace: str, *, follow: bool,
                                _preload_content: bool) -> _Logs:
        assert follow and not _preload_content
        return _Logs(self.logs)

    def delete_namespaced_pod(self, name: str, namespace: str, *,
                              grace_period_seconds: int) -> None:
        del self.pods[(namespace, name)]
        self.deleted.append("pod")

    @property
    def api(self) -> KubeApi:
        return KubeApi(self, self)

    def assert_clean(self) -> None:
        assert self.pods == {} and self.policies == {}


def test_success_streams_logs_and_deletes_everything() -> None:
    kube = FakeKube()
    sink = io.BytesIO()
    res = run_isolated(["python", "train.py"], SPEC, deadline_s=60, context=CTX,
                       pod_name="sg-train-1", kube_api=kube.api, stdout=sink)
    assert res.exit_code == 0 and res.mode == "pod" and res.pod_name == "sg-train-1"
    assert sink.getvalue() == b"epoch 1\nepoch 2\n"
    assert kube.created == ["networkpolicy", "pod"]
    assert kube.deleted == ["pod", "networkpolicy"]
    kube.assert_clean()
    assert "pod:cpu=1" in res.limits


def test_the_created_pod_is_the_restricted_one() -> None:
    kube = FakeKube()
    seen: dict[str, Any] = {}
    original = kube.create_namespaced_pod

    def capture(namespace: str, body: dict[str, Any]) -> None:
        seen["pod"] = body
        original(namespace, body)

    kube.create_namespaced_pod = capture  # type: ignore[method-assign]
    run_pod(["true"], SPEC, env={"A": "1"}, secret_files={}, deadline_s=30, context=CTX,
            api=kube.api, poll_s=0.01, stdout=io.BytesIO())
    assert check_pod(seen["pod"]) == []
    assert seen["pod"]["spec"]["activeDeadlineSeconds"] == 30


def test_body_failure_is_reported_and_cleaned_up() -> None:
    kube = FakeKube(exit_code=3)
    res = run_pod(["false"], SPEC, env={}, secret_files={}, deadline_s=30, context=CTX,
                  api=kube.api, poll_s=0.01, stdout=io.BytesIO())
    assert res.exit_code == 3
    kube.assert_clean()


def test_server_side_deadline_raises_step_timeout_and_cleans_up() -> None:
    kube = FakeKube(deadline_exceeded=True)
    with pytest.raises(StepTimeout):
        run_pod(["sleep", "1d"], SPEC, env={}, secret_files={}, deadline_s=5, context=CTX,
                api=kube.api, poll_s=0.01, stdout=io.BytesIO())
    kube.assert_clean()


def test_client_side_deadline_deletes_a_pod_that_never_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    from stepguard.isolation import _kube

    monkeypatch.setattr(_kube, "_SCHEDULE_SLACK_S", 0.0)
    kube = FakeKube(never_finish=True)
    with pytest.raises(StepTimeout) as info:
        run_pod(["sleep", "1d"], SPEC, env={}, secret_files={}, deadline_s=0.3, context=CTX,
                api=kube.api, poll_s=0.01, stdout=io.BytesIO())
    assert info.value.result.killed_by_deadline  # type: ignore[attr-defined]
    kube.assert_clean()


def test_keyboard_interrupt_still_deletes_pod_and_policy() -> None:
    kube = FakeKube(never_finish=True)

    def interrupt(name: str, namespace: str) -> Any:
        raise KeyboardInterrupt

    kube.read_namespaced_pod = interrupt  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        run_pod(["train"], SPEC, env={}, secret_files={}, deadline_s=30, context=CTX,
                api=kube.api, poll_s=0.01, stdout=io.BytesIO())
    kube.assert_clean()


def test_sigterm_deletes_pod_and_policy() -> None:
    kube = FakeKube(never_finish=True)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(IsolationError, match="SIGTERM"):
            run_pod(["train"], SPEC, env={}, secret_files={}, deadline_s=30, context=CTX,
                    api=kube.api, poll_s=0.02, stdout=io.BytesIO())
    finally:
        timer.cancel()
    kube.assert_clean()
    assert signal.getsignal(signal.SIGTERM) == before


def test_failed_pod_creation_removes_the_policy() -> None:
    kube = FakeKube(fail_create_pod=True)
    with pytest.raises(IsolationError, match="could not create the pod"):
        run_pod(["train"], SPEC, env={}, secret_files={}, deadline_s=30, context=CTX,
                api=kube.api, poll_s=0.01, stdout=io.BytesIO())
    assert kube.created == ["networkpolicy"] and kube.deleted == ["networkpolicy"]
    kube.assert_clean()


def test_pods_take_no_host_binds_or_secret_files() -> None:
    kube = FakeKube()
    with pytest.raises(ConfigurationError):
        run_isolated(["x"], SPEC, ro_binds={"/data": "/data"}, deadline_s=5, kube_api=kube.api)
    with pytest.raises(ConfigurationError):
        run_isolated(["x"], SPEC, secret_files={"T": b"v"}, deadline_s=5, kube_api=kube.api)
    assert kube.created == []


def test_logs_to_a_file(tmp_path: Any) -> None:
    kube = FakeKube(logs=[b"done\n"])
    out = tmp_path / "pod.log"
    t0 = time.monotonic()
    res = run_pod(["x"], SPEC, env={}, secret_files={}, deadline_s=30, context=CTX,
                  api=kube.api, poll_s=0.01, stdout=out)
    assert time.monotonic() - t0 < 5
    assert out.read_bytes() == b"done\n" and res.stdout_path == str(out)


def test_wrapped_token_reaches_the_pod_spec_only_in_pod_mode() -> None:
    kube = FakeKube()
    bodies: list[dict[str, Any]] = []
    original = kube.create_namespaced_pod

    def capture(namespace: str, body: dict[str, Any]) -> None:
        bodies.append(body)
        original(namespace, body)

    kube.create_namespaced_pod = capture  # type: ignore[method-assign]
    run_isolated(["stepguard", "exec"], SPEC, deadline_s=30, context=CTX, kube_api=kube.api,
                 stdout=io.BytesIO(), wrapped_token_env={"STEPGUARD_WRAPPED_TOKEN": "hvs.w"})
    env = bodies[0]["spec"]["containers"][0]["env"]
    assert {"name": "STEPGUARD_WRAPPED_TOKEN", "value": "hvs.w"} in env
    kube.assert_clean()
    with pytest.raises(ConfigurationError):
        run_isolated(["true"], IsolationSpec(mode="process"), deadline_s=5,
                     wrapped_token_env={"T": "hvs.w"})
