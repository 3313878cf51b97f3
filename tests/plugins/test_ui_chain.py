"""The chain-of-custody views' data and HTML, from receipts shaped exactly as the operators
push them (no browser, no api-server: see test_ui_browser.py for those)."""

from __future__ import annotations

import json
import re

from stepguard.receipt import InputRecord, LeaseRecord, OutputRecord, PublishRecord, Receipt
from stepguard.spec import RunContext
from stepguard_airflow._ui._chain import TaskRecord, build_chain, receipt_digest
from stepguard_airflow._ui._render import chain_page, receipt_page

D1, D2 = "sha256:" + "11" * 32, "sha256:" + "22" * 32


def _r(step, *, inputs=(), outputs=(), creds=(), iso=None, t0, t1, status="succeeded"):
    r = Receipt(step=step, context=RunContext(pipeline="p", run_id="r", step=step),
                status=status, inputs=tuple(inputs), outputs=tuple(outputs),
                credentials=tuple(creds), isolation=iso or {}, started_at=t0, finished_at=t1,
                trace_id="ab" * 16)
    return json.loads(r.to_json())


def _records():
    ingest = _r("ingest", outputs=[OutputRecord("dataset", "s3://l/d", D1, "s3://l/m.json")],
                creds=[LeaseRecord("db", "database", "sha256:" + "cd" * 32, True, revoked=True)],
                t0="2026-01-01T00:00:00", t1="2026-01-01T00:00:01")
    train = _r("train", inputs=[InputRecord("dataset", "/x", D1, True)],
               outputs=[OutputRecord("model", "/m", D2, "/m.json")],
               iso={"mode": "sandbox", "network": "none"},
               t0="2026-01-01T00:00:02", t1="2026-01-01T00:00:03")
    pub = _r("publish", inputs=[InputRecord("model", "/m", D2, True)],
             outputs=[OutputRecord("model", "/m", D2, "/m.json", published=PublishRecord(
                 "file:///reg", "churn", "1", "file:///reg/churn/1",
                 bundle_digest="sha256:" + "ee" * 32, signer="transit:stepguard-signing:v1"))],
             creds=[LeaseRecord("sts", "aws_web_identity", None, False)],
             t0="2026-01-01T00:00:04", t1="2026-01-01T00:00:05")
    gate = _r("gate", outputs=[OutputRecord("model", "/g", D2, "/g.json")],
              t0="2026-01-01T00:00:06", t1="2026-01-01T00:00:07")
    deploy = _r("deploy", inputs=[InputRecord("model", "/g", D2, True)],
                t0="2026-01-01T00:00:08", t1="2026-01-01T00:00:09")
    verdict = {"policy": "release", "signer": "transit:stepguard-signing:v1", "digest": D2,
               "name": "churn", "version": "1"}
    return [TaskRecord("ingest", -1, "success", ingest), TaskRecord("train", -1, "success", train),
            TaskRecord("publish", -1, "success", pub),
            TaskRecord("gate", -1, "success", gate, gate=verdict),
            TaskRecord("deploy", -1, "success", deploy),
            TaskRecord("notify", -1, "success", None)]


def test_edges_follow_verified_digests_to_the_latest_producer():
    chain = build_chain(_records())
    assert [(e.producer, e.consumer) for e in chain.edges] == [
        ("ingest", "train"), ("train", "publish"), ("publish", "gate"), ("gate", "deploy")]
    assert [chain.node(k).layer for k in ("ingest", "train", "publish", "gate", "deploy")] == \
        [0, 1, 2, 3, 4]
    assert not chain.node("notify").secured


def test_a_gate_consumes_the_digest_its_verdict_names():
    chain = build_chain(_records())
    [edge] = [e for e in chain.edges if e.consumer == "gate"]
    assert (edge.producer, edge.input, edge.verified) == ("publish", "churn:1", True)


def test_checks_name_signer_gate_credentials_and_isolation():
    chain = build_chain(_records())
    checks = {(c.kind, c.verdict): c.summary for c in chain.node("publish").checks}
    assert "signed by transit:stepguard-signing:v1" in checks[("signature", "pass")]
    assert "1 expire(s) (not revocable)" in checks[("credentials", "pass")]
    gate = {c.kind: c for c in chain.node("gate").checks}["gate"]
    assert gate.verdict == "pass" and "policy release" in gate.summary
    iso = {c.kind: c for c in chain.node("train").checks}["isolation"]
    assert iso.summary.startswith("sandbox") and "network=none" in iso.summary
    creds = {c.kind: c for c in chain.node("ingest").checks}["credentials"]
    assert creds.summary == "1 issued, 1 revoked"


def test_a_credential_left_behind_fails_and_unknown_fields_are_kept():
    rec = _records()[0]
    receipt = {**rec.receipt, "credentials": [{**rec.receipt["credentials"][0],
                                               "revoked": False}],
               "verdicts": [{"control": "future"}]}
    node = build_chain([TaskRecord("ingest", -1, "success", receipt)]).nodes[0]
    creds = {c.kind: c for c in node.checks}["credentials"]
    assert creds.verdict == "fail" and "left behind: db" in creds.summary
    page = receipt_page(node.record, dag_id="d", run_id="r", base="/stepguard")
    assert "&quot;verdicts&quot;" in page  # the whole document, new fields included


def test_receipt_digest_matches_the_sdk():
    rec = _records()[2]
    assert receipt_digest(rec.receipt) == Receipt.from_dict(rec.receipt).digest


def test_pages_escape_everything_and_carry_no_form_or_script():
    records = _records()
    evil = TaskRecord('x"><script>alert(1)</script>', -1, "success",
                      {**records[0].receipt, "step": "<img src=x onerror=alert(1)>"})
    chain = build_chain([*records, evil])
    page = chain_page(chain, dag_id="d<", run_id="r&", base="/stepguard")
    view = receipt_page(evil, dag_id="d", run_id="r", base="/stepguard")
    for html in (page, view):
        assert not re.search(r"<(script|form|input|textarea|img)\b", html, re.I)
    assert "d&lt;" in page and "r%26" in page



def test_loading_the_plugin_loads_no_web_framework_and_no_operator():
    """Every Airflow process imports the plugin (DAG parsing included): the UI stays lazy."""
    import subprocess
    import sys

    code = ("import sys, stepguard_airflow.plugin as p; "
            "print(sorted(m for m in ('fastapi', 'starlette', 'stepguard_airflow.operators', "
            "'stepguard_airflow._ui._app', 'stepguard_airflow._ui._render') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"  # after any Airflow log line


def test_a_failed_step_shows_its_verdict_and_its_failed_receipt():
    failed = _r("verify_dataset", inputs=[InputRecord("dataset", "/x", D1, False)],
                t0="2026-01-01T00:00:02", t1="2026-01-01T00:00:03", status="failed")
    failed["error"] = {"type": "IntegrityError", "message": "churn.csv changed",
                       "subject": "churn.csv"}
    rec = TaskRecord("verify_dataset", -1, "failed", failed, failed_receipt=True)
    node = build_chain([_records()[0], rec]).node("verify_dataset")
    verdicts = {c.kind: c for c in node.checks}
    assert verdicts["status"].verdict == "fail"
    assert verdicts["status"].summary == "IntegrityError: churn.csv changed"
    assert verdicts["integrity"].verdict == "warn" and "unverified: dataset" in \
        verdicts["integrity"].summary
    page = receipt_page(rec, dag_id="d", run_id="r", base="/stepguard")
    assert "stepguard_failed_receipt" in page and 'class="badge v-fail"' in page
