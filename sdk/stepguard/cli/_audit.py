"""``stepguard audit``: verify the hash chain of the local audit log and show a per-run timeline.

Without a PATH the log is the one the settings name (``audit.path``, else
``<state_dir>/audit/audit.jsonl``); ``$STEPGUARD_AUDIT_LOG`` overrides both.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from stepguard.errors import AuditError

__all__ = ["register"]


def _log_path(args: argparse.Namespace) -> Path:
    if args.path:
        return Path(args.path)
    if os.environ.get("STEPGUARD_AUDIT_LOG"):
        return Path(os.environ["STEPGUARD_AUDIT_LOG"])
    from stepguard.settings import Settings

    return Settings.load(args.settings or "auto").audit_path


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise AuditError("audit log not found", subject=str(path),
                         hint="give its path, or run a step first")
    return path


def _verify_segments(args: argparse.Namespace) -> int:
    """Verify the audit segments under an ``s3://`` URI or prefix (the caller's own AWS
    credentials; ``AWS_ENDPOINT_URL`` for an S3-compatible store), anchored by the receipts
    stored beside them."""
    from stepguard.audit import ChainHead, verify_segments
    from stepguard.errors import OperationalError
    from stepguard.receipt import Receipt
    from stepguard.wiring import s3_client

    bucket, _, prefix = str(args.path)[len("s3://"):].partition("/")
    s3 = s3_client()
    segments: list[tuple[str, bytes]] = []
    anchors: dict[str, ChainHead] = {}
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", ()):
                key = obj["Key"]
                if "audit/" in key and key.endswith(".jsonl"):
                    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
                    segments.append((f"s3://{bucket}/{key}", body))
                elif key.endswith("receipt.json"):
                    r = Receipt.from_json(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
                    if r.audit_segment and r.audit_head:
                        seq, digest = r.audit_head.split(":", 1)
                        anchors[r.audit_segment] = ChainHead(int(seq), digest, 0)
    except Exception as exc:
        if not hasattr(exc, "response"):
            raise
        code = exc.response.get("Error", {}).get("Code", "ClientError")
        raise OperationalError(f"cannot read the audit segments ({code})",
                               subject=str(args.path)) from None
    report = verify_segments(segments, anchors)
    if args.json:
        print(json.dumps({"ok": True, "path": args.path, "segments": len(report.segments),
                          "records": report.records, "logs": report.logs,
                          "joined": report.joined, "anchored": len(anchors)},
                         indent=2, sort_keys=True))
    else:
        print(f"stepguard: audit segments OK: {len(report.segments)} segment(s) of "
              f"{report.logs} log(s), {report.records} records, {report.joined} joined to the "
              f"one before, {len(anchors)} anchored by their receipt")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from stepguard.audit import ChainHead, verify_chain

    if args.path and str(args.path).startswith("s3://"):
        return _verify_segments(args)
    path = _existing(_log_path(args))
    anchor = None
    if args.anchor:
        try:
            seq, digest = args.anchor.split(":", 1)
            anchor = ChainHead(int(seq), digest, 0)
        except ValueError:
            from stepguard.errors import ConfigurationError

            raise ConfigurationError("anchor must be SEQ:sha256:DIGEST",
                                     subject="--anchor") from None
    report = verify_chain(path, anchor=anchor, require_head=args.require_head)
    if args.json:
        print(json.dumps({
            "ok": True, "path": report.path, "records": report.records, "log_id": report.log_id,
            "tail_anchored": report.tail_anchored, "kinds": dict(report.kinds),
            "head": {"seq": report.head.seq, "digest": report.head.digest} if report.head
            else None,
        }, indent=2, sort_keys=True))
    else:
        tail = "tail anchored" if report.tail_anchored else \
            "tail NOT anchored: no head file, truncation undetectable"
        head = f", head {report.head.seq}:{report.head.digest}" if report.head else ""
        print(f"stepguard: audit log OK: {report.records} records, {tail}{head}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from stepguard.audit import show, timeline

    path = _existing(_log_path(args))
    if args.json:
        print(json.dumps(timeline(path, args.run), indent=2, sort_keys=True))
    else:
        print(show(path, args.run), end="")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``stepguard audit verify`` and ``stepguard audit show``."""
    p = sub.add_parser("audit", help="verify and read the tamper-evident audit log")
    asub = p.add_subparsers(dest="audit_cmd", metavar="ACTION")
    asub.required = True

    v = asub.add_parser("verify", help="verify the hash chain (exit 5 and the line if broken)")
    v.add_argument("path", nargs="?", help="audit log (default: from the settings), or an "
                   "s3:// URI or prefix holding the audit segments steps stored there")
    v.add_argument("--settings", help="settings file")
    v.add_argument("--anchor", help="SEQ:sha256:DIGEST of a record kept elsewhere (a receipt)")
    v.add_argument("--require-head", action="store_true",
                   help="fail when the head file is missing (truncation undetectable)")
    v.add_argument("--json", action="store_true", help="machine-readable report")
    v.set_defaults(func=_cmd_verify)

    s = asub.add_parser("show", help="per-run timeline: steps, verdicts, digests, signer, leases")
    s.add_argument("path", nargs="?", help="audit log (default: from the settings)")
    s.add_argument("--settings", help="settings file")
    s.add_argument("--run", metavar="RUN_ID", help="only this pipeline run")
    s.add_argument("--json", action="store_true", help="the timeline as JSON")
    s.set_defaults(func=_cmd_show)
