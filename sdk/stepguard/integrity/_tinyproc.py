"""Hashing many tiny files in helper interpreters, for trees of tens of thousands of them.

Per 4 KiB file, the Python around open/fstat/read/close/hash costs as much as the hashing, and
it holds the GIL, so threads do not help. A freshly started interpreter (``-I -S``: no
environment, no site) takes a share of the files and runs exactly the checks of the in-process
path: ``O_NOFOLLOW`` open, ``fstat`` type and (device, inode) identity against the walk, one read
of size+1 bytes. A fresh interpreter rather than ``fork``: the caller may have threads (ours or
its own) holding locks that a forked child would inherit. If a helper cannot be started or
misbehaves, its share is hashed in-process, so the result never depends on the helpers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable

# Runs in the helper. Input: NUL-separated open flags, then (dev, ino, size, path) per file.
# Output: one line per file, in order: the SHA-256 hex digest, or "!" and the problem.
_CHILD = r"""
import hashlib, os, stat, sys
f = sys.stdin.buffer.read().split(b"\0")
flags = int(f[0]); out = []
it = iter(f[1:-1])
for dev, ino, size, path in zip(it, it, it, it):
    size = int(size)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        out.append(f"!cannot open ({exc.strerror})"); continue
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (int(dev), int(ino)):
            out.append("!replaced while verifying"); continue
        data = os.read(fd, size + 1)
    except OSError as exc:
        out.append(f"!read failed ({exc.strerror})"); continue
    finally:
        os.close(fd)
    if len(data) != size:
        out.append(f"!size changed while verifying ({size} -> {len(data)})"); continue
    out.append(hashlib.sha256(data).hexdigest())
sys.stdout.buffer.write("\n".join(out).encode("utf-8", "surrogateescape"))
"""

# One (key, open path, (dev, ino), size) per file.
TinyFile = tuple[str, str, tuple[int, int], int]


class Helper:
    """One helper interpreter hashing a share of the files while the caller hashes its own."""

    def __init__(self, share: list[TinyFile], open_flags: int) -> None:
        self.share = share
        self._out: list[bytes] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        parts = [str(open_flags).encode()]
        for _key, path, (dev, ino), size in share:
            parts += (b"%d" % dev, b"%d" % ino, b"%d" % size, os.fsencode(path))
        parts.append(b"")
        payload = b"\0".join(parts)
        exe = sys.executable
        # Embedded interpreters (uWSGI, frozen apps) report a sys.executable that is not Python.
        if not exe or not os.path.basename(exe).startswith("python"):
            return
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _CHILD],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                close_fds=True,
            )
        except (OSError, ValueError):
            return
        # communicate() in a thread: the helper's output is larger than a pipe buffer, and the
        # caller is busy hashing its own share meanwhile (the thread sleeps in poll, GIL free).
        self._thread = threading.Thread(target=self._talk, args=(payload,), daemon=True,
                                        name="stepguard-tiny")
        self._thread.start()

    def _talk(self, payload: bytes) -> None:
        assert self._proc is not None
        try:
            out, _ = self._proc.communicate(payload)
        except (OSError, ValueError):
            return
        if self._proc.returncode == 0:
            self._out.append(out)

    def stop(self) -> None:
        """Kill the helper if it is still running (the caller gave up on the results)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._thread is not None:
            self._thread.join()

    def results(self) -> list[str] | None:
        """One line per file of the share, or None if the helper failed (hash in-process)."""
        if self._proc is None or self._thread is None:
            return None
        self._thread.join()
        if self._proc.poll() is None:  # pragma: no cover - communicate() returned early
            self._proc.kill()
            self._proc.wait()
        if not self._out:
            return None
        raw = self._out[0]
        lines = raw.decode("utf-8", "surrogateescape").split("\n") if raw else []
        if len(lines) != len(self.share):
            return None
        return lines


def run_helpers(files: list[TinyFile], helpers: int, open_flags: int,
                hash_here: Callable[[list[TinyFile]], None],
                merge: Callable[[list[TinyFile], list[str]], None]) -> None:
    """Split ``files`` into ``helpers + 1`` shares; hash one here, the rest in helpers."""
    n = len(files)
    per = -(-n // (helpers + 1))
    started: list[Helper] = []
    try:
        started += (Helper(files[i:i + per], open_flags) for i in range(per, n, per))
        hash_here(files[:per])
        for h in started:
            lines = h.results()
            if lines is None:
                hash_here(h.share)
            else:
                merge(h.share, lines)
    finally:
        for h in started:
            h.stop()
