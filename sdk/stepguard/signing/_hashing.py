"""Strict tree walk and parallel SHA-256 of every file, for model signatures.

Per-file plain SHA-256 is what ``model_signing``'s ``files`` serialization records; we compute it
ourselves (large reads, one thread per file, hashlib releases the GIL) instead of through its
serializer, and we refuse symlinks and special files while walking rather than following them.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from stepguard._private.fileio import write_all
from stepguard.errors import ConfigurationError, IntegrityError

_BUF = 8 * 1024 * 1024


@dataclass(frozen=True)
class WalkResult:
    """Relative POSIX path -> absolute path of every regular file; refusals found on the way."""

    files: dict[str, Path]
    problems: tuple[str, ...]


def walk(root: Path, *, skip: Collection[str] = ()) -> WalkResult:
    """List every regular file under ``root`` without following any link.

    Symlinks (to files or directories) and special files are reported as problems, never
    followed: a link swapped in after signing must not redirect what gets hashed or loaded.
    """
    try:
        st = os.lstat(root)
    except OSError as exc:
        raise ConfigurationError(f"cannot read model path ({exc.strerror})",
                                 subject=str(root)) from exc
    if stat.S_ISLNK(st.st_mode):
        raise IntegrityError("model path is a symlink (refused)", subject=str(root))
    if stat.S_ISREG(st.st_mode):
        return WalkResult({root.name: root}, ())
    if not stat.S_ISDIR(st.st_mode):
        raise IntegrityError("model path is not a file or directory", subject=str(root))
    files: dict[str, Path] = {}
    problems: list[str] = []
    stack = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        with os.scandir(directory) as it:
            for entry in it:
                rel = f"{prefix}{entry.name}"
                if rel in skip:
                    continue
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISLNK(mode):
                    problems.append(f"symlink (refused): {rel}")
                elif stat.S_ISDIR(mode):
                    stack.append((Path(entry.path), rel + "/"))
                elif stat.S_ISREG(mode):
                    files[rel] = Path(entry.path)
                else:
                    problems.append(f"special file (refused): {rel}")
    return WalkResult(files, tuple(sorted(problems)))


def sha256_file(path: Path, *, copy_to: int | None = None) -> str:
    """Hex SHA-256 of a file, read with large buffers and O_NOFOLLOW.

    With ``copy_to`` (a file descriptor) the bytes are also written there as they are hashed:
    one read, so the digest describes exactly what was written."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        buf = bytearray(_BUF)
        view = memoryview(buf)
        while True:
            n = os.readv(fd, [buf])
            if not n:
                break
            h.update(view[:n])
            if copy_to is not None:
                write_all(copy_to, view[:n])
    finally:
        os.close(fd)
    return h.hexdigest()


def hash_files(files: dict[str, Path], *, jobs: int | None = None) -> dict[str, str]:
    """Hash files in parallel: relative path -> hex SHA-256."""
    if not files:
        return {}
    # hashlib releases the GIL on large updates; a few more threads than cores keeps every core
    # busy while others wait on I/O (the same default as concurrent.futures).
    workers = max(1, min(jobs or min(32, (os.cpu_count() or 1) + 4), len(files)))
    items = sorted(files.items(), key=lambda kv: -_size(kv[1]))  # big files first
    if workers == 1:
        return {rel: sha256_file(p) for rel, p in items}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = pool.map(lambda kv: sha256_file(kv[1]), items)
        return {rel: d for (rel, _), d in zip(items, digests, strict=True)}


def _size(p: Path) -> int:
    try:
        return os.lstat(p).st_size
    except OSError:
        return 0


def diff(expected: dict[str, str], actual: dict[str, str],
         extra_problems: Iterable[str] = ()) -> list[str]:
    """One line per difference: modified, missing, unsigned (added)."""
    out = list(extra_problems)
    for name in sorted(expected.keys() - actual.keys()):
        out.append(f"missing: {name}")
    for name in sorted(actual.keys() - expected.keys()):
        out.append(f"unsigned file (not in signature): {name}")
    for name in sorted(expected.keys() & actual.keys()):
        if expected[name] != actual[name]:
            out.append(f"modified: {name}")
    return out
