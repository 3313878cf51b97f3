"""A readable per-run timeline of the audit log: steps, controls, verdicts, digests, signer and
(hashed) leases."""

from __future__ import annotations

import datetime as _dt
import os
from collections import defaultdict
from typing import Any

from stepguard.audit._attributes import STEP_SPAN, TASK_SPAN, Attr
from stepguard.audit._chain import iter_records, verify_chain
from stepguard.errors import AuditError

_LEASE_KEYS = (Attr.LEASE_HASHES, Attr.TOKEN_ACCESSOR_HASH)
_SIGNING_KEYS = (Attr.SIGNING_KEY, Attr.SIGNING_KEY_VERSION, Attr.POLICY, Attr.POLICY_KIND)


def _ms(span: dict[str, Any]) -> float | None:
    start, end = span.get("start_ns"), span.get("end_ns")
    if isinstance(start, int) and isinstance(end, int):
        return round((end - start) / 1e6, 3)
    return None


def _iso(ns: Any) -> str:
    if not isinstance(ns, int):
        return "?"
    moment = _dt.datetime.fromtimestamp(ns / 1e9, _dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_digest_key(key: str) -> bool:
    return key in (Attr.ARTIFACT_HASH, Attr.ATTESTATION_HASH) or key.endswith(
        (".digest", ".digests"))


def _summary(span: dict[str, Any]) -> dict[str, Any]:
    attrs: dict[str, Any] = span.get("attributes", {})
    out: dict[str, Any] = {
        "name": span.get("name"),
        "start": _iso(span.get("start_ns")),
        "duration_ms": _ms(span),
        "status": span.get("status"),
        "trace_id": span.get("trace_id"),
        "span_id": span.get("span_id"),
    }
    if Attr.ERROR_TYPE in attrs:
        out["error_type"] = attrs[Attr.ERROR_TYPE]
    out["verdicts"] = [
        {"name": e["attributes"].get(Attr.VERDICT_NAME),
         "passed": e["attributes"].get(Attr.VERDICT_PASSED),
         "details": {k: v for k, v in e["attributes"].items()
                     if k not in (Attr.VERDICT_NAME, Attr.VERDICT_PASSED)}}
        for e in span.get("events", []) if e.get("name") == "stepguard.verdict"]
    out["digests"] = {k: v for k, v in attrs.items() if _is_digest_key(k)}
    for verdict in out["verdicts"]:  # digests recorded with a verdict ("output hashed")
        for key, value in verdict["details"].items():
            if key.endswith(("digest", ".hash")):
                out["digests"].setdefault(key, value)
    signer = {k: v for k, v in attrs.items() if k.startswith("stepguard.signing.")
              and ("signer" in k or "identity" in k or k in _SIGNING_KEYS)}
    if signer:
        out["signer"] = signer
    leases = {k: v for k, v in attrs.items() if k in _LEASE_KEYS}
    if leases:
        out["leases"] = leases
    return out


def timeline(path: str | os.PathLike[str], run_id: str | None = None) -> dict[str, Any]:
    """The log as a JSON-ready per-run timeline. The chain is verified first; a broken chain is
    reported in ``chain`` (the records are still shown: a damaged log is still evidence)."""
    chain: dict[str, Any]
    try:
        report = verify_chain(path)
        chain = {"ok": True, "records": report.records, "tail_anchored": report.tail_anchored,
                 "log_id": report.log_id}
    except AuditError as err:
        chain = {"ok": False, "error": str(err), "details": list(err.details)}
    records = [rec for _, rec in iter_records(path)]
    spans = [rec for rec in records if rec.get("kind") == "span"]
    # Spans that did not reach the OTLP collector, noted by the step that lost them.
    exports = {(r.get("trace_id"), r.get("span_id")): r for r in records
               if r.get("kind") == "export"}
    by_id = {(s.get("trace_id"), s.get("span_id")): s for s in spans}

    def owner(span: dict[str, Any]) -> dict[str, Any] | None:
        seen = 0
        cur: dict[str, Any] | None = span
        while cur is not None and seen < 64:
            if cur.get("name") == STEP_SPAN:
                return cur
            cur = by_id.get((cur.get("trace_id"), cur.get("parent_span_id")))
            seen += 1
        return None

    controls: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for span in spans:
        if span.get("name") not in (STEP_SPAN, TASK_SPAN):
            step = owner(span)
            if step is not None:
                controls[id(step)].append(span)
    runs: dict[str, dict[str, Any]] = {}
    for span in sorted(spans, key=lambda s: s.get("start_ns") or 0):
        if span.get("name") not in (STEP_SPAN, TASK_SPAN):
            continue
        attrs = span.get("attributes", {})
        rid = attrs.get(Attr.PIPELINE_RUN_ID) or f"trace:{span.get('trace_id')}"
        if run_id is not None and rid != run_id:
            continue
        run = runs.setdefault(rid, {"run_id": rid, "pipeline": attrs.get(Attr.PIPELINE_NAME),
                                    "trace_ids": [], "steps": [], "tasks": []})
        if span.get("trace_id") not in run["trace_ids"]:
            run["trace_ids"].append(span.get("trace_id"))
        entry = _summary(span)
        entry["task"] = attrs.get(Attr.TASK_NAME)
        entry["secured"] = attrs.get(Attr.SECURED)
        if Attr.MAP_INDEX in attrs:
            entry["map_index"] = attrs[Attr.MAP_INDEX]
        if span.get("name") == STEP_SPAN:
            entry["step"] = attrs.get(Attr.STEP_NAME)
            lost = exports.get((span.get("trace_id"), span.get("span_id")))
            if lost is not None:
                entry["export"] = {k: lost.get(k) for k in
                                   ("status", "spans_exported", "spans_dropped")}
            entry["controls"] = [_summary(c) for c in sorted(
                controls.get(id(span), []), key=lambda s: s.get("start_ns") or 0)]
            run["steps"].append(entry)
        else:
            run["tasks"].append(entry)
    return {"log": str(path), "chain": chain, "runs": list(runs.values())}


def _fmt_details(details: dict[str, Any]) -> str:
    return " ".join(f"{k.removeprefix('stepguard.verdict.')}={v}" for k, v in details.items())


def show(path: str | os.PathLike[str], run_id: str | None = None) -> str:
    """A human-readable per-run timeline of the audit log at ``path``.

    >>> import tempfile, pathlib
    >>> from stepguard.audit import configure
    >>> setup = configure(audit_dir=tempfile.mkdtemp(), otlp=False, install_signal_handlers=False)
    >>> auditor = setup.auditor()
    >>> with auditor.step_span("fit", {"cicd.pipeline.run.id": "run-1"}):
    ...     with auditor.control_span("integrity", "verify"):
    ...         auditor.verdict("inputs-match-manifest", True)
    >>> print(show(setup.audit_log).split(chr(10), 1)[1])  # doctest: +ELLIPSIS
    run run-1  pipeline -  trace ...
      ... step fit  OK  ... ms  secured=True
          integrity.verify  OK  ... ms
            PASS inputs-match-manifest
    <BLANKLINE>
    >>> setup.shutdown()
    """
    data = timeline(path, run_id)
    chain = data["chain"]
    if chain["ok"]:
        anchored = "tail anchored" if chain["tail_anchored"] else "tail NOT anchored"
        lines = [f"audit log {data['log']}: chain OK ({chain['records']} records, {anchored})"]
    else:
        lines = [f"audit log {data['log']}: CHAIN BROKEN: {chain['error']}"]
        lines += [f"  - {d}" for d in chain["details"]]
    for run in data["runs"]:
        traces = ",".join(t or "?" for t in run["trace_ids"])
        lines.append(f"run {run['run_id']}  pipeline {run['pipeline'] or '-'}  trace {traces}")
        entries = [("step", s) for s in run["steps"]] + [("task", t) for t in run["tasks"]]
        entries.sort(key=lambda e: e[1]["start"])
        for kind, entry in entries:
            label = entry.get("step") if kind == "step" else entry.get("task")
            if kind == "task" and "map_index" in entry:
                label = f"{label}.{entry['map_index']}"
            err = f"  error.type={entry['error_type']}" if "error_type" in entry else ""
            lines.append(f"  {entry['start']} {kind} {label}  {entry['status']}  "
                         f"{entry['duration_ms']} ms  secured={entry['secured']}{err}")
            if "export" in entry:
                exp = entry["export"]
                lines.append(f"      EXPORT {str(exp['status']).upper()}: "
                             f"{exp['spans_dropped']} span(s) not delivered to the OTLP "
                             "collector (this log holds them)")
            lines += _detail_lines(entry, "      ")
            for control in entry.get("controls", []):
                name = str(control["name"]).removeprefix("stepguard.")
                cerr = f"  error.type={control['error_type']}" if "error_type" in control else ""
                lines.append(f"      {name}  {control['status']}  "
                             f"{control['duration_ms']} ms{cerr}")
                lines += _detail_lines(control, "        ")
    lines.append("")
    return "\n".join(lines)


def _detail_lines(entry: dict[str, Any], indent: str) -> list[str]:
    out = []
    for v in entry["verdicts"]:
        mark = "PASS" if v["passed"] else "FAIL"
        extra = _fmt_details(v["details"])
        out.append(f"{indent}{mark} {v['name']}" + (f"  {extra}" if extra else ""))
    seen: set[str] = set()
    for key, value in entry["digests"].items():
        text = str(value)
        if text in seen:  # the same digest under several keys (artifact.hash, verdict): once
            continue
        seen.add(text)
        out.append(f"{indent}digest {key}={value}")
    for key, value in entry.get("signer", {}).items():
        # "signer transit:…", "policy release", "key transit:transit/k", "key.version 2"
        out.append(f"{indent}{key.removeprefix('stepguard.signing.')} {value}")
    for key, value in entry.get("leases", {}).items():
        out.append(f"{indent}lease {key}={value}")
    return out
