"""The direct path for tiny files, in this process or as a helper interpreter's program.

Files below :data:`TINY` bytes are hashed here with no per-file job objects: each is opened with
``O_NOFOLLOW`` (relative to its directory, re-opened with ``O_DIRECTORY|O_NOFOLLOW`` and checked
against the identity the walk listed it under, when that identity is known), its ``fstat`` type
and (device, inode) identity are checked against the walk, and it is read whole with one read of
size+1 bytes, which also detects growth. :func:`hash_tiny` is that loop; the in-process engine
(``_engine.py``) and the helper interpreters (``_tinyproc.py``) run the same function.

This module is also the helper's program. A helper is started as
``python -I -S .../_direct.py`` (no environment, no site-packages), so it imports nothing but the
standard library and never imports stepguard. Protocol, stdin (NUL-separated): the open flags,
the tiny-file limit, then per file (dev, ino, size, directory dev, directory ino, path). dev -1:
not stat'ed yet (the descriptor's ``fstat`` decides; size -1: unknown); directory dev -1: open
the path as is. Stdout: one line per file, in order: the SHA-256 hex digest, for a file not
stat'ed before followed by `` size`` when its size was unknown, or `` size dev ino nlink`` when
it has several names; ``L size dev ino nlink`` for such a file that is not tiny after all (not
hashed); or ``!`` and the problem.

>>> import os, tempfile
>>> d = tempfile.mkdtemp(); p = os.path.join(d, "a")
>>> with open(p, "wb") as fh:
...     _ = fh.write(b"abc")
>>> st = os.stat(p)
>>> digests, errors, stats, large = {}, {}, {}, []
>>> with DirCursor() as dirs:
...     hash_tiny([("a", p, (st.st_dev, st.st_ino), 3, None)], "sha256", None, dirs,
...               bytearray(1024), digests=digests, errors=errors, stats=stats, large=large)
3
>>> digests["a"][:20], errors
('sha256:ba7816bf8f01c', {})
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import stat
import sys

# Not `typing.TYPE_CHECKING`: the helper must not pay for importing typing at start-up.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

#: One (key, open path, (dev, ino), size, identity of its directory or None) per file.
#: dev -1: not stat'ed yet; size -1: not known yet.
TinyFile = tuple[str, str, tuple[int, int], int, "tuple[int, int] | None"]
#: Statistics recorded for files not stat'ed before: key -> (size, dev, ino, link count).
Stats = dict[str, tuple[int, int, int, int]]

#: Files below this size take the direct path (one read of the whole file).
TINY = 256 * 1024
#: Below this size a file is read into a fresh bytes object (cheaper than slicing a reused
#: buffer; measured: 20,000 x 4 KiB files, 0.233 s against 0.250 s); from it up, into the
#: caller's reused buffer (a fresh object that size costs fresh pages for every file).
SMALL_FILE = 64 * 1024
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)

KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


def aligned_buffer(size: int) -> memoryview:
    """A writable buffer of ``size`` bytes (at least 1) that starts on a page boundary.

    Reading a file copies it out of the page cache, and that copy is much slower into a
    destination 16 bytes past a page boundary -- where a large ``bytearray``'s data starts,
    after the header of malloc's mapped chunk -- than into an aligned one (measured on this
    project's benchmark machine: 512 MiB in 1 MiB reads, 0.065 s against 0.037 s of CPU; the
    hashing itself does not care). Anonymous memory, not a file mapping: nothing another
    process does to a data file can take these pages away.

    >>> b = aligned_buffer(5); b[:3] = b"abc"; bytes(b) == b"abc" + bytes(2)
    True
    """
    return memoryview(mmap.mmap(-1, max(size, 1)))


def kind(mode: int) -> str:
    """The kind of file a mode describes, in words.

    >>> kind(stat.S_IFIFO | 0o644)
    'FIFO'
    """
    return KINDS.get(stat.S_IFMT(mode), "special file")


class Changed(Exception):
    """The file changed (or was replaced) between the walk and the read."""


class DirCursor:
    """The directory of the file being opened, opened itself (``O_NOFOLLOW|O_DIRECTORY``) and
    checked against the identity the walk listed it under; kept open while consecutive files
    come from it."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.ident: tuple[int, int] | None = None
        self.fd = -1
        self.problem: str | None = None

    def __enter__(self) -> DirCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path = None

    def open_in(self, path: str, parent: tuple[int, int], flags: int, *,
                check_only: bool = False) -> int:
        """Open ``path``'s last component relative to its checked directory (raises OSError,
        or Changed when the directory is not the one the walk listed). ``check_only``: only
        move the cursor to that directory and check it."""
        name = self._enter(path, parent)
        return -1 if check_only else os.open(name, flags, dir_fd=self.fd)

    def stat_in(self, path: str, parent: tuple[int, int]) -> os.stat_result:
        """``lstat`` of ``path``'s last component relative to its checked directory."""
        return os.stat(self._enter(path, parent), dir_fd=self.fd, follow_symlinks=False)

    def _enter(self, path: str, parent: tuple[int, int]) -> str:
        directory, _, name = path.rpartition("/")
        directory = directory or "/"
        if directory != self.path or parent != self.ident:
            self.close()
            self.path, self.ident, self.problem = directory, parent, None
            try:
                self.fd = os.open(directory, DIR_FLAGS)
                st = os.fstat(self.fd)
                if (st.st_dev, st.st_ino) != parent:
                    self.problem = "directory replaced while verifying"
            except OSError as exc:
                # A link or a file where the directory was: it has been replaced.
                self.problem = ("directory replaced while verifying"
                                if exc.errno in (errno.ELOOP, errno.ENOTDIR)
                                else f"cannot open its directory ({exc.strerror})")
        if self.problem is not None:
            raise Changed(self.problem)
        return name


def hash_tiny(files: Sequence[TinyFile], algorithm: str,
              progress: Callable[[int], None] | None, dirs: DirCursor,
              buf: bytearray | memoryview, *, digests: dict[str, str], errors: dict[str, str],
              stats: Stats, large: list[str], open_flags: int = OPEN_FLAGS,
              tiny: int = TINY) -> int:
    """Hash tiny files: each opened, checked and read whole with one read(); return the bytes
    hashed. Results go to ``digests`` (key -> ``algorithm:hex``) and ``errors`` (key -> the
    problem).

    A deferred file (identity unknown) is checked by the ``fstat`` of its descriptor: it must
    be a regular file, of the expected size when one is given (verify), and is passed over into
    ``large`` when it is not tiny after all (create). Its statistics go to ``stats`` when the
    caller lacks them: always without an expected size, else only for a file with several names
    (the hard-link check). ``buf`` (at least ``tiny`` + 1 bytes) is reused for files from
    :data:`SMALL_FILE` up.

    Several threads may run this on different files with the same dictionaries, each with its
    own cursor and buffer: each file's key is written by one thread only, and single dict/list
    operations are atomic.
    """
    sha = algorithm == "sha256"
    prefix = algorithm + ":"
    flags = open_flags
    is_reg = stat.S_ISREG
    open_ = os.open
    fstat = os.fstat
    view = memoryview(buf)
    fresh_below = SMALL_FILE
    data: bytes | memoryview
    hashed = 0
    for key, path, ident, expected, parent in files:
        size = expected
        try:
            if parent is None:
                fd = open_(path, flags)
            else:
                # The cursor's checks, with the same directory as the last file in one test.
                directory, _, name = path.rpartition("/")
                if directory != dirs.path or parent != dirs.ident:
                    dirs.open_in(path, parent, flags, check_only=True)
                elif dirs.problem is not None:
                    raise Changed(dirs.problem)
                fd = open_(name, flags, dir_fd=dirs.fd)
        except Changed as exc:
            errors.setdefault(key, str(exc))
            continue
        except OSError as exc:
            errors.setdefault(key, f"cannot open ({exc.strerror})")
            continue
        try:
            st = fstat(fd)
            if ident[0] < 0:
                if not is_reg(st.st_mode):
                    errors.setdefault(key, f"replaced by a {kind(st.st_mode)}")
                    continue
                if size < 0 or st.st_nlink != 1:  # what the caller does not know yet
                    stats[key] = (st.st_size, st.st_dev, st.st_ino, st.st_nlink)
                if size < 0:
                    size = st.st_size
                    if size >= tiny:
                        large.append(key)
                        continue
                elif st.st_size != size:
                    errors.setdefault(key, f"size {st.st_size}, manifest {size}")
                    continue
            elif not is_reg(st.st_mode) or (st.st_dev, st.st_ino) != ident:
                errors.setdefault(key, "replaced while verifying")
                continue
            # One read() of size+1 bytes takes the whole file and detects growth.
            if size < fresh_below:
                data = os.read(fd, size + 1)
            else:
                data = view[:os.readv(fd, [view[:size + 1]])]
        except OSError as exc:
            errors.setdefault(key, f"read failed ({exc.strerror})")
            continue
        finally:
            os.close(fd)
        if len(data) != size:
            errors.setdefault(key, f"size changed while verifying ({size} -> {len(data)})")
            continue
        if sha:
            digests[key] = prefix + hashlib.sha256(data).hexdigest()
        else:
            import blake3

            h = blake3.blake3(max_threads=1)
            h.update(data)
            digests[key] = prefix + h.hexdigest()
        hashed += size
        if progress is not None:
            progress(size)
    return hashed


def answer_lines(files: Sequence[TinyFile], *, digests: dict[str, str], errors: dict[str, str],
                 stats: Stats, large: list[str]) -> list[str]:
    """The helper's answer for each file (see the module notes), from :func:`hash_tiny`'s
    results (SHA-256 digests).

    >>> answer_lines([("0", "/x", (-1, -1), -1, None), ("1", "/y", (-1, -1), -1, None)],
    ...              digests={"0": "sha256:ab"}, errors={"1": "cannot open (No such file)"},
    ...              stats={"0": (2, 5, 6, 1)}, large=[])
    ['ab 2', '!cannot open (No such file)']
    """
    out: list[str] = []
    append = out.append
    get_digest, get_stats = digests.get, stats.get
    skip = len("sha256:")
    for key, _path, (dev, _ino), size, _parent in files:
        digest = get_digest(key)
        if digest is None:
            problem = errors.get(key)
            if problem is not None:
                append("!" + problem)
            else:  # passed over: not tiny after all
                size_, dev_, ino_, nlink_ = stats[key]
                append(f"L {size_} {dev_} {ino_} {nlink_}")
            continue
        st = get_stats(key) if dev < 0 else None
        if st is None:
            append(digest[skip:])
        elif st[3] != 1:
            append(f"{digest[skip:]} {st[0]} {st[1]} {st[2]} {st[3]}")
        elif size < 0:
            append(f"{digest[skip:]} {st[0]}")
        else:
            append(digest[skip:])
    return out


def parse_request(raw: bytes) -> tuple[int, int, list[TinyFile]]:
    """Open flags, tiny-file limit and files from a helper's input (see the module notes).
    Each file's key is its position in the request.

    >>> parse_request(b"\\0".join([b"0", b"256", b"-1", b"-1", b"-1", b"7", b"9", b"/d/f", b""]))
    (0, 256, [('0', '/d/f', (-1, -1), -1, (7, 9))])
    """
    # Decoded as os.fsdecode would, so opening a path encodes it back to the very bytes the
    # caller sent, whatever this interpreter's filesystem encoding is.
    fields = raw.decode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()).split("\0")
    flags, tiny = int(fields[0]), int(fields[1])
    it = iter(fields[2:-1])
    files: list[TinyFile] = []
    append = files.append
    unknown = (-1, -1)
    last_pdev = last_pino = ""
    parent: tuple[int, int] | None = None
    keys = map(str, range(len(fields) // 6))
    for key, dev, ino, size, pdev, pino, path in zip(keys, it, it, it, it, it, it, strict=True):
        if pdev != last_pdev or pino != last_pino:
            last_pdev, last_pino = pdev, pino
            parent = None if pdev == "-1" else (int(pdev), int(pino))
        if dev == "-1" and size == "-1":  # not stat'ed yet: the common case, kept cheap
            append((key, path, unknown, -1, parent))
        else:
            append((key, path, (int(dev), int(ino)), int(size), parent))
    return flags, tiny, files


def main() -> int:
    """The helper's program: the request on stdin, one answer line per file on stdout."""
    flags, tiny, files = parse_request(sys.stdin.buffer.read())
    digests: dict[str, str] = {}
    errors: dict[str, str] = {}
    stats: Stats = {}
    large: list[str] = []
    with DirCursor() as dirs:
        hash_tiny(files, "sha256", None, dirs, aligned_buffer(tiny + 1), digests=digests,
                  errors=errors, stats=stats, large=large, open_flags=flags, tiny=tiny)
    lines = answer_lines(files, digests=digests, errors=errors, stats=stats, large=large)
    sys.stdout.buffer.write("\n".join(lines).encode("utf-8", "surrogateescape"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
