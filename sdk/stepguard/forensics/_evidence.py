"""Reading the evidence where it lies: receipts, registry records and audit logs or segments,
on this machine's disk (paths, ``file://`` URIs) or in an object store (``s3://``).

Nothing here judges; it reads. A location that does not exist reads as ``None``; one that
cannot be read (access denied, unreachable store) is an
:class:`~stepguard.errors.OperationalError` naming it. Audit chains are verified with the audit
control's own verifiers (:func:`stepguard.audit.verify_chain`,
:func:`stepguard.audit.verify_segment`, :func:`stepguard.audit.verify_segments`), never
re-implemented: a tampered log or segment comes back as a :class:`~stepguard.forensics.Segment`
that names the broken record.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from stepguard.errors import AuditError, ConfigurationError, OperationalError, StepguardError
from stepguard.forensics._model import Segment
from stepguard.receipt import Receipt

#: The registry's layout (see :mod:`stepguard.registry`): what a published version holds.
BUNDLE_NAME = "model.sig"
PROVENANCE_NAME = "provenance.sigstore.json"


def _local(where: str) -> Path | None:
    if where.startswith("file://"):
        parsed = urlparse(where)
        return Path(unquote(parsed.path))
    if "://" in where:
        return None
    return Path(where)


class Store:
    """Reads bytes and lists keys on disk and in S3 (one client, made on first use from the
    caller's own AWS credentials: an investigator's, not a step's).

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "a.json").write_text("{}")
    >>> store = Store()
    >>> store.read(str(d / "a.json")), store.read(str(d / "missing.json"))
    (b'{}', None)
    >>> [p.rsplit("/", 1)[1] for p in store.list(str(d), "a.json")]
    ['a.json']
    """

    def __init__(self, s3: Callable[[], Any] | None = None) -> None:
        self._factory = s3
        self._client: Any = None

    def _s3(self) -> Any:
        if self._client is None:
            if self._factory is None:
                from stepguard.wiring import s3_client

                self._client = s3_client()
            else:
                self._client = self._factory()
        return self._client

    @staticmethod
    def _split(uri: str) -> tuple[str, str]:
        bucket, _, key = uri[len("s3://"):].partition("/")
        if not bucket:
            raise ConfigurationError("object location needs a bucket", subject=uri)
        return bucket, key

    def _denied(self, exc: Exception, uri: str, what: str) -> StepguardError:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
        return OperationalError(f"cannot read the {what} ({code})", subject=uri)

    def read(self, where: str, what: str = "object") -> bytes | None:
        """The bytes at ``where``; None when nothing is there."""
        path = _local(where)
        if path is not None:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise OperationalError(f"cannot read the {what} ({exc.strerror})",
                                       subject=where) from None
        if not where.startswith("s3://"):
            raise ConfigurationError("not a path, file:// or s3:// location", subject=where)
        bucket, key = self._split(where)
        try:
            return bytes(self._s3().get_object(Bucket=bucket, Key=key)["Body"].read())
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self._denied(exc, where, what) from None

    def list(self, where: str, suffix: str) -> list[str]:
        """Every file or object under ``where`` whose name ends with ``suffix``, sorted."""
        path = _local(where)
        if path is not None:
            if path.is_file():
                return [str(path)] if path.name.endswith(suffix) else []
            return sorted(str(p) for p in path.rglob(f"*{suffix}") if p.is_file())
        bucket, prefix = self._split(where)
        out: list[str] = []
        try:
            pages = self._s3().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                        Prefix=prefix)
            for page in pages:
                out += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", ())
                        if o["Key"].endswith(suffix)]
        except Exception as exc:
            raise self._denied(exc, where, "receipts") from None
        return sorted(out)


@dataclass(frozen=True)
class Found:
    """A receipt and where it was read."""

    receipt: Receipt
    where: str


def load_receipts(store: Store, sources: Iterable[str]) -> Iterator[Found]:
    """Every receipt under ``sources`` (directories, files, ``s3://`` prefixes). A file named
    ``receipt.json`` that is not a receipt is skipped, as evidence of nothing."""
    for source in sources:
        for where in store.list(source, "receipt.json"):
            data = store.read(where, "receipt")
            if data is None:
                continue
            try:
                yield Found(Receipt.from_json(data), where)
            except ConfigurationError:
                continue


def read_receipt(store: Store, where: str) -> Found:
    """The receipt at ``where``; :class:`~stepguard.errors.EvidenceNotFound` if absent."""
    from stepguard.errors import EvidenceNotFound

    data = store.read(where, "receipt")
    if data is None:
        raise EvidenceNotFound("receipt not found", subject=where,
                               hint="give a receipt file, or an s3:// URI of one")
    return Found(Receipt.from_json(data), where)


def payload(bundle: bytes | None) -> dict[str, Any] | None:
    """The in-toto statement a bundle's DSSE envelope carries, read without verifying (the
    gate verifies; a trace reports what the record says). None when it cannot be read.

    >>> import base64, json
    >>> env = {"dsseEnvelope": {"payload": base64.b64encode(b'{"subject": []}').decode()}}
    >>> payload(json.dumps(env).encode())
    {'subject': []}
    >>> payload(b"not json") is None
    True
    """
    import base64

    if bundle is None:
        return None
    try:
        doc = json.loads(bundle)
        statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    except (ValueError, KeyError, TypeError):
        return None
    return statement if isinstance(statement, dict) else None


def registry_version(registry: str, name: str, version: str) -> str:
    """Where ``name``/``version`` lies under ``registry`` (``file://`` or ``s3://``).

    >>> registry_version("s3://b/reg", "m", "1")
    's3://b/reg/m/1/'
    """
    return f"{registry.rstrip('/')}/{name}/{version}/"


# -- audit ---------------------------------------------------------------------------------------


def _broken(location: str, err: AuditError, anchored: tuple[str, ...] = ()) -> Segment:
    where = err.subject
    if where and where.startswith(location):
        where = where[len(location):].strip() or None
    finding, details = err.message, tuple(err.details)
    if finding.startswith("audit chain broken") and details:  # verify_chain: finding in details
        finding, details = details[0], details[1:]
    return Segment(location=location, intact=False, anchored_by=anchored, error=finding,
                   where=_with_record(where), details=details)


def _with_record(where: str | None) -> str | None:
    """``line N`` also names the record: line 1 of a log is record 0 (the genesis record)."""
    if where and where.startswith("line ") and where[5:].isdigit():
        return f"{where} (record {int(where[5:]) - 1})"
    return where


def verify_log(path: str, heads: Mapping[str, tuple[int, str]]
               ) -> tuple[Segment, list[dict[str, Any]]]:
    """Verify a whole local log; returns its :class:`Segment` and its span records. ``heads``:
    step -> (seq, digest) from receipts; the steps whose head the log holds anchor it."""
    from stepguard.audit import verify_chain

    records = list(_records(Path(path).read_bytes())) if Path(path).is_file() else []
    digests = {r.get("seq"): r.get("digest") for r in records}
    anchored = tuple(sorted(s for s, (seq, d) in heads.items() if digests.get(seq) == d))
    try:
        report = verify_chain(path)
    except AuditError as err:
        return _broken(path, err, anchored), records
    return Segment(location=path, intact=True, records=report.records,
                   anchored_by=anchored), records


def verify_stored_segments(store: Store, wanted: dict[str, tuple[str, tuple[int, str]]]
                           ) -> tuple[list[Segment], list[dict[str, Any]], list[str]]:
    """Verify each segment receipts name (``wanted``: URI -> (step, head)), each against its
    receipt's head, then the links between segments of one log. Returns the segments, their
    records, and problems (a segment a receipt names that is not there, segments that do not
    link)."""
    from stepguard.audit import ChainHead, verify_segment, verify_segments

    segments: list[Segment] = []
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    good: list[tuple[str, bytes]] = []
    for uri, (step, (seq, digest)) in sorted(wanted.items()):
        data = store.read(uri, "audit segment")
        if data is None:
            problems.append(f"audit segment of step {step} is missing: {uri}")
            continue
        parts = uri.rstrip("/").split("/")
        try:
            verify_segment(data, name=uri, log_id=parts[-2] if len(parts) > 2 else "",
                           anchor=ChainHead(seq, digest, 0))
        except AuditError as err:
            segments.append(_broken(uri, err, (step,)))
            records += _records(data)
            continue
        lines = data.count(b"\n")
        segments.append(Segment(location=uri, intact=True, records=lines, anchored_by=(step,)))
        records += _records(data)
        good.append((uri, data))
    if len(good) > 1:
        try:
            verify_segments(good)
        except AuditError as err:
            problems.append(f"{err}" + "".join(f"; {d}" for d in err.details))
    return segments, records, problems


def _records(data: bytes) -> Iterator[dict[str, Any]]:
    for raw in data.split(b"\n"):
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict):
            yield rec


def parse_head(value: str | None) -> tuple[int, str] | None:
    """A receipt's ``audit_head`` (``"<seq>:<digest>"``) as (seq, digest).

    >>> parse_head("20:sha256:ab"), parse_head(None), parse_head("junk")
    ((20, 'sha256:ab'), None, None)
    """
    if not value:
        return None
    seq, _, digest = value.partition(":")
    return (int(seq), digest) if seq.isdigit() and digest else None
