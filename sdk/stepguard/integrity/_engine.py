"""The hashing engine: files to digests on threads and helper processes, checked as they are read.

:func:`hash_nodes` takes walked files (``_walk.Node``) and returns two dictionaries, key ->
``algorithm:hex`` and key -> problem; nothing here raises for a changed file, the callers turn
problems into findings. How the work is spread:

* **Tiny files** (below ``_direct.TINY``) take the direct path, ``_direct.hash_tiny``: one open,
  ``fstat`` check and read per file, no job objects. The calling thread hashes them in chunks
  of ``_CHUNK``; other threads join only while the files are large enough for reading and
  hashing (which release the GIL) to outweigh the Python around them. With nothing else to do
  and tens of thousands of them, idle cores take shares in helper interpreters
  (``_tinyproc.py``) that run the same function.
* **Other files** become jobs (a whole file, or one ``shard_size`` shard of a SHA-256 file that
  is larger), grouped into batches (largest work first) and shared by all threads. Each job
  opens its file with ``O_NOFOLLOW``, checks type, identity and size against the walk, reads
  with ``preadv`` into a reused per-thread buffer and checks size and mtime again at the end. A
  sharded file's digest is SHA-256 over its shards' raw digests (the S3 composite rule).
* **Staging** (``dest_root``) copies each job's bytes to the destination as they are hashed.

Files a walk did not stat (``Node.deferred``) are settled from their descriptor's ``fstat``; one
that turns out not to be tiny is hashed in a second round like any other file.
:class:`EarlyHashing` starts helpers on a tree's un-stat'ed files before the manifest they are
checked against has been parsed (verify from the manifest's text).

>>> import tempfile, pathlib
>>> from stepguard.integrity._walk import walk_tree
>>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "a").write_bytes(b"abc")
>>> scan = walk_tree(str(d), False, defer_files=True)
>>> digests, errors = hash_nodes(sorted(scan.nodes.items()), algorithm="sha256",
...                              shard_size=0, jobs=2, progress=None)
>>> digests["a"][:20], errors
('sha256:ba7816bf8f01c', {})
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from stepguard.errors import ConfigurationError
from stepguard.integrity import _tinyproc
from stepguard.integrity._direct import (
    OPEN_FLAGS,
    SMALL_FILE,
    TINY,
    Changed,
    DirCursor,
    Stats,
    TinyFile,
    aligned_buffer,
    hash_tiny,
)
from stepguard.integrity._tinyproc import parse_line, run_helpers
from stepguard.integrity._walk import UNKNOWN, Node, Scan

__all__ = ["EarlyHashing", "ProgressCallback", "Stats", "hash_nodes"]

ProgressCallback = Callable[[int], None]
"""Called from worker threads with the number of bytes just hashed."""

_BUF = 1024 * 1024
_BLAKE3_BUF = 8 * 1024 * 1024
# The direct path hands out files in chunks of this many. Other threads join it once a chunk
# averages this many bytes per file: reading and hashing then dominate and release the GIL,
# whereas for smaller files the Python around them does not, and threads slow each other down
# (measured: 8,000 x 4 KiB files, 1 thread 71 ms, 2 threads 102 ms).
_CHUNK = 64
_SPREAD_BYTES = 32 * 1024
# Small files are handed to workers in batches: one future per 4 KiB file would cost more than
# hashing it. Batches of files below SMALL_FILE (staging copies) stay with the calling thread.
_BATCH_FILES = 128
# Helper processes for tiny files start at this many files, one per this many (an interpreter
# start costs about as much as hashing 2,000 tiny files).
_HELPERS_FROM = 10_000
_HELPER_FILES = 5_000
_BATCH_BYTES = 16 * 1024 * 1024


@dataclass(slots=True)
class _Job:
    rel: str
    path: str
    ident: tuple[int, int]
    file_size: int
    offset: int
    length: int
    index: int  # shard number, -1 for a whole file
    dest: str | None = None


_local = threading.local()


def _buffer(size: int) -> memoryview:
    """This thread's read buffer, page-aligned (see ``_direct.aligned_buffer``)."""
    buf: memoryview | None = getattr(_local, "buf", None)
    if buf is None or len(buf) < size:
        buf = aligned_buffer(size)
        _local.buf = buf
    return buf


def _new_hasher(algorithm: str, big: bool) -> Any:
    if algorithm == "sha256":
        return hashlib.sha256()
    import blake3

    return blake3.blake3(max_threads=blake3.blake3.AUTO if big else 1)



def _hash_tiny_all(files: list[TinyFile], algorithm: str, jobs: int, *,
                   progress: ProgressCallback | None, digests: dict[str, str],
                   errors: dict[str, str], stats: Stats, large: list[str],
                   promote: _Promote | None = None) -> list[_Results]:
    helpers = min(jobs - 1, len(files) // _HELPER_FILES)
    if algorithm != "sha256" or len(files) < _HELPERS_FROM or helpers < 1:
        return _hash_shared(files, [], [], algorithm=algorithm, jobs=jobs, progress=progress,
                            digests=digests, errors=errors, stats=stats, large=large,
                            promote=promote)

    def here(share: list[TinyFile]) -> None:
        _hash_shared(share, [], [], algorithm=algorithm, jobs=1, progress=progress,
                     digests=digests, errors=errors, stats=stats, large=large)

    def merge(share: list[TinyFile], lines: list[str]) -> None:
        _merge_helper(share, lines, progress=progress, digests=digests, errors=errors,
                      stats=stats, large=large)

    run_helpers(files, helpers, OPEN_FLAGS, TINY, hash_here=here, merge=merge)
    return []


_Results = list[tuple[_Job, "bytes | str"]]
#: Turns direct-path files found not to be tiny (keys, statistics recorded) into batches.
_Promote = Callable[[list[str]], list[list[_Job]]]


def _hash_shared(direct: list[TinyFile], own: list[list[_Job]], rest: list[list[_Job]], *,
                 algorithm: str, jobs: int, progress: ProgressCallback | None,
                 digests: dict[str, str], errors: dict[str, str], stats: Stats,
                 large: list[str], promote: _Promote | None = None) -> list[_Results]:
    """Hash on ``jobs`` threads, the caller's included; return the batches' results.

    The caller takes the direct-path files (in chunks of ``_CHUNK``) and the ``own`` batches,
    then helps with ``rest``. The other threads take ``rest`` first, then direct-path chunks
    while the last chunk hashed showed files large enough (``_SPREAD_BYTES`` on average) for
    reading and hashing, which release the GIL, to outweigh the Python around them; after a
    chunk of smaller files they leave the direct path to the caller until larger ones come.
    While such large files are being hashed the caller takes a batch after each chunk, so the
    batches run out first and the run ends on fine-grained chunks on every thread.

    The caller takes chunks from the front, the other threads from the back: a file that
    turns out to be large (its size is only learnt when it is opened) is found by whichever
    end reaches it first, so on average in half the time, and its shards then run while
    chunks are left to fill the end of the run (a tree whose large files sort last, as
    ``weights.bin`` after ``small/`` does, would otherwise end on one thread hashing a shard
    alone).

    With ``promote``, a direct-path file found not to be tiny is not left in ``large`` for a
    second round: its batches join ``rest`` at once (largest work first), and the threads
    take them while the remaining chunks are the filler at the end.
    """
    chunks = deque(direct[i:i + _CHUNK] for i in range(0, len(direct), _CHUNK))
    pending = deque(rest)
    spread = threading.Event()
    stop = threading.Event()
    lock = threading.Lock()
    active = 0  # other threads asked to work and not finished yet

    def take_chunk(dirs: DirCursor, back: bool = False) -> bool:
        try:
            chunk = chunks.pop() if back else chunks.popleft()
        except IndexError:
            return False
        found: list[str] = []
        hashed = hash_tiny(chunk, algorithm, progress, dirs, _buffer(_BUF), digests=digests,
                           errors=errors, stats=stats, large=found)
        if hashed >= _SPREAD_BYTES * len(chunk):
            spread.set()
        else:
            spread.clear()
        if found:
            if promote is None:
                large.extend(found)
            else:
                pending.extendleft(reversed(promote(found)))
        return True

    def take_batch(out: list[_Results]) -> bool:
        try:
            batch = pending.popleft()
        except IndexError:
            return False
        out.append(_run_batch(batch, algorithm, progress))
        return True

    def worker(back: bool = True) -> list[_Results]:
        nonlocal active
        out: list[_Results] = []
        try:
            with DirCursor() as dirs:
                while not stop.is_set() and (take_batch(out)
                                             or (spread.is_set() and take_chunk(dirs, back))):
                    pass
        except BaseException:
            stop.set()
            raise
        finally:
            with lock:
                active -= 1
        return out

    results: list[_Results] = []
    if jobs <= 1:
        with DirCursor() as dirs:
            while take_chunk(dirs):
                pass
        results += (_run_batch(b, algorithm, progress) for b in own)
        while take_batch(results):
            pass
        return results
    futures: list[Future[list[_Results]]] = []
    with ThreadPoolExecutor(max_workers=jobs - 1, thread_name_prefix="stepguard-hash") as pool:

        def hire(wanted: int) -> None:
            nonlocal active
            with lock:
                n = min(wanted, jobs - 1 - active)
                active += max(n, 0)
            futures.extend(pool.submit(worker) for _ in range(n))

        try:
            hire(len(rest))
            with DirCursor() as dirs:
                while not stop.is_set() and take_chunk(dirs):
                    if pending:
                        hire(len(pending))  # promoted batches: idle threads take them
                    if spread.is_set():
                        if chunks:
                            hire(jobs - 1)  # files large enough to share: idle threads join in
                        # The caller takes big work too (a batch per chunk), so the batches
                        # run out before the chunks and the run ends on fine-grained chunks
                        # rather than on one thread finishing a shard alone.
                        take_batch(results)
            for b in own:
                if stop.is_set():
                    break
                results.append(_run_batch(b, algorithm, progress))
            with lock:
                active += 1  # the caller, as one more worker (it decrements on leaving)
            results += worker(back=False)
            for f in futures:
                results += f.result()
        except BaseException:
            # A failed worker, or an interrupt while waiting: the others stop after their
            # current chunk or batch instead of hashing everything left before the pool
            # shuts down.
            stop.set()
            raise
    return results


def _merge_helper(share: list[TinyFile], lines: list[str], *, progress: ProgressCallback | None,
                  digests: dict[str, str], errors: dict[str, str], stats: Stats,
                  large: list[str]) -> None:
    """Record a helper's answers (see :func:`parse_line`) for its share of the files."""
    for (key, _path, _ident, size, _parent), line in zip(share, lines, strict=True):
        if len(line) == 64 and line[0] != "!" and progress is None:
            digests[key] = "sha256:" + line  # a plain digest: the common case in verify
            continue
        result = parse_line(line)
        if isinstance(result, str):
            errors.setdefault(key, result)
            continue
        hexd, st = result
        if st is not None:
            stats[key] = st
        if hexd is None:
            large.append(key)
            continue
        digests[key] = "sha256:" + hexd
        if progress is not None:
            progress(st[0] if st is not None else size)


class EarlyHashing:
    """Helper interpreters hashing a share of a tree's un-stat'ed files (SHA-256, sizes not
    yet known) while the caller parses the manifest that the results are then checked against.
    """

    def __init__(self, scan: Scan, jobs: int) -> None:
        self.helpers: list[_tinyproc.Helper] = []
        self.keys: set[str] = set()
        files = [(k, n) for k, n in scan.nodes.items() if n.deferred]
        n = len(files)
        helpers = min(jobs - 1, n // _HELPER_FILES)
        if n < _HELPERS_FROM or helpers < 1:
            return
        # Parsing and checking a manifest costs the caller about as much per entry as hashing
        # half a tiny file: it keeps that much less than an equal share.
        own = max(0, (n // 2 + _tinyproc._STARTUP_FILES * helpers) // (helpers + 1))
        per = -(-(n - own) // helpers) if n > own else n
        for i in range(own, n, per):
            share: list[TinyFile] = [(k, node.open_path, UNKNOWN, -1, node.parent)
                                     for k, node in files[i:i + per]]
            self.helpers.append(_tinyproc.Helper(share, OPEN_FLAGS, TINY))
            self.keys.update(k for k, *_ in share)

    def collect(self, progress: ProgressCallback | None
                ) -> tuple[dict[str, str], dict[str, str], Stats, list[str]]:
        """Wait for the helpers; a share whose helper failed is hashed here instead."""
        digests: dict[str, str] = {}
        errors: dict[str, str] = {}
        stats: Stats = {}
        large: list[str] = []
        for h in self.helpers:
            lines = h.results()
            if lines is None:
                _hash_shared(h.share, [], [], algorithm="sha256", jobs=1, progress=progress,
                             digests=digests, errors=errors, stats=stats, large=large)
            else:
                _merge_helper(h.share, lines, progress=progress, digests=digests,
                              errors=errors, stats=stats, large=large)
        return digests, errors, stats, large

    def stop(self) -> None:
        for h in self.helpers:
            h.stop()


def _hash_job(job: _Job, algorithm: str, progress: ProgressCallback | None) -> bytes:
    try:
        fd = os.open(job.path, OPEN_FLAGS)
    except OSError as exc:
        raise Changed(f"cannot open ({exc.strerror})") from exc
    out_fd = -1
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != job.ident:
            raise Changed("replaced while verifying")
        if st.st_size != job.file_size:
            raise Changed(f"size changed while verifying ({job.file_size} -> {st.st_size})")
        if job.dest is not None:
            out_fd = os.open(job.dest, os.O_WRONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        big = job.length > _BLAKE3_BUF and algorithm == "blake3"
        h = _new_hasher(algorithm, big)
        buf = _buffer(_BLAKE3_BUF if big else _BUF)
        off, remaining = job.offset, job.length
        while remaining > 0:
            n = os.preadv(fd, [buf[: min(len(buf), remaining)]], off)
            if n == 0:
                raise Changed("truncated while verifying")
            chunk = buf[:n]
            h.update(chunk)
            if out_fd >= 0:
                _write_all(out_fd, chunk, off)
            off += n
            remaining -= n
            if progress is not None:
                progress(n)
        st2 = os.fstat(fd)
        if st2.st_size != st.st_size or st2.st_mtime_ns != st.st_mtime_ns:
            raise Changed("modified while verifying")
        return bytes(h.digest())
    except OSError as exc:
        raise Changed(f"read failed ({exc.strerror})") from exc
    finally:
        os.close(fd)
        if out_fd >= 0:
            os.close(out_fd)


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _jobs_for(nodes: Iterable[tuple[str, Node]], algorithm: str, shard_size: int,
              dest_root: str | None) -> Iterator[_Job]:
    for key, n in nodes:
        dest = os.path.join(dest_root, key) if dest_root else None
        if algorithm == "sha256" and shard_size and n.size > shard_size:
            for i, off in enumerate(range(0, n.size, shard_size)):
                yield _Job(key, n.open_path, n.ident, n.size, off,
                           min(shard_size, n.size - off), i, dest)
        else:
            yield _Job(key, n.open_path, n.ident, n.size, 0, n.size, -1, dest)


def _batches(jobs: Iterable[_Job]) -> list[list[_Job]]:
    big: list[list[_Job]] = []
    small: list[list[_Job]] = []
    cur: list[_Job] = []
    cur_bytes = 0
    for j in jobs:
        if j.length >= _BATCH_BYTES:
            big.append([j])
            continue
        cur.append(j)
        cur_bytes += j.length
        if len(cur) >= _BATCH_FILES or cur_bytes >= _BATCH_BYTES:
            small.append(cur)
            cur, cur_bytes = [], 0
    if cur:
        small.append(cur)
    # Largest work first so the tail of the run is short pieces spread over all workers.
    big.sort(key=lambda b: -b[0].length)
    return big + small


def _run_batch(batch: list[_Job], algorithm: str, progress: ProgressCallback | None
               ) -> list[tuple[_Job, bytes | str]]:
    out: list[tuple[_Job, bytes | str]] = []
    for job in batch:
        try:
            out.append((job, _hash_job(job, algorithm, progress)))
        except Changed as exc:
            out.append((job, str(exc)))
    return out


def hash_nodes(nodes: list[tuple[str, Node]], *, algorithm: str, shard_size: int, jobs: int,
                progress: ProgressCallback | None, dest_root: str | None = None,
                tiny_helpers: bool = True) -> tuple[dict[str, str], dict[str, str]]:
    """Hash files; return (key -> ``scheme:hex``, key -> problem).

    Deferred nodes are settled (size, identity, link count from their descriptor's ``fstat``);
    one that turns out not to be tiny is hashed like any stat'ed file: its jobs join the
    running round at once, or (found by a helper process) in a second round.
    """
    stats: Stats = {}
    large: list[str] = []
    digests, errors = _hash_round(nodes, algorithm=algorithm, shard_size=shard_size, jobs=jobs,
                                  progress=progress, dest_root=dest_root, stats=stats,
                                  large=large, tiny_helpers=tiny_helpers)
    by_key = dict(nodes)
    for key, (size, dev, ino, nlink) in stats.items():
        by_key[key].settle(size, dev, ino, nlink)
    if large:
        more, more_errors = _hash_round([(k, by_key[k]) for k in large], algorithm=algorithm,
                                        shard_size=shard_size, jobs=jobs, progress=progress,
                                        dest_root=dest_root, stats=stats, large=[])
        digests.update(more)
        errors.update(more_errors)
    return digests, errors


def _hash_round(nodes: list[tuple[str, Node]], *, algorithm: str, shard_size: int, jobs: int,
                progress: ProgressCallback | None, dest_root: str | None, stats: Stats,
                large: list[str], tiny_helpers: bool = True
                ) -> tuple[dict[str, str], dict[str, str]]:
    if algorithm == "blake3":
        try:
            import blake3  # noqa: F401
        except ImportError as exc:  # pragma: no cover - blake3 is a dependency
            raise ConfigurationError("BLAKE3 needs the 'blake3' package") from exc
    shards: dict[str, dict[int, bytes]] = {}
    digests: dict[str, str] = {}
    errors: dict[str, str] = {}
    # Tiny files skip the job/batch bookkeeping entirely: at 4 KiB per file that bookkeeping
    # costs as much as the open/read/hash itself (measured: 100,000 x 4 KiB files).
    direct: list[TinyFile] = []
    listed = nodes
    if dest_root is None:
        queued: list[tuple[str, Node]] = []
        for key, n in nodes:
            if n.size < TINY:  # deferred files of unknown size (-1) too: most are tiny
                direct.append((key, n.open_path, n.ident, n.size, n.parent))
            else:
                queued.append((key, n))
        nodes = queued
    batches = _batches(_jobs_for(nodes, algorithm, shard_size, dest_root))

    def collect(results: list[tuple[_Job, bytes | str]]) -> None:
        for job, res in results:
            if isinstance(res, str):
                errors.setdefault(job.rel, res)
            elif job.index < 0:
                digests[job.rel] = f"{algorithm}:{res.hex()}"
            else:
                shards.setdefault(job.rel, {})[job.index] = res

    # Batches of tiny files (staging copies) stay with the calling thread, as the direct path
    # does; everything else (shards, larger files) spends its time in hashlib/preadv with the
    # GIL released and is shared by all threads.
    own: list[list[_Job]] = []
    rest: list[list[_Job]] = []
    for b in batches:
        (own if all(j.index < 0 and j.file_size < SMALL_FILE for j in b) else rest).append(b)
    by_key: dict[str, Node] = {}

    def promote(keys: list[str]) -> list[list[_Job]]:
        # A deferred file found not to be tiny: settled from its descriptor's statistics, its
        # jobs join the others (they reopen it and check that identity).
        nonlocal by_key
        if not by_key:
            by_key = dict(listed)
        found = []
        for key in keys:
            node = by_key[key]
            node.settle(*stats[key])
            found.append((key, node))
        return _batches(_jobs_for(found, algorithm, shard_size, dest_root))

    if not rest and not own and tiny_helpers:
        # With nothing else to do, idle cores may take shares of the files in helper processes.
        for results in _hash_tiny_all(direct, algorithm, jobs, progress=progress,
                                      digests=digests, errors=errors, stats=stats, large=large,
                                      promote=promote):
            collect(results)
    else:
        for results in _hash_shared(direct, own, rest, algorithm=algorithm, jobs=jobs,
                                    progress=progress, digests=digests, errors=errors,
                                    stats=stats, large=large, promote=promote):
            collect(results)
    for key, parts in shards.items():
        if key in errors:
            continue
        # The S3 multipart composite rule: SHA-256 over the concatenated raw part digests.
        joined = b"".join(parts[i] for i in range(len(parts)))
        digests[key] = "sha256-sharded:" + hashlib.sha256(joined).hexdigest()
    for key in errors:
        digests.pop(key, None)
    return digests, errors

