"""Writing to file descriptors without losing bytes."""

from __future__ import annotations

import os


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data`` to ``fd``: ``os.write`` may take fewer bytes than asked (a full
    disk, a signal, a pipe).

    >>> r, w = os.pipe()
    >>> write_all(w, b"abc"); os.close(w)
    >>> os.read(r, 10)
    b'abc'
    >>> os.close(r)
    """
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
