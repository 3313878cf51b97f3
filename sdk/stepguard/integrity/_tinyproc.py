"""Hashing many tiny files in helper interpreters, for trees of tens of thousands of them.

Per 4 KiB file, the Python around open/fstat/read/close/hash costs as much as the hashing, and
it holds the GIL, so threads do not help. A freshly started interpreter (``-I -S``: no
environment, no site) takes a share of the files and runs exactly the checks of the in-process
path -- the same function, ``_direct.hash_tiny``, run as the helper's program (``python -I -S
_direct.py``; the request and answer protocol is described there). A fresh interpreter rather
than ``fork``: the caller may have threads (ours or its own) holding locks that a forked child
would inherit. If a helper cannot be started or
misbehaves, its share is hashed in-process, so the result never depends on the helpers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import BinaryIO

from stepguard.integrity import _direct
from stepguard.integrity._direct import TinyFile

#: The helper's program: a module file of its own, run by path (see ``_direct.py``).
_PROGRAM = _direct.__file__


def parse_line(line: str) -> str | tuple[str | None, tuple[int, int, int, int] | None]:
    """A helper's answer for one file: the problem, or (hex digest or None when the file was
    passed over as not tiny, (size, dev, ino, nlink) or None when the walk had stat'ed it).

    >>> parse_line("!cannot open (No such file or directory)")
    'cannot open (No such file or directory)'
    >>> parse_line("ab12 4096 2049 77 1")
    ('ab12', (4096, 2049, 77, 1))
    >>> parse_line("L 99999 2049 78 1")
    (None, (99999, 2049, 78, 1))
    >>> parse_line("cd34 512")
    ('cd34', (512, -1, -1, 1))
    """
    if line.startswith("!"):
        return line[1:]
    head, sep, rest = line.partition(" ")
    if not sep:
        return line, None
    if " " not in rest:  # one name: its identity is of no interest
        return head, (int(rest), -1, -1, 1)
    size, dev, ino, nlink = (int(x) for x in rest.split(" "))
    return (None if head == "L" else head), (size, dev, ino, nlink)


#: Tiny files hashed in the time a helper takes to start and read its share (about 40 ms).
_STARTUP_FILES = 4000

def _anonymous_file() -> BinaryIO:
    """A read/write file with no name: in memory where the kernel offers it."""
    try:
        fd = os.memfd_create("stepguard-tiny", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        return tempfile.TemporaryFile()
    return open(fd, "w+b")


class Helper:
    """One helper interpreter hashing a share of the files while the caller does other work.

    The share goes in and the answers come out through anonymous files, not pipes: a pipe would
    need a thread of the caller to feed and drain it, and that thread competes for the GIL with
    the caller's own (CPU-bound) work, starving the helper.
    """

    def __init__(self, share: list[TinyFile], open_flags: int, tiny: int) -> None:
        self.share = share
        self._proc: subprocess.Popen[bytes] | None = None
        self._files: list[BinaryIO] = []
        parts = [str(open_flags).encode(), str(tiny).encode()]
        unknown = b"-1"
        fsencode = os.fsencode
        last: tuple[int, int] | None = None
        pdev = pino = unknown
        for _key, path, (dev, ino), size, parent in share:
            if parent != last:  # files come directory by directory: encode each one once
                last = parent
                pdev, pino = (b"%d" % parent[0], b"%d" % parent[1]) if parent else (unknown,
                                                                                    unknown)
            if dev < 0 and size < 0:  # not stat'ed yet: the common case, kept cheap
                parts += (unknown, unknown, unknown, pdev, pino, fsencode(path))
            else:
                parts += (b"%d" % dev, b"%d" % ino, b"%d" % size, pdev, pino, fsencode(path))
        parts.append(b"")
        exe = sys.executable
        # Embedded interpreters (uWSGI, frozen apps) report a sys.executable that is not Python.
        if not exe or not os.path.basename(exe).startswith("python"):
            return
        if not _PROGRAM or not os.path.isfile(_PROGRAM):  # e.g. imported from a zip file
            return
        try:
            stdin, stdout = _anonymous_file(), _anonymous_file()
            self._files += (stdin, stdout)
            stdin.write(b"\0".join(parts))
            stdin.seek(0)
            self._proc = subprocess.Popen(
                [exe, "-I", "-S", _PROGRAM],
                stdin=stdin, stdout=stdout, stderr=subprocess.DEVNULL, close_fds=True,
            )
        except (OSError, ValueError):
            self.stop()
            return

    def stop(self) -> None:
        """Kill the helper if it is still running (the caller gave up on the results)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        for f in self._files:
            f.close()
        self._files = []

    def results(self) -> list[str] | None:
        """One line per file of the share, or None if the helper failed (hash in-process)."""
        if self._proc is None or not self._files:
            return None
        if self._proc.wait() != 0:
            return None
        out = self._files[1]
        out.seek(0)
        raw = out.read()
        lines = raw.decode("utf-8", "surrogateescape").split("\n") if raw else []
        if len(lines) != len(self.share):
            return None
        return lines


def run_helpers(files: list[TinyFile], helpers: int, open_flags: int, tiny: int, *,
                hash_here: Callable[[list[TinyFile]], None],
                merge: Callable[[list[TinyFile], list[str]], None]) -> None:
    """Split ``files`` into ``helpers + 1`` shares; hash one here, the rest in helpers.

    The caller's share is larger by what the helpers spend starting up, so all finish together.
    """
    n = len(files)
    own = min(n, -(-n // (helpers + 1)) + _STARTUP_FILES * helpers // (helpers + 1))
    per = -(-(n - own) // helpers) if helpers and n > own else n
    started: list[Helper] = []
    try:
        started += (Helper(files[i:i + per], open_flags, tiny) for i in range(own, n, per))
        hash_here(files[:own])
        for h in started:
            lines = h.results()
            if lines is None:
                hash_here(h.share)
            else:
                merge(h.share, lines)
    finally:
        for h in started:
            h.stop()
