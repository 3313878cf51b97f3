"""Plain SHA-256 digests of files: the entry points other controls hash through.

Integrity owns "bytes -> digests". Signing (the model-signing manifest records each file's plain
SHA-256), the registries (which hash the bytes they store as they copy them) and the ``sha256sum``
export all read files here, with the same rules as the manifest operations:

* :func:`file_digests` walks the tree itself (no link followed, every directory's identity
  checked), opens each file with ``O_NOFOLLOW`` relative to its checked directory, checks the
  descriptor's type and identity against the walk and hashes exactly the bytes read through it
  (see ``_walk.py`` and ``_engine.py``). The caller chooses *which* files (``names``); a name that
  is not a regular file of the tree, or a file that changes while it is read, is an
  :class:`~stepguard.errors.IntegrityError` naming it.
* :func:`copy_file` copies one file into a descriptor while hashing it, so the digest describes
  exactly the bytes written.
* :func:`plain_sha256_digests` gives the plain digest of each sharded manifest entry, checking its
  shards against the manifest from the same read.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "sub").mkdir(); _ = (d / "sub" / "w.bin").write_bytes(b"abc")
>>> _ = (d / "notes.txt").write_bytes(b"")
>>> digests = file_digests(d, ["sub/w.bin"])
>>> digests["sub/w.bin"][:16]
'ba7816bf8f01cfea'
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from stepguard._private.fileio import write_all
from stepguard.errors import IntegrityError, ManifestError
from stepguard.integrity._direct import OPEN_FLAGS, Changed, aligned_buffer
from stepguard.integrity._engine import hash_nodes
from stepguard.integrity._gc import gc_paused
from stepguard.integrity._manifest import Manifest, ManifestEntry
from stepguard.integrity._tree import differences, finding_path, finish, jobs_arg
from stepguard.integrity._walk import Node, resolve_root, walk_tree

__all__ = ["copy_file", "file_digests", "plain_sha256_digests"]

_BUF = 1024 * 1024
_COPY_BUF = 8 * 1024 * 1024


@gc_paused
def file_digests(path: str | os.PathLike[str], names: Iterable[str] | None = None, *,
                 jobs: int | None = None) -> dict[str, str]:
    """Plain SHA-256 (hex) of files under ``path``, keyed by relative POSIX path.

    ``names``: the files wanted (relative POSIX paths under the directory ``path``); by default
    every entry of the tree, which must then all be regular files. For a single file ``path``
    the key is its name. Raises :class:`~stepguard.errors.IntegrityError` listing every wanted
    name that is missing, is not a regular file (a symlink, FIFO, device or directory), or was
    replaced or modified while it was read. Hard links are not checked here (the manifest
    operations refuse files with names outside the tree; signing does not). ``jobs`` defaults
    to the usable CPUs.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "a").write_bytes(b"abc")
    >>> (d / "b").symlink_to("a")
    >>> file_digests(d, ["a"])["a"][:16]
    'ba7816bf8f01cfea'
    >>> file_digests(d)
    Traceback (most recent call last):
    ...
    stepguard.errors.IntegrityError: cannot hash files: b
    """
    n_jobs = jobs_arg(jobs)
    root = resolve_root(path)
    wanted = None if names is None else sorted(set(names))
    # Only the directories on the way to a wanted file are walked (not a .git/ left unsigned).
    descend = None if wanted is None else {name[:i] for name in wanted
                                           for i, c in enumerate(name) if c == "/"}
    scan = walk_tree(root, False, defer_files=True, descend=descend)
    findings: list[str] = []
    if wanted is None:
        findings += [f"unreadable: {p} ({why})" for p, why in scan.problems]
        wanted = sorted(scan.nodes)
    items: list[tuple[str, Node]] = []
    for key in wanted:
        node = scan.nodes.get(key)
        if node is None:
            what = "directory" if key in scan.dirs else None
            findings.append(f"type changed: {key} (expected file, found {what})" if what
                            else f"missing: {key}")
        elif node.kind != "file":
            note = f" {node.note}" if node.note else ""
            findings.append(f"type changed: {key} (expected file, found {node.kind}{note})")
        else:
            items.append((key, node))
    if findings:
        findings.sort(key=finding_path)
        raise IntegrityError("cannot hash files", subject=finding_path(findings[0]),
                             details=tuple(findings), hint=f"root: {root}")
    digests, errors = hash_nodes(items, algorithm="sha256", shard_size=0, jobs=n_jobs,
                                 progress=None)
    if errors:
        raise IntegrityError("files changed while they were being hashed", subject=min(errors),
                             details=tuple(f"modified: {k} ({why})"
                                           for k, why in sorted(errors.items())))
    return {k: d[len("sha256:"):] for k, d in digests.items()}


def open_regular(name: str) -> tuple[int, os.stat_result]:
    """Open ``name`` for reading without following a symlink; return the descriptor and its
    ``fstat``. Anything but a regular file is refused (the descriptor is then closed), so a
    FIFO, device or socket can never stall or feed a reader. Raises
    :class:`~stepguard.errors.IntegrityError` naming the path.
    """
    try:
        fd = os.open(name, OPEN_FLAGS)
    except OSError as exc:
        raise IntegrityError(f"cannot open ({exc.strerror})", subject=name) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError("not a regular file (refused)", subject=name)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def copy_file(src: str | os.PathLike[str], dest_fd: int) -> str:
    """Copy the regular file ``src`` into the descriptor ``dest_fd``; return the SHA-256 (hex)
    of exactly the bytes written.

    ``src`` is opened with ``O_NOFOLLOW`` (a symlink is refused) and must stay a regular file of
    the same size and mtime while it is read, else :class:`~stepguard.errors.IntegrityError`.

    >>> import os, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "a").write_bytes(b"abc")
    >>> fd = os.open(d / "copy", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    >>> copy_file(d / "a", fd)[:16]; os.close(fd)
    'ba7816bf8f01cfea'
    >>> (d / "copy").read_bytes()
    b'abc'
    """
    name = os.fspath(src)
    fd, st = open_regular(name)
    try:
        h = hashlib.sha256()
        view = aligned_buffer(min(_COPY_BUF, max(st.st_size, 1)))
        while True:
            n = os.readv(fd, [view])
            if not n:
                break
            h.update(view[:n])
            write_all(dest_fd, view[:n])
        st2 = os.fstat(fd)
        if st2.st_size != st.st_size or st2.st_mtime_ns != st.st_mtime_ns:
            raise IntegrityError("file modified while it was being copied", subject=name)
        return h.hexdigest()
    finally:
        os.close(fd)


@gc_paused
def plain_sha256_digests(
    path: str | os.PathLike[str], manifest: Manifest, *, jobs: int | None = None
) -> dict[str, str]:
    """Plain SHA-256 (hex) of every sharded entry, for ``sha256sum`` export.

    Each file is read once through a checked descriptor (``O_NOFOLLOW``, identity against the
    walk), computing its plain digest and its shard digests together; if the shards do not
    match the manifest the file is reported (IntegrityError) instead of exported.
    """
    if manifest.algorithm != "sha256":
        raise ManifestError("plain SHA-256 digests only apply to sha256 manifests")
    n_jobs = jobs_arg(jobs)
    root = resolve_root(path)
    scan = walk_tree(root, False)
    findings, to_hash = differences(scan, manifest, True)
    sharded = {e.path for e in manifest.entries if e.scheme == "sha256-sharded"}
    # Only the files being exported matter here; the rest is verify_manifest's job.
    findings = [f for f in findings if finding_path(f) in sharded]
    shard = int(manifest.params.get("shard_size", 0))
    wanted = [(k, n, e) for k, n, e in to_hash if k in sharded]

    def one(item: tuple[str, Node, ManifestEntry]) -> tuple[str, str | None, str | None]:
        key, node, entry = item
        try:
            plain, parts = _plain_and_shards(node, shard)
        except Changed as exc:
            return key, None, f"modified: {key} ({exc})"
        composite = "sha256-sharded:" + hashlib.sha256(b"".join(parts)).hexdigest()
        if composite != entry.digest:
            return key, None, f"modified: {key} (content differs)"
        return key, plain, None

    out: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=n_jobs) as pool:
        for key, hexd, problem in pool.map(one, wanted):
            if hexd is not None:
                out[key] = hexd
            elif problem is not None:
                findings.append(problem)
    finish(findings, root)
    return out


def _plain_and_shards(node: Node, shard: int) -> tuple[str, list[bytes]]:
    """Read ``node`` once through a checked descriptor: its plain digest and shard digests."""
    try:
        fd = os.open(node.open_path, OPEN_FLAGS)
    except OSError as exc:
        raise Changed(f"cannot open ({exc.strerror})") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != node.ident:
            raise Changed("replaced while verifying")
        if st.st_size != node.size:
            raise Changed(f"size changed while verifying ({node.size} -> {st.st_size})")
        plain = hashlib.sha256()
        parts: list[bytes] = []
        buf = aligned_buffer(_BUF)
        left_total = node.size
        while left_total > 0:
            h = hashlib.sha256()
            left = min(shard, left_total)
            while left:
                n = os.readv(fd, [buf[:min(_BUF, left)]])
                if not n:
                    raise Changed("truncated while verifying")
                h.update(buf[:n])
                plain.update(buf[:n])
                left -= n
                left_total -= n
            parts.append(h.digest())
        if os.read(fd, 1):
            raise Changed("grew while verifying")
        st2 = os.fstat(fd)
        if st2.st_size != st.st_size or st2.st_mtime_ns != st.st_mtime_ns:
            raise Changed("modified while verifying")
        return plain.hexdigest(), parts
    except OSError as exc:
        raise Changed(f"read failed ({exc.strerror})") from exc
    finally:
        os.close(fd)
