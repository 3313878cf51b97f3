"""Segments of the hash-chained log: the records one step added, verifiable away from the host.

At the end of a step with object-store outputs, the bytes its run added to the local log (from
the head before the step to the head after it) are stored next to its receipt, under
``audit/<log_id>/<first>-<last>.jsonl``; the receipt names the segment and its head. A segment
is the log's lines byte for byte, so every record's digest and its link to the one before
verify as they do on the host. Segments of one log (one ``log_id``) chain to each other: where
one ends at record N and the next starts at N+1, the next one's first record must link to the
first one's last record. Several steps running at once on one worker share its log, so one
segment may hold records of a neighbouring step; that does not weaken the chain.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from stepguard.audit._chain import ChainHead, _line_digest
from stepguard.errors import AuditError


@dataclass(frozen=True)
class SegmentReport:
    """A verified segment: which log, which records, and its head."""

    name: str
    log_id: str
    first: int
    last: int
    first_prev: str
    head: ChainHead


@dataclass(frozen=True)
class SegmentsReport:
    """Result of :func:`verify_segments`: every segment, and how many joined their neighbour."""

    segments: tuple[SegmentReport, ...]
    records: int
    logs: int
    joined: int


def segment_name(log_id: str, first: int, last: int) -> str:
    """The segment's key under its location.

    >>> segment_name("log-1", 4, 9)
    'audit/log-1/00000000000000000004-00000000000000000009.jsonl'
    """
    return f"audit/{log_id}/{first:020d}-{last:020d}.jsonl"


def verify_segment(data: bytes, *, name: str, log_id: str,
                   anchor: ChainHead | None = None) -> SegmentReport:
    """Verify one segment's records and their links; ``anchor`` (the receipt's head) must be
    its last record. An :class:`~stepguard.errors.AuditError` names the segment and line."""
    lines = data.split(b"\n")
    if lines.pop() != b"" or not lines:
        raise AuditError("audit segment is empty or ends in an incomplete record", subject=name)
    first_prev, expected_seq, prev = "", -1, ""
    for lineno, raw in enumerate(lines, 1):
        where = f"{name} line {lineno}"
        try:
            rec = json.loads(raw)
        except ValueError:
            raise AuditError("audit segment holds a line that is not JSON", subject=where) from None
        if not isinstance(rec, dict) or not {"seq", "prev", "digest"} <= set(rec):
            raise AuditError("not an audit record (fields missing)", subject=where)
        if _line_digest(raw) != rec["digest"]:
            raise AuditError("record edited: its content does not match its digest",
                             subject=where)
        if lineno == 1:
            first_prev, expected_seq = rec["prev"], rec["seq"]
        elif rec["prev"] != prev or rec["seq"] != expected_seq:
            raise AuditError("records deleted, inserted or reordered in the segment",
                             subject=where)
        if "anomaly" in rec:
            raise AuditError("the writer found the log damaged", subject=where)
        prev, expected_seq = rec["digest"], rec["seq"] + 1
    head = ChainHead(expected_seq - 1, prev, 0)
    if anchor is not None and (anchor.seq, anchor.digest) != (head.seq, head.digest):
        raise AuditError("segment does not end at the head its receipt names", subject=name,
                         details=(f"receipt {anchor.seq}:{anchor.digest}",
                                  f"segment {head.seq}:{head.digest}"))
    first = head.seq - len(lines) + 1
    return SegmentReport(name, log_id, first, head.seq, first_prev, head)


def verify_segments(segments: Iterable[tuple[str, bytes]],
                    anchors: Mapping[str, ChainHead] | None = None) -> SegmentsReport:
    """Verify segments named ``audit/<log_id>/<first>-<last>.jsonl`` and the chain across them.

    Each segment must verify on its own (and end at its anchor, when ``anchors`` names one);
    segments of one log must not overlap, and adjacent ones must link.
    """
    reports: list[SegmentReport] = []
    for name, data in segments:
        parts = name.rstrip("/").split("/")
        if len(parts) < 3 or parts[-3] != "audit":
            raise AuditError("not an audit segment name", subject=name)
        rep = verify_segment(data, name=name, log_id=parts[-2],
                             anchor=(anchors or {}).get(name))
        stem = parts[-1].removesuffix(".jsonl")
        if stem != f"{rep.first:020d}-{rep.last:020d}":
            raise AuditError("segment's name does not match its records", subject=name)
        reports.append(rep)
    if not reports:
        raise AuditError("no audit segments found", subject="segments")
    reports.sort(key=lambda r: (r.log_id, r.first))
    joined = 0
    for a, b in itertools.pairwise(reports):
        if a.log_id != b.log_id:
            continue
        if b.first <= a.last:
            raise AuditError("audit segments overlap", subject=b.name,
                             details=(f"{a.name} ends at record {a.last}",))
        if b.first == a.last + 1:
            if b.first_prev != a.head.digest:
                raise AuditError("audit segments do not link: records replaced between steps",
                                 subject=b.name, details=(f"previous segment: {a.name}",))
            joined += 1
    return SegmentsReport(tuple(reports), sum(r.last - r.first + 1 for r in reports),
                          len({r.log_id for r in reports}), joined)
