"""The chain of custody of one DAG run, as plain data: nodes, their checks' verdicts, edges.

Built from what the metadata DB holds for a run -- each task instance's receipt XCom (and the
gate's ``gate`` verdict XCom) -- with no Airflow import, so it is tested on plain dicts. Receipts
are read defensively: a field this version does not know is kept (the receipt view shows the
whole document) and a field that is missing or of another type reads as absent, never as an
error.

An edge goes from a producer's output to a consumer's input when the input's verified digest
is the output's root digest. Where several tasks output the same digest (a gate re-emits the
model it verified), the edge comes from the latest of them that finished before the consumer
started: the one it consumed. A gate's receipt names no input (it fetches the model from the
registry); the digest its verdict names (the ``gate`` XCom) is its input.

>>> ingest = TaskRecord("ingest", -1, "success", {"step": "ingest", "status": "succeeded",
...     "outputs": [{"name": "dataset", "digest": "sha256:aa", "files": 1}],
...     "finished_at": "2026-01-01T00:00:01"})
>>> train = TaskRecord("train", -1, "success", {"step": "train", "status": "succeeded",
...     "inputs": [{"name": "dataset", "digest": "sha256:aa", "verified": True}],
...     "started_at": "2026-01-01T00:00:02"})
>>> chain = build_chain([ingest, train])
>>> [(e.producer, e.consumer, e.digest) for e in chain.edges]
[('ingest', 'train', 'sha256:aa')]
>>> [n.layer for n in chain.nodes], chain.nodes[1].checks[0].verdict
([0, 1], 'pass')
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Chain", "Check", "Edge", "Node", "TaskRecord", "build_chain", "receipt_digest"]

Verdict = Literal["pass", "fail", "warn", "info"]

#: The receipt schema this view understands; others are shown, flagged.
RECEIPT_SCHEMA = "https://stepguard.dev/receipt/v1"


@dataclass(frozen=True)
class TaskRecord:
    """One task instance of the run and what it left in XCom (plain JSON data)."""

    task_id: str
    map_index: int
    state: str | None
    receipt: Mapping[str, Any] | None = None
    gate: Mapping[str, Any] | None = None
    #: True when ``receipt`` is the receipt of a failed step (``stepguard_failed_receipt``).
    failed_receipt: bool = False
    start_date: str | None = None

    @property
    def key(self) -> str:
        """``task_id``, or ``task_id[i]`` for a mapped instance."""
        return self.task_id if self.map_index < 0 else f"{self.task_id}[{self.map_index}]"


@dataclass(frozen=True)
class Check:
    """One check's verdict on a node: ``kind`` (integrity, signature, gate, credentials,
    isolation, receipt), a verdict and a one-line, secret-free summary."""

    kind: str
    verdict: Verdict
    summary: str


@dataclass(frozen=True)
class Node:
    """One task instance in the graph."""

    record: TaskRecord
    checks: tuple[Check, ...]
    layer: int = 0
    row: int = 0

    @property
    def secured(self) -> bool:
        """True when the task left a receipt (a secured step)."""
        return self.record.receipt is not None

    @property
    def status(self) -> str:
        """The receipt's status, else the task instance's state."""
        status = _str(self.record.receipt, "status") if self.record.receipt else None
        return status or (self.record.state or "none")


@dataclass(frozen=True)
class Edge:
    """Producer output -> consumer input, by root digest."""

    producer: str
    consumer: str
    output: str
    input: str
    digest: str
    verified: bool


@dataclass(frozen=True)
class Chain:
    """The run's chain of custody."""

    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...] = ()
    layers: int = field(default=1)

    def node(self, key: str) -> Node:
        """The node called ``key`` (KeyError if none)."""
        for n in self.nodes:
            if n.record.key == key:
                return n
        raise KeyError(key)


def receipt_digest(receipt: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` over the receipt's canonical JSON (sorted keys, no spaces): the digest
    :attr:`stepguard.receipt.Receipt.digest` gives for the same receipt.

    >>> receipt_digest({"b": 1, "a": "x"}) == "sha256:" + hashlib.sha256(
    ...     b'{"a":"x","b":1}').hexdigest()
    True
    """
    text = json.dumps(receipt, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _str(data: Any, key: str) -> str | None:
    value = data.get(key) if isinstance(data, Mapping) else None
    return value if isinstance(value, str) and value else None


def _list(data: Any, key: str) -> list[Mapping[str, Any]]:
    value = data.get(key) if isinstance(data, Mapping) else None
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, Mapping)]


def short(digest: str | None, n: int = 12) -> str:
    """``sha256:0123456789ab…`` -- a digest cut for a label (the full one is in the view).

    >>> short("sha256:" + "ab" * 32)
    'sha256:abababababab…'
    """
    if not digest:
        return "—"
    algo, sep, hexd = digest.partition(":")
    return f"{algo}:{hexd[:n]}…" if sep and len(hexd) > n else digest


def checks_of(record: TaskRecord) -> tuple[Check, ...]:
    """Every check's verdict the receipt (and the gate XCom) records for this task."""
    r = record.receipt
    if r is None:
        return (Check("receipt", "info", "no receipt: not a secured step"),)
    out: list[Check] = []
    status = _str(r, "status")
    err = r.get("error")
    if status == "failed" or record.failed_receipt:
        etype = _str(err, "type") or "error"
        msg = _str(err, "message") or "step failed"
        out.append(Check("status", "fail", f"{etype}: {msg}"))
    inputs, outputs = _list(r, "inputs"), _list(r, "outputs")
    if inputs or outputs:
        unverified = [_str(i, "name") or "?" for i in inputs if i.get("verified") is not True]
        verdict: Verdict = "warn" if unverified else "pass"
        parts = [f"{len(inputs) - len(unverified)}/{len(inputs)} input(s) verified"
                 if inputs else "no input"]
        if unverified:
            parts.append("unverified: " + ", ".join(unverified))
        parts.append(f"{len(outputs)} output(s) hashed")
        out.append(Check("integrity", verdict, "; ".join(parts)))
    for inp in inputs:
        if signer := _str(inp, "signer"):
            out.append(Check("signature", "pass",
                             f"input {_str(inp, 'name') or '?'} signed by {signer}"))
    for o in outputs:
        pub = o.get("published")
        if isinstance(pub, Mapping):
            signer = _str(pub, "signer")
            where = f"{_str(pub, 'name') or '?'}:{_str(pub, 'version') or '?'}"
            if signer:
                out.append(Check("signature", "pass", f"{where} signed by {signer}, bundle "
                                 f"{short(_str(pub, 'bundle_digest'))}"))
            else:
                out.append(Check("signature", "warn", f"{where} published unsigned"))
    if record.gate is not None:
        g = record.gate
        policy, signer = _str(g, "policy") or "?", _str(g, "signer")
        if signer and status != "failed":
            out.append(Check("gate", "pass", f"policy {policy}: accepted signer {signer}"))
        else:
            out.append(Check("gate", "fail", f"policy {policy}: no accepted signer"))
    creds = _list(r, "credentials")
    if creds:
        revoked = sum(1 for c in creds if c.get("revoked") is True)
        left = [_str(c, "name") or "?" for c in creds
                if c.get("revocable") is True and c.get("revoked") is not True]
        expiring = sum(1 for c in creds if c.get("revocable") is not True)
        text = f"{len(creds)} issued, {revoked} revoked"
        if expiring:
            text += f", {expiring} expire(s) (not revocable)"
        if left:
            text += "; left behind: " + ", ".join(left)
        out.append(Check("credentials", "fail" if left else "pass", text))
    iso = r.get("isolation")
    if isinstance(iso, Mapping) and iso:
        mode = str(iso.get("mode", "?"))
        extra = ", ".join(f"{k}={v}" for k, v in sorted(iso.items())
                          if k != "mode" and "trace" not in k
                          and isinstance(v, (str, int, float, bool)))
        if mode == "process":  # isolation not asked for: said plainly, neither pass nor fail
            out.append(Check("isolation", "info", "none: ran in the task process"))
        else:
            out.append(Check("isolation", "pass", mode + (f" ({extra})" if extra else "")))
    if _str(r, "signature"):
        out.append(Check("receipt", "info", "receipt signed (DSSE bundle; verified by the "
                         "consuming step, not by this view)"))
    schema = _str(r, "schema")
    if schema and schema != RECEIPT_SCHEMA:
        out.append(Check("receipt", "warn", f"unknown receipt schema {schema}"))
    return tuple(out)


def _when(record: TaskRecord, key: str) -> str:
    return _str(record.receipt, key) or record.start_date or ""


def _inputs(record: TaskRecord) -> list[Mapping[str, Any]]:
    """The receipt's inputs, and for a gate the registry model it verified (a gate fetches
    from the registry: its receipt names no input, its verdict names the digest)."""
    inputs = _list(record.receipt, "inputs")
    gate = record.gate
    if gate is not None and (digest := _str(gate, "digest")):
        name = f"{_str(gate, 'name') or 'model'}:{_str(gate, 'version') or '?'}"
        inputs.append({"name": name, "digest": digest, "verified": bool(_str(gate, "signer"))})
    return inputs


def _edges(records: Sequence[TaskRecord]) -> list[Edge]:
    produced: dict[str, list[tuple[TaskRecord, str]]] = {}
    for rec in records:
        for o in _list(rec.receipt, "outputs"):
            if digest := _str(o, "digest"):
                produced.setdefault(digest, []).append((rec, _str(o, "name") or "?"))
    edges: list[Edge] = []
    for rec in records:
        for inp in _inputs(rec):
            digest = _str(inp, "digest")
            if digest is None:
                continue
            started = _when(rec, "started_at")
            candidates = [(p, name) for p, name in produced.get(digest, ())
                          if p.key != rec.key and (not started or
                                                   _when(p, "finished_at") <= started)]
            if not candidates:
                continue
            producer, output = max(candidates, key=lambda c: _when(c[0], "finished_at"))
            edges.append(Edge(producer.key, rec.key, output, _str(inp, "name") or "?", digest,
                              inp.get("verified") is True))
    return edges


def build_chain(records: Sequence[TaskRecord]) -> Chain:
    """Nodes (with their checks, laid out in layers by the longest path from a source) and
    edges of one run's task instances, in the order given within a layer."""
    edges = _edges(records)
    layer = {rec.key: 0 for rec in records}
    for _ in records:  # longest path; a cycle (impossible in a DAG) just stops growing
        changed = False
        for e in edges:
            if layer[e.consumer] < layer[e.producer] + 1 <= len(records):
                layer[e.consumer] = layer[e.producer] + 1
                changed = True
        if not changed:
            break
    rows: dict[int, int] = {}
    nodes: list[Node] = []
    for rec in records:
        lay = layer[rec.key]
        nodes.append(Node(rec, checks_of(rec), lay, rows.get(lay, 0)))
        rows[lay] = rows.get(lay, 0) + 1
    return Chain(tuple(nodes), tuple(edges), max(layer.values(), default=0) + 1)
