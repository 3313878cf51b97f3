"""Server-side HTML for the chain-of-custody views: one page, inline CSS and SVG, no script.

Every value that comes from a receipt, a task id or a run id is escaped (:func:`html.escape`
for text and attributes, percent-encoding for URL segments); the pages carry a
``Content-Security-Policy`` that allows no script at all (:data:`CSP`). Nothing here edits
anything: the pages have no forms.

>>> from stepguard_airflow._ui._chain import TaskRecord, build_chain
>>> chain = build_chain([TaskRecord("a<b>", -1, "success", {"status": "succeeded"})])
>>> page = chain_page(chain, dag_id="d", run_id="r", base="/stepguard")
>>> "a&lt;b&gt;" in page and "<b>" not in page
True
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any
from urllib.parse import quote

from stepguard_airflow._ui._chain import (
    Chain,
    Check,
    Node,
    TaskRecord,
    checks_of,
    receipt_digest,
    short,
)

__all__ = ["CSP", "chain_page", "error_page", "index_page", "receipt_page", "task_url"]

#: No script, no remote anything; framed only by the Airflow UI itself.
CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
       "frame-ancestors 'self'; base-uri 'none'; form-action 'none'")

_ICON = {"pass": "✓", "fail": "✗", "warn": "!", "info": "·"}
_W, _GAP_X, _GAP_Y, _LINE, _HEAD = 262, 64, 22, 17, 44
_LABEL_CHARS = 40

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2430;
background:#f6f7f9}
header{background:#17324d;color:#fff;padding:10px 20px}header a{color:#cfe3ff}
header h1{font-size:17px;margin:0}header p{margin:2px 0 0;font-size:12px;opacity:.85}
main{padding:16px 20px}section{background:#fff;border:1px solid #dde2e8;border-radius:6px;
padding:12px 16px;margin:0 0 16px}h2{font-size:15px;margin:0 0 8px}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{text-align:left;
padding:4px 8px;border-bottom:1px solid #eef0f3;vertical-align:top}th{color:#5a6473;
font-weight:600}code,.digest{font-family:ui-monospace,"DejaVu Sans Mono",monospace;
font-size:12px;word-break:break-all}
.v-pass{color:#1a7f37}.v-fail{color:#c62828;font-weight:600}.v-warn{color:#a05a00}
.v-info{color:#5a6473}.badge{display:inline-block;white-space:nowrap;border-radius:10px;
padding:0 8px;font-size:12px;border:1px solid currentColor}
pre.json{background:#0f1720;color:#dbe7f3;padding:12px;border-radius:6px;overflow:auto;
font-size:12px;max-height:480px}
svg text{font-family:system-ui,sans-serif}svg .name{font-weight:600;font-size:14px}
svg .check{font-size:11.5px}svg .edge-label{font-size:11px;fill:#5a6473}
svg a:hover rect{stroke-width:2.5}
.muted{color:#5a6473}
"""


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _seg(value: str) -> str:
    return quote(value, safe="")


def run_url(base: str, dag_id: str, run_id: str) -> str:
    """The chain view of a run, under ``base`` (the app's mount path)."""
    return f"{base}/dags/{_seg(dag_id)}/runs/{_seg(run_id)}"


def task_url(base: str, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    """The receipt view of a task instance.

    >>> task_url("/stepguard", "d", "manual__2026-01-01T00:00:00+00:00", "train")
    '/stepguard/dags/d/runs/manual__2026-01-01T00%3A00%3A00%2B00%3A00/tasks/train'
    """
    url = f"{run_url(base, dag_id, run_id)}/tasks/{_seg(task_id)}"
    return url if map_index < 0 else f"{url}?map_index={map_index}"


def _page(title: str, subtitle: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<title>{_e(title)}</title><style>{_CSS}</style></head><body>'
            f'<header><h1>{_e(title)}</h1><p>{subtitle}</p></header>'
            f'<main>{body}</main></body></html>')


def _verdict(check: Check) -> str:
    return (f'<span class="badge v-{check.verdict}">{_ICON[check.verdict]} '
            f'{_e(check.verdict)}</span>')


def _clip(text: str, n: int = _LABEL_CHARS) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _node_height(node: Node) -> int:
    return _HEAD + _LINE * len(node.checks) + 8


def _svg(chain: Chain, base: str, dag_id: str, run_id: str) -> str:
    heights: dict[int, int] = {}
    pos: dict[str, tuple[int, int, int]] = {}  # key -> x, y, height
    for node in chain.nodes:
        h = _node_height(node)
        y = heights.get(node.layer, 0)
        pos[node.record.key] = (20 + node.layer * (_W + _GAP_X), 20 + y, h)
        heights[node.layer] = y + h + _GAP_Y
    width = 40 + chain.layers * _W + (chain.layers - 1) * _GAP_X
    height = 20 + max(heights.values(), default=0)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="chain-graph" role="img" '
             f'aria-label="chain of custody graph" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}"><defs><marker id="arrow" viewBox="0 0 10 10" '
             f'refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
             f'<path d="M0,0L10,5L0,10z" fill="#6b7788"/></marker></defs>']
    for edge in chain.edges:
        px, py, ph = pos[edge.producer]
        cx, cy, ch = pos[edge.consumer]
        x1, y1, x2, y2 = px + _W, py + ph // 2, cx, cy + ch // 2
        mid = (x1 + x2) // 2
        color = "#6b7788" if edge.verified else "#a05a00"
        parts.append(
            f'<g class="edge" data-producer="{_e(edge.producer)}" '
            f'data-consumer="{_e(edge.consumer)}" data-digest="{_e(edge.digest)}">'
            f'<title>{_e(edge.producer)}.{_e(edge.output)} → {_e(edge.consumer)}.'
            f'{_e(edge.input)} {_e(edge.digest)}</title>'
            f'<path d="M{x1},{y1} C{mid},{y1} {mid},{y2} {x2 - 2},{y2}" fill="none" '
            f'stroke="{color}" stroke-width="1.6" marker-end="url(#arrow)"/>'
            f'<text class="edge-label" x="{x2 - 6}" y="{y2 - 6}" '
            f'text-anchor="end">{_e(short(edge.digest, 6))}</text></g>')
    for node in chain.nodes:
        x, y, h = pos[node.record.key]
        rec = node.record
        worst = _worst(node.checks)
        fill = {"fail": "#fdecec", "warn": "#fff6e5"}.get(worst, "#ffffff")
        stroke = {"fail": "#c62828", "warn": "#d08a1e"}.get(worst, "#1a7f37")
        if not node.secured:
            fill, stroke = "#f0f1f3", "#9aa3ae"
        lines = [f'<text class="name" x="{x + 12}" y="{y + 22}">{_e(_clip(rec.key, 30))}</text>',
                 f'<text class="check v-info" x="{x + 12}" y="{y + 38}">'
                 f'{_e(node.status)}</text>']
        for i, check in enumerate(node.checks):
            text = f"{_ICON[check.verdict]} {check.kind}: {check.summary}"
            lines.append(f'<text class="check v-{check.verdict}" x="{x + 12}" '
                         f'y="{y + _HEAD + 10 + i * _LINE}" data-check="{_e(check.kind)}" '
                         f'data-verdict="{check.verdict}"><title>{_e(text)}</title>'
                         f'{_e(_clip(text))}</text>')
        href = task_url(base, dag_id, run_id, rec.task_id, rec.map_index)
        parts.append(
            f'<a href="{_e(href)}"><g class="node" data-task="{_e(rec.key)}" '
            f'data-status="{_e(node.status)}" data-secured="{str(node.secured).lower()}">'
            f'<rect x="{x}" y="{y}" width="{_W}" height="{h}" rx="8" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="1.5"/>{"".join(lines)}</g></a>')
    parts.append("</svg>")
    return "".join(parts)


def _worst(checks: Iterable[Check]) -> str:
    verdicts = {c.verdict for c in checks}
    for v in ("fail", "warn", "pass"):
        if v in verdicts:
            return v
    return "info"


def _checks_table(checks: Sequence[Check]) -> str:
    rows = "".join(f'<tr class="check-row" data-check="{_e(c.kind)}" data-verdict="{c.verdict}">'
                   f'<td>{_e(c.kind)}</td><td>{_verdict(c)}</td><td>{_e(c.summary)}</td></tr>'
                   for c in checks)
    return f"<table><tr><th>check</th><th>verdict</th><th>detail</th></tr>{rows}</table>"


def chain_page(chain: Chain, *, dag_id: str, run_id: str, base: str,
               run_state: str | None = None) -> str:
    """The chain-of-custody page of one run: the graph, then every node's checks."""
    secured = sum(1 for n in chain.nodes if n.secured)
    body = [f'<section><h2>Chain of custody</h2><p class="muted">{secured} secured step(s), '
            f'{len(chain.edges)} verified hand-over(s). Each arrow is an output whose root '
            f'digest the next step verified; click a step for its receipt.</p>'
            f'<div style="overflow:auto">{_svg(chain, base, dag_id, run_id)}</div></section>']
    for node in chain.nodes:
        rec = node.record
        href = task_url(base, dag_id, run_id, rec.task_id, rec.map_index)
        body.append(f'<section class="step" data-task="{_e(rec.key)}"><h2>'
                    f'<a href="{_e(href)}">{_e(rec.key)}</a> '
                    f'<span class="muted">{_e(node.status)}</span></h2>'
                    f'{_checks_table(node.checks)}</section>')
    subtitle = (f'DAG <code>{_e(dag_id)}</code> · run <code>{_e(run_id)}</code>'
                + (f" · {_e(run_state)}" if run_state else "")
                + f' · <a href="{_e(base)}/">all runs</a>')
    return _page(f"stepguard · {dag_id}", subtitle, "".join(body))


def _kv(rows: Iterable[tuple[str, object]]) -> str:
    cells = "".join(f'<tr><th>{_e(k)}</th><td data-field="{_e(k)}">{_cell(k, v)}</td></tr>'
                    for k, v in rows if v not in (None, "", {}, []))
    return f"<table>{cells}</table>"


def _cell(key: str, value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if "digest" in key or key in ("lease", "audit_head", "trace_id") or \
            str(text).startswith("sha256:"):
        return f'<span class="digest">{_e(text)}</span>'
    return _e(text)


def _records_table(title: str, records: Sequence[Mapping[str, Any]],
                   columns: Sequence[str]) -> str:
    if not records:
        return ""
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    rows = []
    for rec in records:
        cells = "".join(f'<td data-field="{_e(c)}">{_cell(c, _flat(rec, c))}</td>'
                        for c in columns)
        rows.append(f'<tr data-name="{_e(rec.get("name", ""))}">{cells}</tr>')
    return f"<section><h2>{_e(title)}</h2><table><tr>{head}</tr>{''.join(rows)}</table></section>"


def _cards(title: str, kind: str, records: Sequence[Mapping[str, Any]]) -> str:
    """One key-value table per record; a ``published`` record is spelled out beside it."""
    if not records:
        return ""
    cards = []
    for rec in records:
        rows: list[tuple[str, object]] = [(k, v) for k, v in rec.items() if k != "published"]
        pub = rec.get("published")
        if isinstance(pub, Mapping):
            rows += [(f"published.{k}", v) for k, v in pub.items()]
        cards.append(f'<div class="{kind}" data-name="{_e(rec.get("name", ""))}">{_kv(rows)}'
                     f'</div>')
    return (f'<section id="{kind}s"><h2>{_e(title)}</h2>'
            f'{"<hr>".join(cards)}</section>')


def _flat(rec: Mapping[str, Any], column: str) -> object:
    value = rec.get(column)
    return "" if value is None else value


def _dicts(value: object) -> list[Mapping[str, Any]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def receipt_page(record: TaskRecord, *, dag_id: str, run_id: str, base: str) -> str:
    """One task instance's receipt, read-only: its checks, inputs, outputs, credentials,
    isolation and audit fields with full digests, then the whole document as JSON."""
    r = record.receipt
    back = (f'<a href="{_e(run_url(base, dag_id, run_id))}">chain of custody'
            f'</a>')
    subtitle = (f'DAG <code>{_e(dag_id)}</code> · run <code>{_e(run_id)}</code> · '
                f'task <code>{_e(record.key)}</code> · {back}')
    if r is None:
        none = ('<section id="no-receipt"><h2>No receipt</h2><p>This task instance left no '
                'stepguard receipt: it is not a secured step, or it has not finished.</p>'
                '</section>')
        return _page(f"stepguard · {record.key}", subtitle, none)
    ctx = r.get("context")
    summary = _kv([
        ("step", r.get("step")), ("status", r.get("status")),
        ("receipt digest", receipt_digest(r)), ("schema", r.get("schema")),
        ("signed receipt", bool(r.get("signature"))),
        ("trace_id", r.get("trace_id")), ("audit_head", r.get("audit_head")),
        ("audit_segment", r.get("audit_segment")),
        ("started_at", r.get("started_at")), ("finished_at", r.get("finished_at")),
        ("context", ctx if isinstance(ctx, Mapping) else None),
        ("error", r.get("error")),
    ])
    failed = ('<p class="v-fail">The step failed; this is the receipt it left '
              '(<code>stepguard_failed_receipt</code>).</p>' if record.failed_receipt else "")
    body = [f'<section id="summary"><h2>Receipt</h2>{failed}{summary}</section>',
            f'<section id="checks"><h2>Checks</h2>{_checks_table(checks_of(record))}</section>']
    if record.gate is not None:
        body.append(f'<section id="gate"><h2>Gate verdict</h2>{_kv(record.gate.items())}'
                    f'</section>')
    body.append(_cards("Inputs", "input", _dicts(r.get("inputs"))))
    body.append(_cards("Outputs", "output", _dicts(r.get("outputs"))))
    body.append(_records_table("Credentials", _dicts(r.get("credentials")), (
        "name", "kind", "lease", "revocable", "revoked", "revoked_by", "ttl_s", "error")))
    iso = r.get("isolation")
    if isinstance(iso, Mapping) and iso:
        body.append(f'<section id="isolation"><h2>Isolation</h2>{_kv(sorted(iso.items()))}'
                    f'</section>')
    timings = r.get("timings_ms")
    if isinstance(timings, Mapping) and timings:
        body.append(f'<section id="timings"><h2>Timings (ms)</h2>'
                    f'{_kv(sorted(timings.items()))}</section>')
    doc = json.dumps(r, indent=2, sort_keys=True)
    body.append(f'<section id="document"><h2>Receipt document (read-only)</h2>'
                f'<pre class="json" id="receipt-json">{_e(doc)}</pre></section>')
    return _page(f"stepguard · {record.key}", subtitle, "".join(body))


def index_page(runs: Sequence[tuple[str, str, str | None, int]], *, base: str) -> str:
    """Recent runs with receipts: (dag id, run id, state, number of receipts)."""
    if runs:
        rows = "".join(f'<tr><td><code>{_e(d)}</code></td><td><a href="'
                       f'{_e(run_url(base, d, r))}">{_e(r)}</a></td>'
                       f'<td>{_e(s or "")}</td><td>{n}</td></tr>' for d, r, s, n in runs)
        table = (f"<table><tr><th>DAG</th><th>run</th><th>state</th><th>receipts</th></tr>"
                 f"{rows}</table>")
    else:
        table = '<p class="muted">No run with a stepguard receipt yet.</p>'
    return _page("stepguard · chain of custody", "recent runs of secured steps",
                 f"<section><h2>Runs</h2>{table}</section>")


def error_page(status: int, message: str) -> str:
    """A plain error page (no detail beyond ``message``)."""
    return _page(f"stepguard · {status}", _e(message), f"<section><p>{_e(message)}</p></section>")
