"""``stepguard trace``: the forensic record of a model, a run or a receipt.

    stepguard trace churn-model@20260101T000000          # a model in the settings' registry
    stepguard trace --run manual__2026-01-01T00:00:00+00:00
    stepguard trace state/runs/<run>/train/receipt.json
    stepguard trace MODEL --receipts s3://lake/example --json
    stepguard trace MODEL --html -o trace.html

Receipts are read from the settings' state dir unless ``--receipts`` names where they are
(repeatable: directories and ``s3://`` prefixes, read with the caller's own AWS credentials);
the local audit log from the settings unless ``--audit-log`` names others; audit segments from
where the receipts say they went. Exit status: 0 the record is complete and every audit chain
intact; 5 the report was written but the record is damaged (a tampered audit log or segment, a
missing segment, a signature bundle that is not the one the receipt names); 2 what was named
is not there (:class:`~stepguard.errors.EvidenceNotFound`: unknown model or version, no
receipts for the run, a receipt that does not exist) or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]

#: Exit status when the report was written but the record is not intact.
DAMAGED = 5


def _settings(args: argparse.Namespace) -> Any:
    from stepguard.settings import Settings

    return Settings.load(args.settings or "auto")


def _cmd_trace(args: argparse.Namespace) -> int:
    from stepguard.errors import ConfigurationError
    from stepguard.forensics import parse_model, render_html, render_text, trace

    target: str | None = args.target
    model = target if target and parse_model(target) and not Path(target).exists() else None
    receipt = target if target and model is None else None
    if target is None and args.run is None:
        raise ConfigurationError("give a model (NAME@VERSION), a receipt or --run RUN_ID",
                                 subject="stepguard trace")
    settings = _settings(args)
    receipts = list(args.receipts or ([settings.state_dir] if settings else []))
    logs = list(args.audit_log or [])
    if not logs and settings is not None and settings.audit_path.is_file():
        logs.append(str(settings.audit_path))
    registry = args.registry or (settings.registry.url if settings else None)
    result = trace(model=model, registry=registry, run_id=args.run, receipt=receipt,
                   receipts=receipts, audit_logs=logs, settings=settings)
    if args.json:
        import json

        text = json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n"
    elif args.html:
        text = render_html(result)
    else:
        text = render_text(result)
    if args.output and args.output != "-":
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    if result.intact:
        return 0
    broken = [s for s in result.audit if not s.intact]
    for seg in broken:
        where = f" at {seg.where}" if seg.where else ""
        print(f"stepguard: error: audit chain broken: {seg.location}{where}: {seg.error}",
              file=sys.stderr)
    for problem in result.problems:
        print(f"stepguard: error: {problem}", file=sys.stderr)
    return DAMAGED


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``stepguard trace``."""
    p = sub.add_parser(
        "trace", help="the forensic record of a model, run or receipt: data, code, credentials, "
                      "signer, gate, every check, audit chains intact",
        description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("target", nargs="?", metavar="MODEL|RECEIPT",
                   help="NAME@VERSION of a model in the registry, or a receipt (file or s3:// "
                        "URI)")
    p.add_argument("--run", metavar="RUN_ID", help="trace every step of this pipeline run")
    p.add_argument("--receipts", action="append", metavar="WHERE",
                   help="where receipts are: a state dir or an s3:// prefix (repeatable; "
                        "default: the settings' state dir)")
    p.add_argument("--audit-log", action="append", metavar="PATH",
                   help="a local audit log to verify and read (repeatable; default: the "
                        "settings' log)")
    p.add_argument("--registry", metavar="URL",
                   help="file:// or s3:// registry (default: the settings' registry.url)")
    p.add_argument("--settings", help="settings file")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true",
                     help="the trace as JSON (schema https://stepguard.dev/trace/v1)")
    fmt.add_argument("--html", action="store_true",
                     help="one self-contained HTML page with the chain drawn as SVG")
    p.add_argument("-o", "--output", metavar="FILE", help="write the report here (default: "
                   "standard output)")
    p.set_defaults(func=_cmd_trace)
