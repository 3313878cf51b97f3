"""A :class:`~stepguard.forensics.Trace` for people: text for a terminal, and one self-contained
HTML page whose inline SVG draws the chain data -> train -> model -> signature -> gate -> deploy,
each node with its verdict. The page loads nothing (no scripts, styles or fonts from elsewhere)
and every value in it is escaped.
"""

from __future__ import annotations

import html

from stepguard.forensics._model import Segment, Stage, Step, Trace

_MARK = {"pass": "PASS", "fail": "FAIL", "not recorded": "----"}
_STATE = {"revoked": "revoked", "expired": "expired (cannot be revoked)",
          "expiring": "not revocable, TTL still running",
          "static": "static secret (nothing to revoke)",
          "unknown": "NOT revoked: state unknown, treat as leaked"}
_NR = "not recorded"


def _or(value: object) -> str:
    return _NR if value in (None, "") else str(value)


def render_text(trace: Trace) -> str:
    """The report a terminal shows (see ``docs/reference/trace.md`` for an example)."""
    lines = [f"stepguard trace -- {trace.subject}",
             f"  run(s)      {', '.join(trace.run_ids)}"]
    if trace.model is not None:
        m = trace.model
        lines.append(f"  model       {m.name}@{m.version}  {_or(m.digest)}")
        lines.append(f"              registry {_or(m.registry)}")
    lines.append("")
    lines.append("chain of custody")
    for stage in trace.chain:
        detail = f"  {stage.detail}" if stage.detail else ""
        lines.append(f"  [{_MARK[stage.verdict]}] {stage.kind:9s} {stage.label}{detail}")
    lines += ["", "data sources"]
    lines += [f"  {a.name:12s} {_or(a.digest)}  {a.files} file(s), {a.bytes} bytes  {a.uri}"
              for a in trace.data] or [f"  {_NR}"]
    src = trace.source
    lines += ["", "code and image",
              f"  code        {_or(src.code)}" + (f"  {src.code_uri}" if src.code_uri else ""),
              f"  image       {_or(src.image)}",
              f"  invocation  {_or(src.invocation)}"]
    sig = trace.signature
    lines += ["", "signature"]
    if sig is None:
        lines.append(f"  {_NR}")
    else:
        match = {True: "matches the publishing receipt", False: "DIFFERS from the publishing "
                 "receipt", None: "not compared (one side not recorded)"}[sig.bundle_matches]
        lines += [f"  signer      {_or(sig.signer)}",
                  f"  bundle      {_or(sig.registry_bundle_digest or sig.bundle_digest)}  "
                  f"{match}",
                  f"              {_or(sig.bundle_uri)}",
                  f"  subjects    {', '.join(sig.subjects) or _NR}",
                  f"  provenance  {_or(sig.provenance_uri)}"]
    gate = trace.gate
    lines += ["", "gate"]
    if gate is None:
        lines.append(f"  {_NR}")
    else:
        lines.append(f"  [{_MARK[gate.verdict]}] step {_or(gate.step)}  policy "
                     f"{_or(gate.policy)}  accepted signer {_or(gate.signer)}")
    lines += ["", "credentials"]
    lines += [f"  {c.step:16s} {c.name} ({c.kind})  lease {c.lease_hash or 'none'}: "
              f"{_STATE[c.state]}" + (f"  [{c.error}]" if c.error else "")
              for c in trace.credentials] or ["  none used"]
    lines += ["", "steps and checks"]
    for step in trace.steps:
        lines += _step_lines(step)
    for task in trace.unsecured:
        lines.append(f"  {task}  ran WITHOUT stepguard (audit trail): no receipt, no checks")
    lines += ["", "audit trail"]
    lines += [_segment_line(s) for s in trace.audit] or [f"  {_NR} (no audit log or segment "
                                                         "found)"]
    for problem in trace.problems:
        lines.append(f"  PROBLEM {problem}")
    lines += ["", "record intact" if trace.intact else "RECORD NOT INTACT: see above", ""]
    return "\n".join(lines)


def _step_lines(step: Step) -> list[str]:
    head = f"  {step.step}  {step.status}  stage {step.stage or '-'}  isolation " \
           f"{_or(step.isolation)}  receipt {'signed' if step.receipt_signed else 'unsigned'}" \
           + {True: ", signature verified", False: ", SIGNATURE REFUSED", None: ""}[
               step.receipt_verified]
    out = [head, f"      receipt {step.receipt}"]
    if step.error:
        out.append(f"      error {step.error}")
    for a in step.inputs:
        out.append(f"      in  {a.name} {_or(a.digest)}  verified={a.verified}")
    for a in step.outputs:
        out.append(f"      out {a.name} {_or(a.digest)}  {a.uri}")
    for c in step.checks:
        extra = " ".join(f"{k}={v}" for k, v in c.details.items())
        out.append(f"      {'PASS' if c.passed else 'FAIL'} {c.name}  ({c.source})"
                   + (f"  {extra}" if extra else ""))
    return out


def _segment_line(seg: Segment) -> str:
    anchored = f"  anchored by {', '.join(seg.anchored_by)}" if seg.anchored_by else ""
    if seg.intact:
        return f"  OK       {seg.location}  {seg.records} records{anchored}"
    where = f" at {seg.where}" if seg.where else ""
    details = "".join(f"; {d}" for d in seg.details)
    return f"  TAMPERED {seg.location}{where}: {seg.error}{details}{anchored}"


# -- HTML ----------------------------------------------------------------------------------------

_FILL = {"pass": "#d6f5e3", "fail": "#f8d7da", "not recorded": "#eeeeee"}
_STROKE = {"pass": "#1e7b45", "fail": "#a61b29", "not recorded": "#777777"}
_W, _H, _GAP = 150, 78, 36


def render_svg(chain: tuple[Stage, ...]) -> str:
    """The chain as an inline SVG: one box per stage, arrows between, the verdict in each."""
    width = len(chain) * (_W + _GAP) + 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{_H + 40}" '
             f'viewBox="0 0 {width} {_H + 40}" role="img" aria-label="chain of custody">',
             '<defs><marker id="arrow" markerWidth="10" markerHeight="10" refX="9" refY="5" '
             'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>']
    for n, stage in enumerate(chain):
        x = 10 + n * (_W + _GAP)
        e = html.escape
        label = stage.label if len(stage.label) <= 22 else stage.label[:21] + "\u2026"
        parts.append(
            f'<g class="stage" data-stage="{e(stage.kind)}" data-verdict="{e(stage.verdict)}">'
            f'<title>{e(stage.kind)}: {e(stage.label)} -- {e(stage.verdict)}'
            f'{" -- " + e(stage.detail) if stage.detail else ""}</title>'
            f'<rect x="{x}" y="20" width="{_W}" height="{_H}" rx="8" '
            f'fill="{_FILL[stage.verdict]}" stroke="{_STROKE[stage.verdict]}" stroke-width="2"/>'
            f'<text x="{x + _W / 2}" y="42" text-anchor="middle" font-weight="bold">'
            f'{e(stage.kind)}</text>'
            f'<text x="{x + _W / 2}" y="62" text-anchor="middle" font-size="11">{e(label)}'
            f'</text><text x="{x + _W / 2}" y="84" text-anchor="middle" font-size="12" '
            f'fill="{_STROKE[stage.verdict]}">{e(_MARK[stage.verdict])}</text></g>')
        if n:
            parts.append(f'<line x1="{x - _GAP}" y1="{20 + _H / 2}" x2="{x - 2}" '
                         f'y2="{20 + _H / 2}" stroke="#555" stroke-width="2" '
                         'marker-end="url(#arrow)"/>')
    parts.append("</svg>")
    return "".join(parts)


_CSS = ("body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;"
        "margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;"
        "font-size:13px;vertical-align:top}code{font-size:12px;word-break:break-all}"
        ".pass{color:#1e7b45}.fail{color:#a61b29;font-weight:bold}.nr{color:#777}")


def _cell(value: object) -> str:
    if value in (None, ""):
        return '<td class="nr">not recorded</td>'
    return f"<td><code>{html.escape(str(value))}</code></td>"


def _table(head: list[str], rows: list[list[object]]) -> str:
    if not rows:
        return '<p class="nr">none recorded</p>'
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows]
    out.append("</table>")
    return "".join(out)


def render_html(trace: Trace) -> str:
    """One self-contained page: the drawing, then every table of the text report. No script,
    no external asset."""
    e = html.escape
    m = trace.model
    title = f"stepguard trace: {trace.subject}"
    sig = trace.signature
    gate = trace.gate
    verdict = "record intact" if trace.intact else "RECORD NOT INTACT"
    body = [
        f"<h1>{e(title)}</h1>",
        f'<p class="{"pass" if trace.intact else "fail"}" id="verdict">{e(verdict)}</p>',
        f"<p>run(s): <code>{e(', '.join(trace.run_ids))}</code>"
        + (f" &middot; model <code>{e(m.name)}@{e(m.version)}</code> "
           f"<code>{e(str(m.digest))}</code>" if m else "") + "</p>",
        render_svg(trace.chain),
        "<h2>Data sources</h2>",
        _table(["name", "digest", "files", "bytes", "location"],
               [[a.name, a.digest, a.files, a.bytes, a.uri] for a in trace.data]),
        "<h2>Code and image</h2>",
        _table(["code", "image", "invocation"],
               [[trace.source.code, trace.source.image, trace.source.invocation]]),
        "<h2>Signature and gate</h2>",
        _table(["signer", "bundle digest", "matches receipt", "bundle", "provenance"],
               [[sig.signer, sig.registry_bundle_digest or sig.bundle_digest,
                 sig.bundle_matches, sig.bundle_uri, sig.provenance_uri]] if sig else []),
        _table(["gate step", "verdict", "policy", "accepted signer"],
               [[gate.step, gate.verdict, gate.policy, gate.signer]] if gate else []),
        "<h2>Credentials</h2>",
        _table(["step", "name", "kind", "lease (hashed)", "state"],
               [[c.step, c.name, c.kind, c.lease_hash, _STATE[c.state]]
                for c in trace.credentials]),
        "<h2>Checks</h2>",
        _table(["step", "check", "verdict", "from", "details"],
               [[c.step, c.name, "PASS" if c.passed else "FAIL", c.source,
                 " ".join(f"{k}={v}" for k, v in c.details.items())] for c in trace.checks]),
        "<h2>Steps</h2>",
        _table(["step", "status", "stage", "isolation", "receipt", "signed", "verified"],
               [[s.step, s.status, s.stage, s.isolation, s.receipt, s.receipt_signed,
                 s.receipt_verified]
                for s in trace.steps]),
        "".join(f'<p class="fail">task <code>{e(t)}</code> ran without stepguard (audit '
                'trail): no receipt, no checks</p>' for t in trace.unsecured),
        "<h2>Audit trail</h2>",
        _table(["location", "intact", "records", "broken at", "finding", "anchored by"],
               [[s.location, "yes" if s.intact else "TAMPERED", s.records, s.where,
                 "; ".join([s.error or "", *s.details]).strip("; "),
                 ", ".join(s.anchored_by)] for s in trace.audit]),
        "".join(f'<p class="fail">{e(p)}</p>' for p in trace.problems),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(title)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(body)
            + "</body></html>\n")
