"""The span model, exported for real over OTLP/HTTP (protobuf) to a loopback receiver and to the
local hash-chained log."""

from __future__ import annotations

import base64
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from stepguard import audit
from stepguard.errors import ConfigurationError, IntegrityError


def _keypair(d: Path) -> Path:
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    priv = d / "release.pem"
    priv.write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
    return priv


def run_real_step(tmp_path: Path, *, tamper: bool = False) -> Any:
    """One secured step through the real lifecycle: a verified input, a body, a hashed output
    signed and published with a key. Returns its receipt (or the error's)."""
    from stepguard.integrity import create_manifest
    from stepguard.settings import Settings
    from stepguard.spec import RunContext, StepSpec
    from stepguard.step import run_step

    data = tmp_path / "data"
    data.mkdir()
    (data / "x.csv").write_text("1,2\n")
    manifest = tmp_path / "data.manifest.json"
    manifest.write_text(create_manifest(data).to_json())
    if tamper:
        (data / "x.csv").write_text("1,3\n")
    settings = Settings.from_dict({
        "state_dir": str(tmp_path / "state"),
        "audit": {"exporter": "jsonl", "path": str(tmp_path / "audit.jsonl")},
        "registry": {"url": f"file://{tmp_path / 'registry'}"}})
    spec = StepSpec.from_dict({
        "name": "fit", "isolation": {"mode": "process"},
        "inputs": [{"name": "data", "path": str(data), "manifest": str(manifest)}],
        "outputs": [{"name": "model", "path": str(tmp_path / "model"),
                     "publish": {"name": "m", "version": "1"}}],
        "signing": {"signer": "key", "key": str(_keypair(tmp_path))}})

    def body(env):
        (env.outputs["model"] / "model.safetensors").write_bytes(b"w")
    return run_step(spec, body=body, settings=settings,
                    context=RunContext(pipeline="train", run_id="run-42", step="fit"))


CONTROLS = ["stepguard.integrity.verify", "stepguard.isolation.run",
            "stepguard.integrity.hash", "stepguard.signing.sign", "stepguard.signing.sign",
            "stepguard.registry.publish"]


def test_full_step_reaches_a_real_otlp_receiver_as_the_expected_tree(otlp_receiver, tmp_path):
    receipt = run_real_step(tmp_path)
    # No wait needed in principle: the step end force-flushes the batch processor.
    spans = list(otlp_receiver.spans)
    assert len(spans) == 1 + len(CONTROLS)
    step = next(s for s in spans if s["name"] == "stepguard.step")
    by_id = {s["span_id"]: s for s in spans}
    assert step["parent_span_id"] == audit.run_trace_ids("python", "train", "run-42")[1]
    assert {s["trace_id"] for s in spans} == {receipt.trace_id}
    children = sorted((s for s in spans if s is not step), key=lambda s: s["name"])
    assert sorted(s["name"] for s in children) == sorted(CONTROLS)
    signs = [s for s in children if s["name"] == "stepguard.signing.sign"]
    publish = next(s for s in children if s["name"] == "stepguard.registry.publish")
    # Signing happens inside the publish; every other control is a child of the step.
    assert all(s["parent_span_id"] == publish["span_id"] for s in signs)
    assert all(by_id[s["parent_span_id"]] is step for s in children if s not in signs)
    assert all(s["status"] == 1 for s in spans)  # STATUS_CODE_OK
    attrs = step["attributes"]
    assert (attrs["cicd.pipeline.name"], attrs["cicd.pipeline.run.id"],
            attrs["cicd.pipeline.task.name"]) == ("train", "run-42", "fit")
    assert attrs["stepguard.secured"] is True and attrs["stepguard.step.name"] == "fit"
    assert step["resource"]["service.name"] == "stepguard"
    verify = next(s for s in children if s["name"] == "stepguard.integrity.verify")
    assert verify["attributes"]["artifact.hash"] == receipt.inputs[0].digest
    assert verify["events"][0][1]["stepguard.verdict.name"] == "integrity.verified"
    hashed = next(s for s in children if s["name"] == "stepguard.integrity.hash")
    assert hashed["attributes"]["artifact.hash"] == receipt.output("model").digest
    published = receipt.output("model").published
    assert publish["attributes"]["artifact.attestation.hash"] == published.bundle_digest
    assert {s["attributes"]["stepguard.signing.signer"] for s in signs} == {published.signer}
    # The same spans are in the local log, chained.
    report = audit.verify_chain(tmp_path / "audit.jsonl")
    assert report.kinds["span"] == len(spans)
    assert receipt.audit_export is not None and receipt.audit_export.status == "ok"


def test_failed_control_sets_error_status_and_error_type(otlp_receiver, tmp_path):
    with pytest.raises(IntegrityError):
        run_real_step(tmp_path, tamper=True)
    spans = {s["name"]: s for s in otlp_receiver.wait_for(2)}
    assert set(spans) == {"stepguard.step", "stepguard.integrity.verify"}
    for name in ("stepguard.step", "stepguard.integrity.verify"):
        assert spans[name]["status"] == 2  # STATUS_CODE_ERROR
        assert spans[name]["attributes"]["error.type"] == "stepguard.errors.IntegrityError"
    events = dict(spans["stepguard.integrity.verify"]["events"])
    assert events["exception"]["exception.message"].endswith("manifest: x.csv")
    assert events["stepguard.verdict"]["stepguard.verdict.passed"] is False
    text = audit.show(tmp_path / "audit.jsonl")
    assert "FAIL integrity.verified  input=data subject=x.csv" in text
    assert "integrity.verify  ERROR" in text
    assert "error.type=stepguard.errors.IntegrityError" in text


def _forms(secret: str) -> list[bytes]:
    raw = secret.encode()
    return [raw, secret.upper().encode(), base64.b64encode(raw), base64.b64encode(raw).rstrip(b"="),
            urllib.parse.quote(secret, safe="").encode(), raw.hex().encode()]


def test_canary_secret_appears_in_no_exported_byte(otlp_receiver, tmp_path):
    canary = "sg-canary-7f3a9c1e/+=&Zq"
    audit.register_secret(canary)
    setup = audit.configure(audit_dir=tmp_path, install_signal_handlers=False)
    auditor = setup.auditor()
    with pytest.raises(RuntimeError):
        with auditor.step_span("leaky", {"stepguard.note": f"password={canary}"}) as step:
            step.set_attribute("stepguard.header",
                               "Basic " + base64.b64encode(f"user:{canary}".encode()).decode())
            step.add_event("stepguard.debug", {"url": "https://h/?t=" +
                                               urllib.parse.quote(canary, safe="")})
            auditor.verdict("token-check", True, token=canary.upper())
            with auditor.control_span("credentials", "acquire", {"stepguard.x": [canary, "ok"]}):
                raise RuntimeError(f"vault said {canary}")
    # A span made outside the guard (another library, the raw OTel tracer) is caught at export.
    raw = setup.tracer_provider.get_tracer("other-lib").start_span(
        "other", attributes={"token": canary})
    raw.end()
    setup.flush()
    spans = otlp_receiver.wait_for(3)
    assert len(spans) == 3
    wire = b"".join(otlp_receiver.bodies)
    local = Path(setup.audit_log).read_bytes()
    for blob in (wire, local):
        for form in _forms(canary):
            assert form not in blob, form
        assert b"[REDACTED]" in blob  # the guard ran; the values were there to redact
    assert audit.verify_chain(setup.audit_log).records == 4
    setup.shutdown()


def test_redaction_helpers():
    audit.register_secret("hunter2-canary-zz")
    assert audit.redact({"a": ["x", "my hunter2-canary-zz"]}) == {"a": ["x", "[REDACTED]"]}
    header = base64.b64encode(b"alice:hunter2-canary-zz").decode()
    assert audit.contains_secret(header)
    assert audit.contains_secret("HUNTER2-CANARY-ZZ")
    assert not audit.contains_secret("hunter2-canary")
    audit.register_secret("")  # nothing to leak: ignored
    with pytest.raises(ConfigurationError):
        audit.register_secret("abc")


def test_redaction_still_catches_every_form_with_thousands_of_secrets(monkeypatch):
    """A long-lived worker accumulates secrets; past the per-form scan the prefix index takes
    over and must find the first and the last secret, in every encoding, anywhere in a string."""
    from stepguard.audit import _redact

    monkeypatch.setattr(_redact, "_guard", _redact._Guard())  # this test's secrets only
    secrets = [f"tok-{i:05d}-{'q' * (i % 7)}-zz" for i in range(3000)]
    for value in secrets:
        audit.register_secret(value)
    assert len(_redact._guard.forms) > _redact._SCAN_EACH_FORM_UP_TO  # the index path is used
    for value in (secrets[0], secrets[1500], secrets[-1]):
        basic = base64.b64encode(f"user:{value}".encode()).decode()
        for text in (value, f"prefix {value.upper()} suffix", f"Authorization: Basic {basic}",
                     "x" * 5000 + value.encode().hex() + "y"):
            assert audit.contains_secret(text), text[:40]
            assert audit.redact({"k": [text]}) == {"k": ["[REDACTED]"]}
    assert not audit.contains_secret("tok-99999-zz and tok-0000 and " + "tok-" * 500)
    assert audit.redact("nothing here") == "nothing here"


def test_hash_identifier_is_one_way_stable_and_keyed():
    lease = "database/creds/trainer/8Hk2mQ"
    h = audit.hash_identifier(lease)
    assert h == audit.hash_identifier(lease) and "8Hk2mQ" not in h
    assert h != audit.hash_identifier(lease + "x")
    keyed = audit.hash_identifier(lease, key=b"0123456789abcdef")
    assert keyed.startswith("hmac-sha256:") and keyed[12:] != h[7:]
    assert keyed != audit.hash_identifier(lease, key=b"0123456789abcdeX")
    with pytest.raises(ConfigurationError):
        audit.hash_identifier("")


def test_control_names_are_checked():
    with pytest.raises(ConfigurationError):
        audit.Auditor().control_span("Credentials", "acquire")
    with pytest.raises(ConfigurationError):
        audit.Auditor().control_span("credentials", "acquire.now")


def _memory_auditor() -> tuple[audit.Auditor, Any]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    mem = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(mem))
    return audit.Auditor(provider), mem


def test_task_spans_mark_secured_only_when_a_step_ran_inside():
    auditor, mem = _memory_auditor()
    stock = auditor.begin_task("load_csv", attributes=audit.pipeline_attributes("train", "r1"))
    stock.end("success")
    ours = auditor.begin_task("fit", attributes=audit.pipeline_attributes("train", "r1"),
                              activate=True)
    with auditor.step_span("fit"):
        pass
    ours.end("success")
    auditor.record_task("notify", secured=False, state="failed", error="AirflowException")
    spans = mem.get_finished_spans()
    tasks = {s.attributes["cicd.pipeline.task.name"]: s for s in spans
             if s.name == "stepguard.task"}
    assert tasks["load_csv"].attributes["stepguard.secured"] is False
    assert tasks["fit"].attributes["stepguard.secured"] is True
    assert tasks["notify"].attributes["stepguard.secured"] is False
    assert tasks["notify"].status.status_code.name == "ERROR"
    step = next(s for s in spans if s.name == "stepguard.step")
    assert step.parent.span_id == tasks["fit"].context.span_id  # nested under the task span


def test_steps_nest_under_the_current_span_of_the_orchestrator():
    auditor, mem = _memory_auditor()
    outer = auditor.tracer_provider.get_tracer("airflow").start_as_current_span("task_run")
    with outer as task_span:
        with auditor.step_span("fit"):
            pass
    step = next(s for s in mem.get_finished_spans() if s.name == "stepguard.step")
    assert step.parent.span_id == task_span.get_span_context().span_id


def test_disabled_auditor_records_nothing():
    auditor = audit.Auditor.disabled()
    with auditor.step_span("fit") as span:
        with auditor.control_span("integrity", "verify"):
            auditor.verdict("x", True)
    assert not span.is_recording()


def test_setup_tracing_follows_settings_and_reuses_the_provider(tmp_path, monkeypatch):
    from stepguard.settings import Settings

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    settings = Settings.from_dict({"state_dir": str(tmp_path / "state")})
    provider = audit.setup_tracing(settings, install_signal_handlers=False)
    assert provider is audit.setup_tracing(settings, install_signal_handlers=False)
    with audit.Auditor(provider).step_span("x"):
        pass
    assert audit.verify_chain(settings.audit_path).records == 2
    assert audit.setup_tracing(Settings.from_dict({"audit": {"exporter": "none"}})) is None


def test_unsupported_otlp_protocol_is_a_configuration_error(tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ConfigurationError):
        audit.configure(audit_dir=tmp_path, otlp=True, install_signal_handlers=False)


def test_an_unsampled_parent_cannot_switch_the_audit_off(tmp_path, monkeypatch):
    """A caller-controlled TRACEPARENT with the sampled flag off must not drop audit records."""
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.setenv("TRACEPARENT", "00-" + "ab" * 16 + "-" + "cd" * 8 + "-00")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    setup = audit.configure(audit_dir=tmp_path, install_signal_handlers=False)
    with setup.auditor().step_span("fit") as step:
        pass
    assert step.trace_id == "ab" * 16  # still joins the caller's trace
    assert audit.verify_chain(setup.audit_log).kinds["span"] == 1
    setup.shutdown()


def test_show_filters_by_run_and_lists_unsecured_tasks(tmp_path, monkeypatch, capsys):
    from stepguard.cli import main

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    setup = audit.configure(audit_dir=tmp_path, install_signal_handlers=False)
    auditor = setup.auditor()
    for run in ("run-a", "run-b"):
        with auditor.step_span("fit", audit.pipeline_attributes("train", run, "fit")):
            with auditor.control_span("integrity", "hash", audit.artifact_attributes(
                    hash=f"sha256:{run}")):
                pass
    auditor.record_task("send_email", secured=False,
                        attributes=audit.pipeline_attributes("train", "run-a"))
    data = audit.timeline(setup.audit_log, "run-a")
    [run] = data["runs"]
    assert run["run_id"] == "run-a" and len(run["steps"]) == 1
    assert run["steps"][0]["controls"][0]["digests"] == {"artifact.hash": "sha256:run-a"}
    assert [(t["task"], t["secured"]) for t in run["tasks"]] == [("send_email", False)]
    assert main(["audit", "show", "--run", "run-b", str(setup.audit_log)]) == 0
    out = capsys.readouterr().out
    assert "sha256:run-b" in out and "sha256:run-a" not in out and "send_email" not in out
    setup.shutdown()


def test_no_descriptor_held_between_steps(tmp_path, monkeypatch):
    """Many logs in one long-lived process (a worker, a test session) must not pile up fds."""
    import os

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    setup = audit.configure(audit_dir=tmp_path, install_signal_handlers=False)

    def open_on_log() -> int:
        return sum(1 for fd in os.listdir("/proc/self/fd")
                   if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(tmp_path)))

    with setup.auditor().step_span("s1"):
        with setup.auditor().control_span("integrity", "verify"):
            pass
        assert open_on_log() == 2  # log and head, while the step runs
    assert open_on_log() == 0
    with setup.auditor().step_span("s2"):
        pass
    assert audit.verify_chain(setup.audit_log).records == 4
    setup.shutdown()
