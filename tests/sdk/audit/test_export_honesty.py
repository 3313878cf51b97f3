"""Export honesty against a real OTLP/HTTP receiver: with the collector up the receipt says
``ok``; with it down the receipt and ``stepguard audit show`` say the spans were lost, and the
local hash-chained log still holds every one of them."""

from __future__ import annotations

import socket

from stepguard import audit
from stepguard.receipt import Receipt
from stepguard.settings import Settings
from stepguard.spec import RunContext, StepSpec
from stepguard.step import run_step
from stepguard.testing.spans import records_from_log


def _dead_endpoint() -> str:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _step(tmp_path, settings, name):
    spec = StepSpec.from_dict({"name": name, "isolation": {"mode": "process"},
                               "outputs": [{"name": "out", "path": str(tmp_path / name)}]})

    def body(env):
        (env.outputs["out"] / "x.txt").write_text(name)
    return run_step(spec, body=body, settings=settings,
                    context=RunContext(pipeline="p", run_id="r-export", step=name))


def test_lost_spans_are_in_the_receipt_and_show_and_kept_locally(otlp_receiver, tmp_path,
                                                                 monkeypatch):
    log = tmp_path / "audit.jsonl"
    settings = Settings.from_dict({"state_dir": str(tmp_path / "state"),
                                   "audit": {"exporter": "jsonl", "path": str(log)}})
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")
    up = _step(tmp_path, settings, "up")
    assert up.audit_export is not None
    assert (up.audit_export.status, up.audit_export.spans_dropped) == ("ok", 0)
    assert up.audit_export.spans_exported == 3  # step, isolation.run, integrity.hash
    assert {s["trace_id"] for s in otlp_receiver.spans} == {up.trace_id}

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", _dead_endpoint())  # the collector is down
    down = _step(tmp_path, settings, "down")
    assert down.audit_export is not None
    assert down.audit_export.status == "lost"
    assert down.audit_export.spans_dropped == 3 and down.audit_export.spans_exported == 0
    as_json = Receipt.from_json(down.to_json())
    assert as_json.audit_export == down.audit_export
    assert '"audit_export":{"spans_dropped":3,"spans_exported":0,"status":"lost"}' in down.to_json()
    text = audit.show(log)
    assert "EXPORT LOST: 3 span(s) not delivered" in text
    assert text.count("EXPORT LOST") == 1  # the step whose spans were lost, not the other
    # The local chain holds every span of both steps, and the note; it verifies.
    names = [(s["attributes"].get("stepguard.step.name"), s["name"])
             for s in records_from_log(log) if s["name"] == "stepguard.step"]
    assert [n for n, _ in names] == ["up", "down"]
    report = audit.verify_chain(log)
    assert report.kinds["export"] == 1 and report.kinds["span"] == 6

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint)  # back up
    again = _step(tmp_path, settings, "again")
    assert again.audit_export is not None and again.audit_export.status == "ok"


def test_without_a_collector_the_receipt_says_local_only(tmp_path, monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    settings = Settings.from_dict({"state_dir": str(tmp_path / "state"),
                                   "audit": {"exporter": "jsonl",
                                             "path": str(tmp_path / "audit.jsonl")}})
    receipt = _step(tmp_path, settings, "local")
    assert receipt.audit_export is not None and receipt.audit_export.status == "none"
    off = Settings.from_dict({"state_dir": str(tmp_path / "state2"),
                              "audit": {"exporter": "none"}})
    quiet = _step(tmp_path, off, "off")
    assert quiet.audit_export is None and "audit_export" not in quiet.to_dict()
