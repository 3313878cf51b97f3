"""Across real process boundaries: trace context into a child process, and no span lost on a
normal exit, on ``os._exit`` (as forked task runners leave) and on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stepguard import audit
from stepguard.audit import _signals

CHILD = str(Path(__file__).with_name("child_audit.py"))


def _log_spans(log_dir: Path) -> list[dict]:
    path = log_dir / "audit.jsonl"
    audit.verify_chain(path)
    return [json.loads(line) for line in path.read_text().splitlines()
            if json.loads(line)["kind"] == "span"]


def _run(mode: str, log_dir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CHILD, mode, str(log_dir)], env=env,
                          capture_output=True, text=True, timeout=60)


def test_trace_context_survives_a_real_process_boundary(otlp_receiver, tmp_path):
    setup = audit.configure(audit_dir=tmp_path / "parent", install_signal_handlers=False)
    auditor = setup.auditor()
    with auditor.step_span("parent-step") as parent:
        with auditor.control_span("isolation", "run") as run:
            env = {**os.environ, **audit.inject_env()}
            assert env["TRACEPARENT"] == run.traceparent
            child = _run("propagate", tmp_path / "child", env)
    assert child.returncode == 0, child.stderr
    trace_id, span_id = child.stdout.split()
    assert trace_id == parent.trace_id
    spans = otlp_receiver.wait_for(3, timeout=30)
    child_span = next(s for s in spans if s["name"] == "stepguard.step"
                      and s["resource"]["service.name"] == "child-propagate")
    assert child_span["trace_id"] == parent.trace_id
    assert child_span["parent_span_id"] == run.span_id  # nested under isolation.run
    assert child_span["span_id"] == span_id
    # The child's local log carries the same link.
    [logged] = _log_spans(tmp_path / "child")
    assert logged["trace_id"] == parent.trace_id and logged["parent_span_id"] == run.span_id
    setup.shutdown()


def test_without_traceparent_the_child_starts_its_own_trace(otlp_receiver, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRACEPARENT", "TRACESTATE")}
    child = _run("propagate", tmp_path, env)
    [logged] = _log_spans(tmp_path)
    assert logged["parent_span_id"] is None and child.stdout.split()[0] == logged["trace_id"]


def test_malformed_traceparent_is_ignored():
    from opentelemetry import trace

    ctx = audit.extract_env({"TRACEPARENT": "00-zz-not-a-trace-01"})
    assert not trace.get_current_span(ctx).get_span_context().is_valid


EXPECTED_FULL = {"stepguard.step", "stepguard.credentials.check", "stepguard.integrity.check",
                 "stepguard.signing.check"}


@pytest.mark.parametrize("mode", ["normal", "os_exit"])
def test_every_span_exported_on_normal_exit_and_os_exit(otlp_receiver, tmp_path, mode):
    child = _run(mode, tmp_path)
    assert child.returncode == 0, child.stderr
    names = [s["name"] for s in _unique(otlp_receiver.wait_for(4, timeout=30))]
    assert sorted(names) == sorted(EXPECTED_FULL), child.stderr  # 100%
    assert sorted(s["name"] for s in _log_spans(tmp_path)) == sorted(EXPECTED_FULL)


def test_os_exit_mid_step_keeps_every_finished_span_in_the_local_log(otlp_receiver, tmp_path):
    """The local log is written synchronously: spans that ended before ``os._exit`` are there.
    (Batched OTLP export of a step that never ended is flushed only at step end -- documented.)"""
    child = _run("os_exit_midstep", tmp_path)
    assert child.returncode == 0, child.stderr
    assert sorted(s["name"] for s in _log_spans(tmp_path)) == sorted(
        EXPECTED_FULL - {"stepguard.step"})


def _unique(spans: list[dict]) -> list[dict]:
    """OTLP delivery is at-least-once (a request that timed out on a loaded machine is sent
    again): count each span once, by id, as a collector would."""
    return list({s["span_id"]: s for s in spans}.values())


def _sigterm_child(mode: str, tmp_path: Path) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, CHILD, mode, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out + err


def test_sigterm_flushes_and_records_the_killed_step(otlp_receiver, tmp_path):
    code, output = _sigterm_child("sigterm", tmp_path)
    assert code == -signal.SIGTERM, output  # the default disposition still applies
    expected = EXPECTED_FULL | {"stepguard.isolation.run"}
    spans = _unique(otlp_receiver.wait_for(5, timeout=30))
    assert sorted(s["name"] for s in spans) == sorted(expected), (output, spans)
    killed = {s["name"]: s for s in spans if s["attributes"].get("stepguard.terminated")}
    assert set(killed) == {"stepguard.step", "stepguard.isolation.run"}
    assert all(s["attributes"]["error.type"] == "SIGTERM" and s["status"] == 2
               for s in killed.values())
    assert sorted(s["name"] for s in _log_spans(tmp_path)) == sorted(expected)


def test_sigterm_chains_to_the_previous_handler(otlp_receiver, tmp_path):
    code, output = _sigterm_child("sigterm_chain", tmp_path)
    assert code == 143 and "PREVIOUS-HANDLER-RAN" in output, (code, output)
    expected = EXPECTED_FULL | {"stepguard.isolation.run"}
    spans = _unique(otlp_receiver.wait_for(5, timeout=30))
    assert sorted(s["name"] for s in spans) == sorted(expected), (output, spans)
    step = next(s for s in spans if s["name"] == "stepguard.step")
    assert step["attributes"]["error.type"] == "SystemExit"  # ended by the unwind, not by us
    assert sorted(s["name"] for s in _log_spans(tmp_path)) == sorted(expected)


def test_signal_during_an_append_is_deferred_until_the_append_ends():
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    try:
        assert _signals.install_signal_flush((signal.SIGUSR1,))
        with _signals.critical():
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(1000):  # give the interpreter bytecode boundaries to run handlers
                pass
            assert calls == []
        assert calls == [signal.SIGUSR1]
    finally:
        _signals.uninstall_signal_flush()
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.sandbox
def test_trace_context_survives_into_a_bubblewrap_sandbox(tmp_path):
    """The body runs in bwrap (own namespaces, no network, clean environment): only TRACEPARENT
    crosses, and the step span written inside the sandbox joins the parent's trace."""
    import shutil

    from stepguard.isolation import run_isolated
    from stepguard.spec import IsolationSpec

    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed")
    setup = audit.configure(audit_dir=tmp_path / "parent", otlp=False,
                            install_signal_handlers=False)
    auditor = setup.auditor()
    out = tmp_path / "sandbox-out"
    out.mkdir()
    # The child script and stepguard's source (an editable install) are the only extra paths.
    import stepguard

    code_dirs = {str(Path(CHILD).parent), str(Path(stepguard.__file__).resolve().parents[1])}
    with auditor.step_span("parent-step") as parent:
        with auditor.control_span("isolation", "run") as run:
            env = dict(audit.inject_env())
            env["PYTHONPATH"] = os.pathsep.join(sorted(code_dirs))
            result = run_isolated(
                [sys.executable, CHILD, "propagate", str(out)], IsolationSpec(mode="sandbox"),
                ro_binds={d: d for d in code_dirs}, rw_binds={str(out): str(out)}, env=env,
                deadline_s=60, stdout=tmp_path / "child.out", stderr=tmp_path / "child.err")
    assert result.exit_code == 0, (tmp_path / "child.err").read_text()
    assert result.network == "none"
    [logged] = _log_spans(out)
    assert logged["trace_id"] == parent.trace_id
    assert logged["parent_span_id"] == run.span_id
    setup.shutdown()
