"""Rules for the relative paths a manifest may contain.

A manifest path is later joined to a directory on another machine (a staging area, a sandbox bind,
a bucket prefix). Anything that could escape that directory, or that names two different files on a
case-insensitive or normalising filesystem (macOS, Windows, some object-store gateways), is refused.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

__all__ = ["collision_key", "find_collisions", "path_problems"]


# Plain ASCII names whose components do not start with "." and contain no ":" are safe; checking
# them with one regex keeps validation of 100,000-entry manifests cheap.
_COMPONENT = r"[A-Za-z0-9_\-+=,@~][A-Za-z0-9_.\-+=,@~ ]*"
_FAST_SAFE = re.compile(rf"(?:{_COMPONENT}/)*{_COMPONENT}")


def path_problems(path: object) -> list[str]:
    """Every reason ``path`` is not a safe manifest path (empty list when it is safe).

    >>> path_problems("data/train.csv")
    []
    >>> path_problems("../etc/passwd")
    ["path contains '..'"]
    """
    if isinstance(path, str) and _FAST_SAFE.fullmatch(path):
        return []
    if not isinstance(path, str):
        return ["path is not a string"]
    problems: list[str] = []
    if not path:
        return ["path is empty"]
    if "\x00" in path:
        problems.append("path contains NUL")
    if "\\" in path:
        problems.append("path contains a backslash")
    if path.startswith("/"):
        problems.append("path is absolute")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path if c != "\x00"):
        problems.append("path contains a control character")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        problems.append("path is not valid UTF-8")
    parts = path.split("/")
    if ".." in parts:
        problems.append("path contains '..'")
    if "." in parts:
        problems.append("path contains '.'")
    if not path.startswith("/") and "" in parts:
        problems.append("path contains an empty component")
    if len(path) >= 2 and path[1] == ":" and path[0].isascii() and path[0].isalpha():
        # "C:foo" is a drive-relative path on Windows.
        problems.append("path starts with a drive letter")
    return problems


def collision_key(path: str) -> str:
    """The key under which two names would be the same file on a normalising, case-folding FS."""
    if path.isascii():
        return path.lower()
    return unicodedata.normalize("NFC", path).casefold()


def find_collisions(paths: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs of distinct paths (or directory prefixes) that collide, and file/directory clashes.

    Directory prefixes count: ``Data/a`` and ``data/b`` put two files in what a case-insensitive
    filesystem sees as one directory under two spellings.

    >>> find_collisions(["Data/a", "data/b", "x"])
    [('Data', 'data')]
    """
    seen: dict[str, str] = {}
    files: list[str] = []
    dirs: set[str] = set()
    out: list[tuple[str, str]] = []
    for path in paths:
        files.append(path)
        other = seen.setdefault(collision_key(path), path)
        if other != path:
            out.append((other, path))
        d = path.rpartition("/")[0]
        while d and d not in dirs:
            dirs.add(d)
            other = seen.setdefault(collision_key(d), d)
            if other != d:
                out.append((other, d))
            d = d.rpartition("/")[0]
    for path in sorted(dirs.intersection(files)):
        out.append((path, path + "/..."))
    return out
