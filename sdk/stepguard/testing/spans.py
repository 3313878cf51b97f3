"""The documented span table, read from ``docs/reference/audit.md``, and a checker for the spans
a real run emitted: so the reference page and the code cannot drift apart.

The table is the one under the heading ``## Spans the lifecycle emits``: one row per span name,
with its required attributes, the attributes it may also carry, and the verdict events it may
add, each cell a comma-separated list of backticked names. Spans are checked in the local audit
log's record shape (``name``, ``status``, ``attributes``, ``events[].name``/``.attributes``),
which is also what :func:`records_from_log` reads.

>>> import textwrap
>>> doc = textwrap.dedent('''
...     ## Spans the lifecycle emits
...
...     | span | required attributes | also, when they apply | verdict events |
...     |---|---|---|---|
...     | `stepguard.isolation.run` | `stepguard.mode` | | |
...
...     ## Next
... ''')
>>> table = parse_span_table(doc)
>>> table["stepguard.isolation.run"].required
('stepguard.mode',)
>>> check_spans([{"name": "stepguard.isolation.run", "status": "OK",
...               "attributes": {"stepguard.control": "isolation"}, "events": []}], table)
['stepguard.isolation.run: missing stepguard.mode']
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["HEADING", "SpanRow", "check_spans", "parse_span_table", "read_span_table",
           "records_from_log"]

HEADING = "## Spans the lifecycle emits"
_TICKED = re.compile(r"`([^`]+)`")
#: Attributes every span may carry whatever its row says.
_ALWAYS_ALLOWED = ("error.type", "stepguard.control", "stepguard.operation")
_ALWAYS_EVENTS = ("exception",)


@dataclass(frozen=True)
class SpanRow:
    """One row of the documented table."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    verdicts: tuple[str, ...]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_span_table(text: str) -> dict[str, SpanRow]:
    """The span table in the markdown ``text``, by span name."""
    start = text.find(HEADING)
    if start < 0:
        raise ValueError(f"no {HEADING!r} section")
    rows: dict[str, SpanRow] = {}
    in_table = False
    for line in text[start + len(HEADING):].splitlines():
        if line.startswith("## "):
            break
        if not line.startswith("|"):
            if in_table:
                break
            continue
        in_table = True
        cells = _cells(line)
        if len(cells) != 4 or cells[0] == "span" or set(cells[0]) <= {"-", ":"}:
            continue
        names = [_TICKED.findall(c) for c in cells]
        rows[names[0][0]] = SpanRow(names[0][0], tuple(names[1]), tuple(names[2]),
                                    tuple(names[3]))
    if not rows:
        raise ValueError(f"the {HEADING!r} section has no table rows")
    return rows


def read_span_table(path: str | os.PathLike[str]) -> dict[str, SpanRow]:
    """:func:`parse_span_table` of the file at ``path`` (``docs/reference/audit.md``)."""
    with open(path, encoding="utf-8") as fh:
        return parse_span_table(fh.read())


def records_from_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every span record of a local audit log (JSON lines), in order."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("kind") == "span":
                out.append(rec)
    return out


def check_spans(spans: Iterable[Mapping[str, Any]], table: Mapping[str, SpanRow], *,
                prefix: str = "stepguard.") -> list[str]:
    """Problems with ``spans`` against ``table`` (empty: they match). For every span named
    ``prefix…``: it is in the table; ended ``OK``, it has every required attribute; it carries
    no attribute and no verdict event the row does not name; it ended ``OK`` or ``ERROR``
    (never unset), and ``ERROR`` with ``error.type``."""
    problems: list[str] = []
    for span in spans:
        name = str(span.get("name"))
        if not name.startswith(prefix):
            continue
        row = table.get(name)
        if row is None:
            problems.append(f"{name}: not in the documented table")
            continue
        attrs: Mapping[str, Any] = span.get("attributes") or {}
        status = span.get("status")
        if status == "OK":
            problems += [f"{name}: missing {k}" for k in row.required if k not in attrs]
        elif status == "ERROR":
            if "error.type" not in attrs:
                problems.append(f"{name}: ERROR without error.type")
        else:
            problems.append(f"{name}: status {status!r}, not OK or ERROR")
        allowed = set(row.required) | set(row.optional) | set(_ALWAYS_ALLOWED)
        problems += [f"{name}: undocumented attribute {k}" for k in attrs if k not in allowed]
        for event in span.get("events") or []:
            ename = event.get("name")
            if ename in _ALWAYS_EVENTS:
                continue
            verdict = (event.get("attributes") or {}).get("stepguard.verdict.name")
            if ename != "stepguard.verdict" or verdict not in row.verdicts:
                problems.append(f"{name}: undocumented event {ename} {verdict or ''}".rstrip())
    return problems
