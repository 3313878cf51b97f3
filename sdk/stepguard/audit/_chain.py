"""The tamper-evident local audit log: JSON lines, each carrying the digest of the previous one.

Record layout (one JSON object per line)::

    {"v": 1, "seq": N, "prev": "sha256:<digest of record N-1>", "kind": "genesis" | "span" | ...,
     "ts_ns": <write time, ns since the epoch>, ...payload..., "digest": "sha256:<this record>"}

``digest`` is SHA-256 over the line's own bytes up to its ``digest`` field, closed with ``}`` --
that is, the record exactly as written, without the digest. No re-serialisation is involved, so
what is verified is precisely what is on disk. ``digest`` is always the last member.
Record 0 is the genesis record (``prev`` is all zeros) and names the log.
Beside the log, ``<log>.head`` holds the sequence number, digest and byte size of the last record,
so a cut-off tail is detectable; :class:`ChainHead` values shipped elsewhere (receipts, OTLP) are
stronger anchors still, since whoever can rewrite the log can rewrite the head file too.

Writers serialise on an exclusive ``flock`` of the log, so several processes (task runners on
one worker, a step and its sandbox) can share one chain.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stepguard._private.fileio import write_all
from stepguard.audit import _signals
from stepguard.audit._redact import has_secrets, redact
from stepguard.errors import AuditError, ConfigurationError

GENESIS_PREV = "sha256:" + "0" * 64
HEAD_SUFFIX = ".head"
_HEAD_LEN = 20 + 1 + 71 + 1 + 20 + 1
_REQUIRED = ("v", "seq", "prev", "kind", "digest")

# getpid(2) is a real syscall on current glibc: track it through fork instead of asking per record.
_pid = os.getpid()


def _after_fork() -> None:
    global _pid  # noqa: PLW0603 - per-process state by design
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)

FsyncPolicy = Literal["always", "step", "close"]


@dataclass(frozen=True)
class ChainHead:
    """The last record of a chain: enough to anchor the log against truncation elsewhere."""

    seq: int
    digest: str
    size: int


@dataclass(frozen=True)
class ChainReport:
    """Result of a successful :func:`verify_chain`."""

    path: str
    records: int
    log_id: str | None
    head: ChainHead | None
    #: True when a head file (or an explicit anchor) confirmed the log's tail is complete.
    tail_anchored: bool
    kinds: Mapping[str, int]


_SUFFIX_START = b',"digest":"sha256:'
_SUFFIX_LEN = len(_SUFFIX_START) + 64 + 2  # ...hex"}
def _encode_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(value: Any) -> Any:
    """Non-finite floats (not JSON) become null; everything else unchanged."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# ASCII-only lines: a log viewer cannot be tricked by control or bidi characters in a value.
_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False,
                            check_circular=False, default=_encode_default)


def _encode(record: Mapping[str, Any]) -> bytes:
    try:
        return _encoder.encode(record).encode("ascii")
    except ValueError:  # NaN or infinity somewhere
        return _encoder.encode(_finite(record)).encode("ascii")


def encode_record(record: Mapping[str, Any]) -> bytes:
    """One log line (with newline) for ``record`` (its ``digest`` field, if any, is replaced)."""
    body = _encode({k: v for k, v in record.items() if k != "digest"})
    digest = hashlib.sha256(body).hexdigest()
    return body[:-1] + _SUFFIX_START + digest.encode("ascii") + b'"}\n'


def _line_digest(line: bytes) -> str | None:
    """Recompute the digest of a written line; None when the line has no digest suffix."""
    if len(line) <= _SUFFIX_LEN or not line.endswith(b'"}') or \
            line[-_SUFFIX_LEN:-_SUFFIX_LEN + len(_SUFFIX_START)] != _SUFFIX_START:
        return None
    return "sha256:" + hashlib.sha256(line[:-_SUFFIX_LEN] + b"}").hexdigest()


def _encode_head(head: ChainHead) -> bytes:
    return f"{head.seq:020d} {head.digest} {head.size:020d}\n".encode("ascii")


def _decode_head(raw: bytes) -> ChainHead | None:
    try:
        seq, digest, size = raw.decode("ascii").split()
        if len(digest) != 71 or not digest.startswith("sha256:"):
            return None
        return ChainHead(int(seq), digest, int(size))
    except (UnicodeDecodeError, ValueError):
        return None


def read_head(log_path: str | os.PathLike[str]) -> ChainHead | None:
    """The head recorded beside ``log_path``, or None when there is none (or it is unreadable)."""
    try:
        raw = Path(str(log_path) + HEAD_SUFFIX).read_bytes()
    except FileNotFoundError:
        return None
    return _decode_head(raw)


class AuditLog:
    """Appends records to a hash-chained JSON-lines log, synchronously.

    Every append is one ``write(2)`` of whole lines on an ``O_APPEND`` descriptor before
    :meth:`append` returns: the record is in the kernel, so ``os._exit`` or SIGKILL afterwards
    cannot lose it. ``fsync`` decides when it also reaches the disk, which only matters for a
    power loss or kernel crash: ``"always"`` after each append; ``"step"`` at each step's end
    (the provider's force-flush); ``"close"`` (default) when the log is closed -- at interpreter
    exit -- and whenever :meth:`flush` is called, the kernel writing back in between (about 30 s).
    An ``fsync`` costs milliseconds on common disks, more than the whole audit of a step.

    >>> import tempfile, pathlib
    >>> d = tempfile.mkdtemp()
    >>> log = AuditLog(pathlib.Path(d) / "audit.jsonl")
    >>> log.append("note", {"text": "hello"}).seq
    1
    >>> verify_chain(pathlib.Path(d) / "audit.jsonl").records
    2
    >>> log.close()
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: FsyncPolicy = "close") -> None:
        if fsync not in ("always", "step", "close"):
            raise ConfigurationError("unknown fsync policy", subject=str(fsync),
                                     hint="use 'always', 'step' or 'close'")
        self.path = Path(path)
        self.head_path = Path(str(self.path) + HEAD_SUFFIX)
        self.fsync = fsync
        self._lock = threading.RLock()
        self._fd: int | None = None
        self._head_fd: int | None = None
        self._pid = -1
        # What this process last wrote: when the log still has that size under the lock, no
        # other writer came in between and the head file need not be read.
        self._last: ChainHead | None = None
        self._dirty = False

    def _open(self) -> tuple[int, int]:
        # After fork the descriptors (and their flock) are shared with the parent: reopen.
        if self._fd is None or self._head_fd is None or self._pid != _pid:
            self._last = None
            flags = os.O_CLOEXEC | os.O_CREAT
            try:  # reopened at every step: the directory is made only the first time
                self._fd = os.open(self.path, flags | os.O_WRONLY | os.O_APPEND, 0o600)
            except FileNotFoundError:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._fd = os.open(self.path, flags | os.O_WRONLY | os.O_APPEND, 0o600)
            self._head_fd = os.open(self.head_path, flags | os.O_RDWR, 0o600)
            self._pid = _pid
        return self._fd, self._head_fd

    def _tail(self, fd: int, head_fd: int) -> tuple[int, str, int, list[str], bool]:
        """(last seq, last digest, size, anomalies, needs newline) under the lock."""
        size = os.fstat(fd).st_size
        last = self._last
        if last is not None and last.size == size:
            return last.seq, last.digest, size, [], False
        head = _decode_head(os.pread(head_fd, _HEAD_LEN, 0))
        anomalies: list[str] = []
        if head is not None and head.size == size and size > 0:
            return head.seq, head.digest, size, anomalies, False
        if size == 0:
            if head is not None and head.size > 0:
                anomalies.append(f"log was emptied: its head named record {head.seq}")
            return -1, GENESIS_PREV, size, anomalies, False
        if head is not None and head.size > size:
            anomalies.append(f"log is shorter than its head (record {head.seq} at "
                             f"{head.size} bytes, log {size} bytes): tail truncated")
        rec, newline = self._last_record(size)
        if rec is None:
            anomalies.append("last record unreadable (torn write or edit)")
            if head is not None:
                return head.seq, head.digest, size, anomalies, not newline
            return 0, GENESIS_PREV, size, anomalies, not newline
        return int(rec["seq"]), str(rec["digest"]), size, anomalies, False

    def _last_record(self, size: int) -> tuple[dict[str, Any] | None, bool]:
        with open(self.path, "rb") as fh:
            window = 65536
            while True:
                start = max(0, size - window)
                fh.seek(start)
                chunk = fh.read(size - start)
                newline = chunk.endswith(b"\n")
                body = chunk[:-1] if newline else chunk
                cut = body.rfind(b"\n")
                if cut >= 0 or start == 0:
                    line = body[cut + 1:]
                    break
                window *= 4
        try:
            rec = json.loads(line)
            if isinstance(rec, dict) and all(k in rec for k in _REQUIRED) and newline:
                return rec, newline
        except ValueError:
            pass
        return None, newline

    def append(self, kind: str, payload: Mapping[str, Any]) -> ChainHead:
        """Append one record; returns the new head."""
        return self.append_many([(kind, payload)])

    def append_many(self, items: Iterable[tuple[str, Mapping[str, Any]]]) -> ChainHead:
        """Append several records with one lock, one write and one head update."""
        batch = list(items)
        with self._lock, _signals.critical():
            fd, head_fd = self._open()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                seq, prev, size, anomalies, newline = self._tail(fd, head_fd)
                lines: list[bytes] = [b"\n"] if newline else []
                if seq < 0:
                    import socket
                    import uuid

                    batch.insert(0, ("genesis", {
                        "log_id": uuid.uuid4().hex,
                        "host": socket.gethostname(),
                        "pid": os.getpid(),
                    }))
                ts = time.time_ns()
                for kind, payload in batch:
                    seq += 1
                    record: dict[str, Any] = dict(payload)
                    record.update(v=1, seq=seq, prev=prev, kind=kind, ts_ns=ts)
                    if anomalies:
                        record["anomaly"] = anomalies
                        anomalies = []
                    if has_secrets():
                        record = redact(record)
                    record.pop("digest", None)
                    body = _encode(record)
                    hexdigest = hashlib.sha256(body).hexdigest()
                    prev = "sha256:" + hexdigest
                    lines.append(body[:-1] + _SUFFIX_START + hexdigest.encode("ascii") + b'"}\n')
                data = b"".join(lines)
                write_all(fd, data)
                head = ChainHead(seq, prev, size + len(data))
                os.pwrite(head_fd, _encode_head(head), 0)
                self._last = head
                self._dirty = True
                if self.fsync == "always":
                    os.fsync(fd)
                    os.fsync(head_fd)
                    self._dirty = False
                return head
            except OSError as exc:
                raise AuditError("could not append to the audit log", subject=str(self.path),
                                 details=(f"{type(exc).__name__}: {exc.strerror}",)) from exc
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def flush(self) -> None:
        """fsync the log and its head now, whatever the policy (nothing to do if this process
        wrote nothing since the last flush)."""
        with self._lock:
            if not self._dirty:
                return
            try:
                if self._fd is not None and self._head_fd is not None and self._pid == _pid:
                    os.fsync(self._fd)
                    os.fsync(self._head_fd)
                else:
                    for path in (self.path, self.head_path):
                        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                        try:
                            os.fsync(fd)
                        finally:
                            os.close(fd)
                self._dirty = False
            except OSError as exc:
                raise AuditError("could not fsync the audit log", subject=str(self.path)) from exc

    def head(self) -> ChainHead | None:
        """The current head (sequence number, digest, size) as recorded beside the log."""
        return read_head(self.path)

    def release(self) -> None:
        """Close the descriptors without an fsync; the next append reopens them. Run at each
        step's end so a long-lived process with many logs does not hold descriptors open."""
        with self._lock:
            if self._fd is not None and self._pid == _pid:
                os.close(self._fd)
                if self._head_fd is not None:
                    os.close(self._head_fd)
            self._fd = self._head_fd = None
            self._last = None

    def close(self) -> None:
        """fsync and close the descriptors."""
        with self._lock:
            try:
                self.flush()
            finally:
                self.release()


def iter_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for every parseable line, without verifying anything."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield lineno, rec


def _broken(path: Path, lineno: int, finding: str) -> AuditError:
    return AuditError(f"audit chain broken in {path.name}", subject=f"line {lineno}",
                      details=(finding,),
                      hint="the log was modified after it was written; keep it as evidence")


def verify_chain(path: str | os.PathLike[str], *, anchor: ChainHead | None = None,
                 require_head: bool = False) -> ChainReport:
    """Verify the whole chain of the log at ``path``.

    Raises :class:`~stepguard.errors.AuditError` whose ``subject`` is ``"line N"`` on the first
    edited, deleted, inserted or reordered record, on an anomaly the writer recorded (tail cut
    off, log emptied), and when the log ends before its head file (or ``anchor``) says it does.
    Without a head file a cut-off tail is undetectable (``tail_anchored`` is False) unless an
    ``anchor`` kept elsewhere is given; ``require_head=True`` makes a missing head an error.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise AuditError("cannot read the audit log", subject=str(p)) from exc
    lines = data.split(b"\n")
    tail = lines.pop()  # text after the final newline: empty unless a record is incomplete
    expected_prev, expected_seq = GENESIS_PREV, 0
    kinds: dict[str, int] = {}
    log_id: str | None = None
    digests: dict[int, str] = {}
    lineno = 0
    for lineno, raw in enumerate(lines, 1):
        try:
            rec = json.loads(raw)
        except ValueError:
            raise _broken(p, lineno, "not a JSON record") from None
        if not isinstance(rec, dict) or any(k not in rec for k in _REQUIRED):
            raise _broken(p, lineno, "not an audit record (fields missing)")
        digest = rec.pop("digest")
        if _line_digest(raw) != digest:
            raise _broken(p, lineno, "record edited: its content does not match its digest")
        seq = rec["seq"]
        if lineno == 1 and rec["kind"] != "genesis":
            raise _broken(p, lineno, "first record is not the genesis record "
                                     "(start of the log deleted?)")
        if rec["kind"] == "genesis" and lineno != 1:
            raise _broken(p, lineno, "a second genesis record (records inserted or logs spliced)")
        if rec["prev"] != expected_prev or seq != expected_seq:
            if isinstance(seq, int) and seq > expected_seq:
                what = f"record(s) deleted: expected record {expected_seq}, found {seq}"
            elif isinstance(seq, int) and seq < expected_seq:
                what = (f"record inserted, replayed or reordered: expected record "
                        f"{expected_seq}, found {seq}")
            else:
                what = "record inserted or replaced: link to the previous record broken"
            raise _broken(p, lineno, what)
        if "anomaly" in rec:
            raise _broken(p, lineno, "writer found the log damaged: " + "; ".join(
                str(a) for a in rec["anomaly"]))
        if rec["kind"] == "genesis":
            log_id = rec.get("log_id")
        kinds[rec["kind"]] = kinds.get(rec["kind"], 0) + 1
        digests[seq] = digest
        expected_prev, expected_seq = digest, seq + 1
    if tail:
        raise _broken(p, lineno + 1, "incomplete final record (torn write or truncation)")
    last = ChainHead(expected_seq - 1, expected_prev, len(data)) if lineno else None
    head = read_head(p)
    anchored = False
    if head is not None:
        if last is None or head.seq > last.seq or head.size > len(data):
            raise _broken(p, lineno + 1, f"log ends before its head: head names record "
                                         f"{head.seq}, log has {expected_seq} record(s)")
        if head != last:
            raise _broken(p, lineno, "head file does not match the last record")
        anchored = True
    elif require_head:
        raise AuditError("audit log has no head file; truncation cannot be ruled out",
                         subject=str(p) + HEAD_SUFFIX)
    if anchor is not None:
        if anchor.seq not in digests:
            raise _broken(p, lineno + 1, f"anchored record {anchor.seq} is missing (log "
                                         f"truncated)")
        if digests[anchor.seq] != anchor.digest:
            raise _broken(p, anchor.seq + 1, "record does not match the anchor kept elsewhere")
        anchored = True
    return ChainReport(path=str(p), records=lineno, log_id=log_id, head=last,
                       tail_anchored=anchored, kinds=kinds)
