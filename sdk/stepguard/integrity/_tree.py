"""Creating, verifying and staging manifests of local trees: the public operations.

Each operation walks the tree (``_walk.py``: no links followed, every directory identity
checked), compares what it found with the manifest where there is one, and hashes through the
engine (``_engine.py``). Time-of-check/time-of-use: every file is opened once with
``O_NOFOLLOW`` and its ``fstat`` identity (device, inode, size) is compared with what the walk
saw, so a file or parent directory swapped between the walk and the read is reported rather than
silently hashed. The bytes hashed are the bytes read through that descriptor; a size or mtime
change while reading is a finding. Nothing is cached: every verification rereads every byte.
See docs/concepts/integrity.md.

Findings are collected, never raised one by one: :func:`finish` raises one
:class:`~stepguard.errors.IntegrityError` whose ``details`` list every difference, each naming
its file (``modified:``, ``missing:``, ``added:``, ``type changed:``, ``hard link:``,
``unreadable:``).
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

from stepguard.errors import ConfigurationError, IntegrityError, OperationalError
from stepguard.integrity._direct import TINY, Changed, kind
from stepguard.integrity._engine import EarlyHashing, ProgressCallback, Stats, hash_nodes
from stepguard.integrity._gc import gc_paused
from stepguard.integrity._manifest import ALGORITHMS, DEFAULT_SHARD_SIZE, Manifest, ManifestEntry
from stepguard.integrity._walk import (
    Node,
    Scan,
    hardlink_problems,
    resolve_root,
    stat_in_dir,
    walk_tree,
)

__all__ = [
    "ProgressCallback",
    "VerificationReport",
    "create_manifest",
    "default_jobs",
    "differences",
    "finding_path",
    "finish",
    "jobs_arg",
    "make_read_only",
    "stage_and_verify",
    "verify_manifest",
]


def default_jobs() -> int:
    """Worker threads by default: the CPUs this process may run on.

    >>> default_jobs() >= 1
    True
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class VerificationReport:
    """What a successful verification covered."""

    root: str
    manifest_digest: str
    files: int
    bytes: int
    seconds: float


def _check_algorithm(algorithm: str, shard_size: int) -> None:
    if algorithm not in ALGORITHMS:
        raise ConfigurationError(f"unknown algorithm {algorithm!r}",
                                 hint=f"use one of {', '.join(ALGORITHMS)}")
    if shard_size < 0 or 0 < shard_size < 1024 * 1024:
        raise ConfigurationError("shard_size must be 0 (no sharding) or at least 1 MiB",
                                 subject=str(shard_size))


def jobs_arg(jobs: int | None) -> int:
    if jobs is None:
        return default_jobs()
    if type(jobs) is not int or jobs < 1:
        raise ConfigurationError("jobs must be a positive integer", subject=str(jobs))
    return jobs


def _warn_hardlinks(flag: bool) -> None:
    if flag:
        warnings.warn("unsafe_allow_external_hardlinks: bytes may change through names outside "
                      "the verified tree", stacklevel=3)


# -- public operations ---------------------------------------------------------------------------


@gc_paused
def create_manifest(
    path: str | os.PathLike[str],
    *,
    algorithm: str = "sha256",
    jobs: int | None = None,
    allow_internal_symlinks: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    unsafe_allow_external_hardlinks: bool = False,
    progress: ProgressCallback | None = None,
) -> Manifest:
    """Hash a file or directory tree into a :class:`Manifest`.

    Symlinks, FIFOs, sockets, devices and files hard-linked from outside the tree are refused
    (:class:`~stepguard.errors.IntegrityError` naming each); names that cannot be a safe manifest
    entry are refused with :class:`~stepguard.errors.ManifestError`. ``algorithm`` is ``"sha256"``
    (files above ``shard_size`` hashed as parallel shards; ``shard_size=0`` gives plain SHA-256
    everywhere) or ``"blake3"``. ``jobs`` defaults to the usable CPUs.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "sub").mkdir(); _ = (d / "sub" / "x.bin").write_bytes(b"abc")
    >>> m = create_manifest(d)
    >>> e = m.entries[0]
    >>> e.path, e.size, e.digest[:20]
    ('sub/x.bin', 3, 'sha256:ba7816bf8f01c')
    """
    _check_algorithm(algorithm, shard_size)
    n_jobs = jobs_arg(jobs)
    _warn_hardlinks(unsafe_allow_external_hardlinks)
    root = resolve_root(path)
    scan = walk_tree(root, allow_internal_symlinks, defer_files=True)
    problems = list(scan.problems)
    for n in scan.nodes.values():
        if n.kind != "file":
            problems.append((n.rel, f"{n.kind} {n.note}".strip() + " refused"))
    _refuse(problems, allow_internal_symlinks)
    items = sorted(scan.nodes.items())
    digests, errors = hash_nodes(items, algorithm=algorithm, shard_size=shard_size,
                                  jobs=n_jobs, progress=progress)
    if errors:
        raise IntegrityError("files changed while the manifest was being created",
                             subject=min(errors),
                             details=tuple(f"{p}: {why}" for p, why in sorted(errors.items())))
    if not unsafe_allow_external_hardlinks:
        # Link counts of files not stat'ed by the walk are known once they have been opened.
        _refuse(hardlink_problems(scan, digests), allow_internal_symlinks)
    params: dict[str, Any] = {"root": "file" if scan.is_file else "directory"}
    if algorithm == "sha256":
        params["shard_size"] = shard_size
    entries = tuple(ManifestEntry(k, n.size, digests[k]) for k, n in items)
    # The walk's bookkeeping is not needed any more; free it before validation allocates.
    del scan, items, digests
    return Manifest(algorithm, params, entries)


def _refuse(problems: list[tuple[str, str]], allow_internal_symlinks: bool) -> None:
    if not problems:
        return
    problems.sort()
    raise IntegrityError(
        "refusing to create a manifest", subject=problems[0][0],
        details=tuple(f"{p}: {why}" for p, why in problems),
        hint="remove or replace the entries named above" + (
            "" if allow_internal_symlinks else
            " (allow_internal_symlinks permits links to files inside the root)"),
    )


def differences(scan: Scan, manifest: Manifest, unsafe_allow_external_hardlinks: bool,
                 *, deferred_links: bool = False
                 ) -> tuple[list[str], list[tuple[str, Node, ManifestEntry]]]:
    """Findings from the walk alone, and the files left to hash. With ``deferred_links`` the
    hard-link check is left to the caller (after hashing has settled deferred files)."""
    findings: list[str] = [f"unreadable: {p} ({why})" for p, why in scan.problems]
    to_hash: list[tuple[str, Node, ManifestEntry]] = []
    is_file_manifest = manifest.params.get("root") == "file"
    if is_file_manifest != scan.is_file:
        want = "a single file" if is_file_manifest else "a directory"
        got = "a file" if scan.is_file else "a directory"
        return [f"type changed: {scan.root} (manifest describes {want}, found {got})"], []
    nodes = scan.nodes
    if is_file_manifest:
        # A single staged file may be renamed; its content is what is verified.
        ((_, only),) = nodes.items()
        nodes = {manifest.entries[0].path: only}
    expected = {e.path for e in manifest.entries}
    for e in manifest.entries:
        node = nodes.get(e.path)
        if node is not None and node.deferred:
            if e.size < TINY:
                # Checked against the expected size through its own descriptor when hashed.
                node.size = e.size
                to_hash.append((e.path, node, e))
                continue
            try:
                st = stat_in_dir(node)
            except Changed as exc:
                findings.append(f"modified: {e.path} ({exc})")
                continue
            except OSError as exc:
                findings.append(f"modified: {e.path} (cannot stat ({exc.strerror}))")
                continue
            node.kind = kind(st.st_mode)
            node.settle(st.st_size, st.st_dev, st.st_ino, st.st_nlink)
        if node is None:
            if e.path in scan.dirs:
                findings.append(f"type changed: {e.path} (expected file, found directory)")
            else:
                findings.append(f"missing: {e.path}")
        elif node.kind != "file":
            findings.append(f"type changed: {e.path} (expected file, found {node.kind}"
                            f"{' ' + node.note if node.note else ''})")
        elif node.size != e.size:
            findings.append(f"modified: {e.path} (size {node.size}, manifest {e.size})")
        else:
            to_hash.append((e.path, node, e))
    for rel, node in nodes.items():
        if rel not in expected:
            findings.append(f"added: {rel} ({node.kind}{' ' + node.note if node.note else ''})")
    if not unsafe_allow_external_hardlinks and not deferred_links:
        findings += _hardlink_findings(scan, expected, ())
    return findings, to_hash


def _hardlink_findings(scan: Scan, expected: set[str], hashed: Container[str]) -> list[str]:
    return [f"hard link: {p} ({why})" for p, why in hardlink_problems(scan, hashed)
            if p in expected]


def finish(findings: list[str], root: str) -> None:
    if not findings:
        return
    findings.sort(key=finding_path)
    first = finding_path(findings[0])
    raise IntegrityError(
        f"{len(findings)} difference(s) between the data and its manifest",
        subject=first,
        details=tuple(findings),
        hint=f"data root: {root}",
    )


@gc_paused
def verify_manifest(
    path: str | os.PathLike[str],
    manifest: Manifest | str | bytes,
    *,
    jobs: int | None = None,
    allow_internal_symlinks: bool = False,
    unsafe_allow_external_hardlinks: bool = False,
    progress: ProgressCallback | None = None,
) -> VerificationReport:
    """Check every byte under ``path`` against ``manifest``; return a report or raise.

    ``manifest`` is a :class:`Manifest` or its JSON text; given the text, parsing it (strictly,
    as :meth:`Manifest.from_json`) overlaps with hashing the first files, which matters for trees
    of many small files. Raises :class:`~stepguard.errors.IntegrityError` whose ``details`` list
    *every* difference (``modified:``, ``missing:``, ``added:``, ``type changed:``,
    ``hard link:``), each naming the file. No mtime or inode cache is consulted: all content is
    re-hashed.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "a").write_bytes(b"1"); _ = (d / "b").write_bytes(b"2")
    >>> m = create_manifest(d)
    >>> verify_manifest(d, m).files
    2
    >>> verify_manifest(d, m.to_json()).files
    2
    >>> _ = (d / "a").write_bytes(b"X"); (d / "b").unlink()
    >>> try:
    ...     verify_manifest(d, m)
    ... except IntegrityError as err:
    ...     print(err.details)
    ('modified: a (content differs)', 'missing: b')
    """
    text = manifest if isinstance(manifest, str | bytes) else None
    if text is None and not isinstance(manifest, Manifest):
        raise ConfigurationError("verify_manifest needs a Manifest or its JSON text")
    n_jobs = jobs_arg(jobs)
    _warn_hardlinks(unsafe_allow_external_hardlinks)
    start = time.monotonic()
    root = resolve_root(path)
    scan = walk_tree(root, allow_internal_symlinks, defer_files=True)
    # Tiny-file digests do not depend on sharding; only a SHA-256 manifest can use them.
    early = EarlyHashing(scan, n_jobs) if text is not None and _says_sha256(text) else None
    try:
        if text is not None:
            manifest = Manifest.from_json(text)
        assert isinstance(manifest, Manifest)
        if early is not None and manifest.algorithm != "sha256":
            early.stop()
            early = None
        findings, to_hash = differences(scan, manifest, unsafe_allow_external_hardlinks,
                                         deferred_links=True)
        done = early.keys if early is not None else set()
        # Files the manifest calls large are hashed here, whatever a helper made of them.
        here = [(k, n) for k, n, e in to_hash if k not in done or e.size >= TINY]
        digests, errors = hash_nodes(here, algorithm=manifest.algorithm,
                                      shard_size=int(manifest.params.get("shard_size", 0)),
                                      jobs=n_jobs, progress=progress,
                                      tiny_helpers=early is None or not early.helpers)
        if early is not None:
            _take_early(early.collect(progress), to_hash, digests, errors)
    finally:
        if early is not None:
            early.stop()
    for key, _node, entry in to_hash:
        if key in errors:
            findings.append(f"modified: {key} ({errors[key]})")
        elif digests[key] != entry.digest:
            findings.append(f"modified: {key} (content differs)")
    if not unsafe_allow_external_hardlinks:
        findings += _hardlink_findings(scan, {e.path for e in manifest.entries}, digests)
    finish(findings, root)
    return VerificationReport(root, manifest.digest, len(to_hash),
                              sum(e.size for _, _, e in to_hash), time.monotonic() - start)


def _says_sha256(text: str | bytes) -> bool:
    head = text[:400]
    return (b'"algorithm": "sha256"' in head if isinstance(head, bytes)
            else '"algorithm": "sha256"' in head)


def _take_early(results: tuple[dict[str, str], dict[str, str], Stats, list[str]],
                to_hash: list[tuple[str, Node, ManifestEntry]],
                digests: dict[str, str], errors: dict[str, str]) -> None:
    """Check what the early helpers hashed against the manifest, as the in-process path would:
    a file of another size than the manifest's is reported by size, never by content."""
    e_digests, e_errors, e_stats, e_large = results
    large = set(e_large)
    for key, node, entry in to_hash:
        if key in digests or key in errors or entry.size >= TINY:
            continue  # hashed in this process
        st = e_stats.get(key)
        if st is not None:
            node.settle(*st)
        if key in e_errors:
            errors[key] = e_errors[key]
        elif st is not None and st[0] != entry.size:
            errors[key] = f"size {st[0]}, manifest {entry.size}"
        elif key in large or key not in e_digests:
            errors[key] = "not hashed"  # pragma: no cover - a helper answers every file
        else:
            digests[key] = e_digests[key]


@gc_paused
def stage_and_verify(
    source: str | os.PathLike[str],
    manifest: Manifest,
    staging: str | os.PathLike[str],
    *,
    jobs: int | None = None,
    allow_internal_symlinks: bool = False,
    progress: ProgressCallback | None = None,
) -> VerificationReport:
    """Copy ``source`` into a new ``staging`` directory, hashing the bytes as they are copied.

    The copy is verified against ``manifest`` from the very bytes written, then made read-only.
    The step body reads the staged copy, so nothing can change between check and use short of
    write access to the staging area. On any difference the staging directory is removed and
    :class:`~stepguard.errors.IntegrityError` is raised. ``staging`` must not exist yet.

    >>> import tempfile, pathlib
    >>> src = pathlib.Path(tempfile.mkdtemp()); _ = (src / "d.csv").write_text("x,y\\n")
    >>> dst = pathlib.Path(tempfile.mkdtemp()) / "staged"
    >>> stage_and_verify(src, create_manifest(src), dst).files
    1
    >>> (dst / "d.csv").read_text()
    'x,y\\n'
    """
    if not isinstance(manifest, Manifest):
        raise ConfigurationError("stage_and_verify needs a Manifest")
    n_jobs = jobs_arg(jobs)
    start = time.monotonic()
    dest_root = os.path.abspath(os.fspath(staging))
    if os.path.lexists(dest_root):
        raise ConfigurationError("staging directory must not exist yet", subject=dest_root)
    root = resolve_root(source)
    scan = walk_tree(root, allow_internal_symlinks)
    findings, to_hash = differences(scan, manifest, False)
    if findings:
        finish(findings, root)
    try:
        os.makedirs(dest_root, mode=0o700)
        for key, _node, _entry in to_hash:
            target = os.path.join(dest_root, key)
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.ftruncate(fd, _entry.size)
            finally:
                os.close(fd)
    except OSError as exc:
        shutil.rmtree(dest_root, ignore_errors=True)
        raise OperationalError("cannot create the staging area", subject=dest_root) from exc
    ok = False
    try:
        digests, errors = hash_nodes([(k, n) for k, n, _ in to_hash],
                                      algorithm=manifest.algorithm,
                                      shard_size=int(manifest.params.get("shard_size", 0)),
                                      jobs=n_jobs, progress=progress, dest_root=dest_root)
        for key, _node, entry in to_hash:
            if key in errors:
                findings.append(f"modified: {key} ({errors[key]})")
            elif digests[key] != entry.digest:
                findings.append(f"modified: {key} (content differs)")
        finish(findings, root)
        make_read_only(dest_root)
        ok = True
    finally:
        if not ok:
            shutil.rmtree(dest_root, ignore_errors=True)
    return VerificationReport(dest_root, manifest.digest, len(to_hash),
                              sum(e.size for _, _, e in to_hash), time.monotonic() - start)


def make_read_only(root: str) -> None:
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o400, follow_symlinks=False)
        os.chmod(dirpath, 0o500)


def finding_path(finding: str) -> str:
    return finding.split(": ", 1)[1].split(" (", maxsplit=1)[0]
