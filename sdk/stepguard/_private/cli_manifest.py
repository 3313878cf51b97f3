"""``stepguard manifest``: create, verify and export content manifests."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from stepguard.errors import ConfigurationError, ManifestError

__all__ = ["register"]


class _Progress:
    """Bytes-hashed progress on a terminal's stderr; silent when stderr is not a TTY."""

    def __init__(self, total: int | None, label: str, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.total = total
        self.label = label
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if not self.enabled or now - self._last < 0.2:
                return
            self._last = now
        rate = self.done / max(now - self.start, 1e-9) / 2**20
        pct = f" {100 * self.done / self.total:5.1f}%" if self.total else ""
        self.stream.write(f"\r{self.label}:{pct} {self.done / 2**20:,.0f} MiB  {rate:,.0f} MiB/s ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._last:
            self.stream.write("\n")
            self.stream.flush()


def _total_size(path: str) -> int | None:
    # A cheap pre-walk only for the progress percentage, and only on a terminal.
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def _manifest_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ManifestError("cannot read manifest", subject=path,
                            details=(exc.strerror or str(exc),)) from exc


def _read_manifest(path: str) -> object:
    from stepguard.integrity import Manifest

    return Manifest.from_json(_manifest_bytes(path))


def _cmd_create(args: argparse.Namespace) -> int:
    from stepguard.integrity import create_manifest

    progress = _Progress(None, "hashing")
    if progress.enabled:
        progress.total = _total_size(args.path)
    try:
        manifest = create_manifest(
            args.path, algorithm=args.algorithm, jobs=args.jobs,
            allow_internal_symlinks=args.allow_internal_symlinks,
            shard_size=args.shard_size, progress=progress,
        )
    finally:
        progress.close()
    text = manifest.to_json()
    if args.output and args.output != "-":
        tmp = f"{args.output}.tmp-{os.getpid()}"
        Path(tmp).write_text(text, encoding="utf-8")
        os.replace(tmp, args.output)
    else:
        sys.stdout.write(text)
    if args.json and args.output and args.output != "-":
        print(json.dumps({"manifest": args.output, "digest": manifest.digest,
                          "files": len(manifest.entries), "bytes": manifest.total_size,
                          "algorithm": manifest.algorithm}))
    elif args.output and args.output != "-":
        print(f"{manifest.digest}  {args.output} ({len(manifest.entries)} files, "
              f"{manifest.total_size} bytes)", file=sys.stderr)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from stepguard.errors import IntegrityError
    from stepguard.integrity import Manifest, verify_manifest

    text = _manifest_bytes(args.manifest)
    progress = _Progress(None, "verifying")
    # Given the text, verify_manifest parses it while the first files are hashed; only the
    # progress bar needs the parsed manifest (its total) first.
    manifest: Manifest | bytes = text
    # Missing data is a data verdict (exit 3) before a malformed manifest (exit 4) either way.
    if progress.enabled and os.path.lexists(args.path):
        manifest = Manifest.from_json(text)
        progress.total = manifest.total_size
    try:
        report = verify_manifest(args.path, manifest, jobs=args.jobs,
                                 allow_internal_symlinks=args.allow_internal_symlinks,
                                 progress=progress if progress.enabled else None)
    except IntegrityError as err:
        progress.close()
        if args.json:
            try:
                parsed = manifest if isinstance(manifest, Manifest) else Manifest.from_json(text)
                digest: str | None = parsed.digest
            except ManifestError:
                digest = None  # the data was missing before the manifest was read
            print(json.dumps({"ok": False, "digest": digest, "error": err.message,
                              "subject": err.subject, "differences": list(err.details)}))
        raise
    progress.close()
    if args.json:
        print(json.dumps({"ok": True, "digest": report.manifest_digest, "files": report.files,
                          "bytes": report.bytes, "seconds": round(report.seconds, 3)}))
    else:
        print(f"OK {report.manifest_digest} ({report.files} files, {report.bytes} bytes)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from stepguard.integrity import Manifest, plain_sha256_digests

    manifest = _read_manifest(args.manifest)
    assert isinstance(manifest, Manifest)
    if args.format == "sha256sum":
        plain = None
        if args.data:
            plain = plain_sha256_digests(args.data, manifest, jobs=args.jobs)
        text = manifest.export_sha256sum(plain)
    elif args.format == "b3sum":
        text = manifest.export_b3sum()
    else:  # pragma: no cover - argparse restricts choices
        raise ConfigurationError("unknown export format", subject=args.format)
    sys.stdout.write(text)
    return 0


def _jobs(value: str) -> int:
    try:
        n = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError("must be a positive integer") from exc
    if n < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return n


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``manifest`` command group."""
    from stepguard.integrity._manifest import DEFAULT_SHARD_SIZE

    p = sub.add_parser("manifest", help="create, verify and export content manifests")
    msub = p.add_subparsers(dest="manifest_cmd", metavar="ACTION")
    msub.required = True
    jobs_help = "parallel hashing threads (default: usable CPUs)"

    c = msub.add_parser("create", help="hash a file or directory into a manifest (JSON)")
    c.add_argument("path")
    c.add_argument("-o", "--output", help="write the manifest here (default: stdout)")
    c.add_argument("--algorithm", choices=("sha256", "blake3"), default="sha256")
    c.add_argument("--jobs", type=_jobs, default=None, help=jobs_help)
    c.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help="SHA-256: hash files above this many bytes as parallel shards; "
                   "0 = plain SHA-256 for every file (default: %(default)s)")
    c.add_argument("--allow-internal-symlinks", action="store_true",
                   help="accept symlinks that resolve to files inside PATH")
    c.add_argument("--json", action="store_true",
                   help="with -o: print a JSON summary (digest, files, bytes)")
    c.set_defaults(func=_cmd_create)

    v = msub.add_parser("verify", help="check PATH against MANIFEST; list every difference")
    v.add_argument("path")
    v.add_argument("manifest")
    v.add_argument("--jobs", type=_jobs, default=None, help=jobs_help)
    v.add_argument("--allow-internal-symlinks", action="store_true",
                   help="accept symlinks that resolve to files inside PATH")
    v.add_argument("--json", action="store_true", help="print the verdict as JSON on stdout")
    v.set_defaults(func=_cmd_verify)

    e = msub.add_parser("export", help="write checksum lines (sha256sum -c / b3sum -c)")
    e.add_argument("manifest")
    e.add_argument("--format", choices=("sha256sum", "b3sum"), default="sha256sum")
    e.add_argument("--data", help="data root: computes plain SHA-256 for sharded (large) files")
    e.add_argument("--jobs", type=_jobs, default=None, help=jobs_help)
    e.set_defaults(func=_cmd_export)
