"""Which files a model signature covers, and their per-file SHA-256.

Per-file plain SHA-256 is what ``model_signing``'s ``files`` serialization records. :func:`walk`
decides which files are signed (every regular file, minus ``skip``) and refuses symlinks and
special files rather than following them; the bytes are hashed by integrity's public entry
point, :func:`stepguard.integrity.file_digests`, which walks the tree itself (device/inode
checks), opens each file with ``O_NOFOLLOW`` through its checked directory and hashes exactly
the bytes read -- not through ``model_signing``'s serializer.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from stepguard.errors import ConfigurationError, IntegrityError


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


def hash_files(files: Mapping[str, Path], *, jobs: int | None = None) -> dict[str, str]:
    """Plain SHA-256 (hex) of each file (relative path -> ``root/relative path``, or ``"."`` ->
    a single-file model), read through :func:`stepguard.integrity.file_digests`."""
    from stepguard.integrity import file_digests

    out: dict[str, str] = {}
    by_root: dict[str, list[str]] = {}
    for rel, path in files.items():
        full = os.fspath(path)
        if rel == ".":
            (out["."],) = file_digests(full, jobs=jobs).values()
            continue
        suffix = "/" + rel
        if not full.endswith(suffix):
            raise ConfigurationError("file is not at its relative path", subject=rel,
                                     details=(full,))
        by_root.setdefault(full[:-len(suffix)] or "/", []).append(rel)
    for root, names in by_root.items():
        out.update(file_digests(root, names, jobs=jobs))
    return out


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
