"""S3: manifests from stored checksums, in-place and download verification (uploads:
``_s3upload.py``).

The digest rules are the same as for local files. A plain SHA-256 object checksum equals our
``sha256`` digest; an S3 multipart *composite* SHA-256 checksum (SHA-256 over the concatenated
raw part digests, shown as ``<base64>-<parts>``) equals our ``sha256-sharded`` digest exactly when
every part but the last is ``shard_size`` bytes -- which is how :func:`upload` uploads. Any other
stored checksum (other part sizes, CRC-only objects, no checksum) is never trusted as a
substitute: the object is streamed and hashed instead, and the report says so.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from stepguard._private.fileio import write_all
from stepguard.errors import (
    ConfigurationError,
    IntegrityError,
    ManifestError,
    OperationalError,
    TransientError,
)
from stepguard.integrity._manifest import DEFAULT_SHARD_SIZE, Manifest, ManifestEntry
from stepguard.integrity._tree import (
    VerificationReport,
    finish,
    jobs_arg,
    make_read_only,
)

__all__ = [
    "S3Location",
    "S3ManifestReport",
    "call",
    "default_client",
    "download_and_verify",
    "manifest_from_s3",
    "verify_s3",
]

_CHUNK = 8 * 1024 * 1024
_TRANSIENT = {"500", "502", "503", "504", "SlowDown", "RequestTimeout", "Throttling",
              "ThrottlingException", "InternalError", "ServiceUnavailable"}


@dataclass(frozen=True)
class S3Location:
    """A bucket and key prefix (``""`` for the whole bucket). ``s3://bucket/prefix/``."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """Parse ``s3://bucket/prefix``.

        >>> S3Location.parse("s3://data/train/v1")
        S3Location(bucket='data', prefix='train/v1/')
        """
        if not url.startswith("s3://"):
            raise ConfigurationError("S3 location must start with s3://", subject=url)
        bucket, _, prefix = url[5:].partition("/")
        if not bucket:
            raise ConfigurationError("S3 location has no bucket", subject=url)
        return cls(bucket, prefix)

    def __post_init__(self) -> None:
        if self.prefix and not self.prefix.endswith("/"):
            object.__setattr__(self, "prefix", self.prefix + "/")

    def key(self, path: str) -> str:
        """The object key of manifest path ``path``."""
        return self.prefix + path

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class S3ManifestReport:
    """How each object's digest was obtained: from S3's stored checksum, or by streaming."""

    from_checksum: tuple[str, ...]
    streamed: tuple[str, ...]


# -- helpers ---------------------------------------------------------------------------------------


def default_client(client: Any) -> Any:
    """``client``, or ``boto3.client("s3")`` when it is None."""
    if client is not None:
        return client
    import boto3

    return boto3.client("s3")


def _wrap(exc: Exception, what: str, subject: str) -> Exception:
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in _TRANSIENT or status in _TRANSIENT:
            return TransientError(f"S3 {what} failed ({code})", subject=subject)
        return OperationalError(f"S3 {what} failed ({code or status})", subject=subject)
    if isinstance(exc, BotoCoreError):
        return TransientError(f"S3 {what} failed ({type(exc).__name__})", subject=subject)
    return exc


def call(fn: Any, what: str, subject: str, **kw: Any) -> Any:
    """``fn(**kw)``, with botocore errors turned into TransientError or OperationalError."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(**kw)
    except (ClientError, BotoCoreError) as exc:
        raise _wrap(exc, what, subject) from exc


class _StreamHasher:
    """Incremental digest with the manifest's rules (plain, sharded or BLAKE3)."""

    def __init__(self, algorithm: str, shard_size: int) -> None:
        self.algorithm = algorithm
        self.shard_size = shard_size if algorithm == "sha256" else 0
        self.size = 0
        self.parts: list[bytes] = []
        self._in_part = 0
        if algorithm == "blake3":
            import blake3

            self._h: Any = blake3.blake3(max_threads=blake3.blake3.AUTO)
        else:
            self._h = hashlib.sha256()

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self.shard_size and self._in_part == self.shard_size:
                self.parts.append(self._h.digest())
                self._h = hashlib.sha256()
                self._in_part = 0
            take = len(view) if not self.shard_size else min(len(view),
                                                             self.shard_size - self._in_part)
            self._h.update(view[:take])
            self._in_part += take
            self.size += take
            view = view[take:]

    def digest(self) -> str:
        if self.algorithm == "blake3":
            return "blake3:" + str(self._h.hexdigest())
        if self.shard_size and self.size > self.shard_size:
            joined = b"".join([*self.parts, self._h.digest()])
            return "sha256-sharded:" + hashlib.sha256(joined).hexdigest()
        return "sha256:" + str(self._h.hexdigest())


def _list(s3: Any, loc: S3Location) -> Iterator[dict[str, Any]]:
    token: str | None = None
    while True:
        kw: dict[str, Any] = {"Bucket": loc.bucket, "Prefix": loc.prefix}
        if token:
            kw["ContinuationToken"] = token
        page = call(s3.list_objects_v2, "list", str(loc), **kw)
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith("/") and obj.get("Size", 0) == 0:
                continue  # "folder" marker objects made by consoles
            yield obj
        if not page.get("IsTruncated"):
            return
        token = page.get("NextContinuationToken")


def _stored_digest(s3: Any, loc: S3Location, key: str, *, size: int, algorithm: str,
                   shard_size: int) -> tuple[str | None, str | None]:
    """(digest usable under our rules, ETag) from S3's stored checksum, or (None, etag)."""
    head = call(s3.head_object, "head", f"s3://{loc.bucket}/{key}", Bucket=loc.bucket, Key=key,
                 ChecksumMode="ENABLED")
    etag = head.get("ETag")
    stored = head.get("ChecksumSHA256")
    if algorithm != "sha256" or not stored:
        return None, etag
    b64, _, count = stored.partition("-")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return None, etag
    if len(raw) != 32:
        return None, etag
    parts = int(count) if count.isdigit() else int(head.get("PartsCount") or 0)
    if not count and not parts and shard_size and size > shard_size:
        # Some S3 implementations omit the "-<parts>" suffix; the part count of part 1 says
        # whether this is a multipart (composite) checksum.
        first = call(s3.head_object, "head part", f"s3://{loc.bucket}/{key}",
                      Bucket=loc.bucket, Key=key, PartNumber=1)
        parts = int(first.get("PartsCount") or 0)
    if parts <= 1 and not count:
        if head.get("ChecksumType") == "COMPOSITE":
            return None, etag  # composite, but we cannot tell its parts: do not guess
        # Single-part object: a full-object SHA-256.
        if shard_size and size > shard_size:
            return None, etag
        return "sha256:" + raw.hex(), etag
    # Composite: equal to our sharded digest only with uniform shard_size parts.
    if not shard_size or size <= shard_size or parts != -(-size // shard_size):
        return None, etag
    for number in range(1, parts):
        part = call(s3.head_object, "head part", f"s3://{loc.bucket}/{key}", Bucket=loc.bucket,
                     Key=key, PartNumber=number)
        if int(part.get("ContentLength", -1)) != shard_size:
            return None, etag
    return "sha256-sharded:" + raw.hex(), etag


def _stream(s3: Any, loc: S3Location, key: str, *, algorithm: str, shard_size: int,
            dest: str | None = None, etag: str | None = None) -> tuple[str, int]:
    kw: dict[str, Any] = {"Bucket": loc.bucket, "Key": key}
    if etag:
        kw["IfMatch"] = etag
    resp = call(s3.get_object, "get", f"s3://{loc.bucket}/{key}", **kw)
    body = resp["Body"]
    hasher = _StreamHasher(algorithm, shard_size)
    fd = -1
    try:
        if dest is not None:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        while True:
            try:
                chunk = body.read(_CHUNK)
            except Exception as exc:
                raise _wrap(exc, "get", f"s3://{loc.bucket}/{key}") from exc
            if not chunk:
                break
            hasher.update(chunk)
            if fd >= 0:
                write_all(fd, chunk)
    finally:
        body.close()
        if fd >= 0:
            os.close(fd)
    return hasher.digest(), hasher.size


def _rel(loc: S3Location, key: str) -> str:
    return key[len(loc.prefix):]


# -- public operations -----------------------------------------------------------------------------


def manifest_from_s3(
    location: S3Location,
    *,
    client: Any = None,
    algorithm: str = "sha256",
    shard_size: int = DEFAULT_SHARD_SIZE,
    jobs: int | None = None,
) -> tuple[Manifest, S3ManifestReport]:
    """Build a manifest of every object under ``location``.

    Objects with a usable stored SHA-256 checksum (see the module notes) are not downloaded;
    the others are streamed and hashed. Keys that are not safe manifest paths raise ManifestError.
    """
    s3 = default_client(client)
    n_jobs = jobs_arg(jobs)
    objs = list(_list(s3, location))

    def one(obj: dict[str, Any]) -> tuple[str, int, str, bool]:
        key, size = obj["Key"], int(obj["Size"])
        digest, etag = _stored_digest(s3, location, key, size=size, algorithm=algorithm,
                                      shard_size=shard_size)
        if digest is not None:
            return _rel(location, key), size, digest, True
        digest, got = _stream(s3, location, key, algorithm=algorithm, shard_size=shard_size,
                              etag=etag)
        if got != size:
            raise IntegrityError("object changed while it was being hashed",
                                 subject=f"s3://{location.bucket}/{key}")
        return _rel(location, key), size, digest, False

    with ThreadPoolExecutor(max_workers=min(max(n_jobs, 4), 16)) as pool:
        rows = sorted(pool.map(one, objs))
    params: dict[str, Any] = {"root": "directory"}
    if algorithm == "sha256":
        params["shard_size"] = shard_size
    try:
        manifest = Manifest(algorithm, params,
                            tuple(ManifestEntry(p, s, d) for p, s, d, _ in rows))
    except ManifestError as err:
        raise ManifestError(f"objects under {location} cannot form a safe manifest",
                            subject=err.subject, details=err.details) from err
    return manifest, S3ManifestReport(tuple(p for p, _, _, c in rows if c),
                                      tuple(p for p, _, _, c in rows if not c))


def verify_s3(
    location: S3Location,
    manifest: Manifest,
    *,
    client: Any = None,
    jobs: int | None = None,
) -> VerificationReport:
    """Verify the objects under ``location`` in place (HeadObject with ChecksumMode=ENABLED).

    Uses stored checksums where they are comparable and streams the rest; every difference is
    listed in the IntegrityError. This checks the bucket *now*: a step that then reads the
    objects should use :func:`download_and_verify`, which hashes the very bytes it stores.
    """
    s3 = default_client(client)
    n_jobs = jobs_arg(jobs)
    start = time.monotonic()
    shard = int(manifest.params.get("shard_size", 0))
    objs = {_rel(location, o["Key"]): o for o in _list(s3, location)}
    findings: list[str] = []
    expected = {e.path: e for e in manifest.entries}
    findings += [f"added: {p} (object)" for p in sorted(set(objs) - set(expected))]
    findings += [f"missing: {p}" for p in sorted(set(expected) - set(objs))]

    def one(entry: ManifestEntry) -> str | None:
        obj = objs[entry.path]
        if int(obj["Size"]) != entry.size:
            return f"modified: {entry.path} (size {obj['Size']}, manifest {entry.size})"
        key = location.key(entry.path)
        digest, etag = _stored_digest(s3, location, key, size=entry.size,
                                      algorithm=manifest.algorithm, shard_size=shard)
        if digest is None:
            digest, _ = _stream(s3, location, key, algorithm=manifest.algorithm,
                                shard_size=shard, etag=etag)
        if digest != entry.digest:
            return f"modified: {entry.path} (content differs)"
        return None

    present = [e for e in manifest.entries if e.path in objs]
    with ThreadPoolExecutor(max_workers=min(max(n_jobs, 4), 16)) as pool:
        findings += [f for f in pool.map(one, present) if f]
    finish(findings, str(location))
    return VerificationReport(str(location), manifest.digest, len(present),
                              sum(e.size for e in present), time.monotonic() - start)


def download_and_verify(
    location: S3Location,
    manifest: Manifest,
    staging: str | os.PathLike[str],
    *,
    client: Any = None,
    jobs: int | None = None,
) -> VerificationReport:
    """Download the manifest's objects into a new ``staging`` directory, hashing as they arrive.

    The bytes are hashed on their way to disk and never re-read, so what the step body reads is
    exactly what was verified. Objects not in the manifest are reported and not downloaded. On
    any difference the staging directory is removed and IntegrityError lists every finding;
    on success the staged tree is made read-only.
    """
    s3 = default_client(client)
    n_jobs = jobs_arg(jobs)
    start = time.monotonic()
    dest_root = os.path.abspath(os.fspath(staging))
    if os.path.lexists(dest_root):
        raise ConfigurationError("staging directory must not exist yet", subject=dest_root)
    shard = int(manifest.params.get("shard_size", 0))
    objs = {_rel(location, o["Key"]): o for o in _list(s3, location)}
    expected = {e.path: e for e in manifest.entries}
    findings = [f"added: {p} (object)" for p in sorted(set(objs) - set(expected))]
    findings += [f"missing: {p}" for p in sorted(set(expected) - set(objs))]
    present = [e for e in manifest.entries if e.path in objs]
    os.makedirs(dest_root, mode=0o700)
    ok = False
    try:
        for e in present:
            os.makedirs(os.path.dirname(os.path.join(dest_root, e.path)), mode=0o700,
                        exist_ok=True)

        def one(entry: ManifestEntry) -> str | None:
            if int(objs[entry.path]["Size"]) != entry.size:
                return f"modified: {entry.path} (size {objs[entry.path]['Size']}, " \
                       f"manifest {entry.size})"
            digest, size = _stream(s3, location, location.key(entry.path),
                                   algorithm=manifest.algorithm, shard_size=shard,
                                   dest=os.path.join(dest_root, entry.path))
            if size != entry.size or digest != entry.digest:
                return f"modified: {entry.path} (content differs)"
            return None

        with ThreadPoolExecutor(max_workers=min(max(n_jobs, 4), 16)) as pool:
            findings += [f for f in pool.map(one, present) if f]
        finish(findings, str(location))
        make_read_only(dest_root)
        ok = True
    finally:
        if not ok:
            _force_rmtree(dest_root)
    return VerificationReport(dest_root, manifest.digest, len(present),
                              sum(e.size for e in present), time.monotonic() - start)


def _force_rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)

