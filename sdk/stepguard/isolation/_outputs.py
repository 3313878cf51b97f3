"""What a sandboxed body leaves in its output directories, made safe to hand to the host.

A body may write anything its output bind allows. Before anything reads the output, every
writable bind is walked (by descriptor, never following a symlink, so nothing the body planted can
redirect the walk) and:

* set-user-ID and set-group-ID bits are cleared on every file and directory. A regular file that
  carried one is reported: the run is refused with an error that names it;
* FIFOs, sockets and device nodes are removed and reported the same way (a FIFO would also hang
  whoever opens it; a device node is a door into the host);
* when the body ran under its own host uid (a sandbox started by root), ownership is handed back:
  everything the body created belongs to the caller again and the bind's top directory gets its
  original owner back.

>>> import os, stat, tempfile
>>> top = tempfile.mkdtemp()
>>> path = os.path.join(top, "tool")
>>> with open(path, "w") as fh:
...     _ = fh.write("#!/bin/sh\\n")
>>> os.chmod(path, 0o6755)
>>> os.mkfifo(os.path.join(top, "pipe"))
>>> report = sanitize_output(top)
>>> report.setid, report.special
(('tool',), ('pipe',))
>>> oct(stat.S_IMODE(os.stat(path).st_mode)), os.path.exists(os.path.join(top, "pipe"))
('0o755', False)
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass

_SETID = stat.S_ISUID | stat.S_ISGID
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass(frozen=True)
class OutputReport:
    """Paths (relative to the output directory) that were made safe."""

    setid: tuple[str, ...] = ()
    special: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        """True when the body left neither set-id files nor special files."""
        return not self.setid and not self.special


def _fix(name: str, dir_fd: int | None, st: os.stat_result,
         owner: tuple[int, int] | None) -> bool:
    """Clear set-id bits (and hand back ownership); True when a regular file carried them."""
    mode = stat.S_IMODE(st.st_mode)
    try:
        fd = os.open(name, _OPEN, dir_fd=dir_fd)
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            now = os.fstat(fd)
            if stat.S_IFMT(now.st_mode) != stat.S_IFMT(st.st_mode):
                return False  # replaced under us: the walk sees the new entry on its own
            if owner is not None and now.st_uid != owner[0]:
                os.fchown(fd, *owner)
            mode = stat.S_IMODE(now.st_mode)
            if mode & _SETID:
                os.fchmod(fd, mode & ~_SETID)
        finally:
            os.close(fd)
    elif mode & _SETID:
        # Our own file with no read permission (a sandbox that shares our uid): by name, the
        # walk's directory descriptor pins where it is.
        os.chmod(name, mode & ~_SETID, dir_fd=dir_fd)
    return bool(mode & _SETID) and stat.S_ISREG(st.st_mode)


def sanitize_output(root: str, *, owner: tuple[int, int] | None = None,
                    top_owner: tuple[int, int] | None = None,
                    body_uid: int | None = None) -> OutputReport:
    """Walk ``root`` and make it safe (see the module docstring); returns what was found.

    ``owner``: give files owned by ``body_uid`` (every file when ``body_uid`` is None) to this
    uid/gid. ``top_owner``: the owner ``root`` itself gets back.
    """
    setid: list[str] = []
    special: list[str] = []
    top = os.stat(root, follow_symlinks=False)
    if stat.S_ISREG(top.st_mode):
        # A single writable file was bound: the same rules for it alone.
        name = os.path.basename(root)
        return OutputReport((name,) if _fix(root, None, top, top_owner) else ())
    if not stat.S_ISDIR(top.st_mode):
        return OutputReport()
    _fix(root, None, top, top_owner)
    for dirpath, dirnames, filenames, dir_fd in os.fwalk(root, follow_symlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        for name in [*dirnames, *filenames]:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            give = owner if owner is not None and (body_uid is None
                                                    or st.st_uid == body_uid) else None
            if stat.S_ISLNK(st.st_mode):
                if give is not None:
                    os.chown(name, *give, dir_fd=dir_fd, follow_symlinks=False)
            elif stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                if _fix(name, dir_fd, st, give):
                    setid.append(rel)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dir_fd)
                special.append(rel)
    return OutputReport(tuple(sorted(setid)), tuple(sorted(special)))
