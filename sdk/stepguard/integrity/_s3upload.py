"""S3 uploads with SHA-256 checksums: one file (:func:`put_file`) and a whole tree (:func:`upload`).

Every request carries the SHA-256 we computed from the very bytes it sends, so S3 rejects
anything corrupted in transit, and the digest we return (or check against a manifest) describes
exactly what was stored. A file up to ``multipart_above`` bytes goes up in one PutObject; a larger
one as a multipart upload of ``part_size`` parts, each with its own SHA-256 checksum, so the
object's composite checksum is SHA-256 over the raw part digests -- our ``sha256-sharded``
digest when ``part_size`` is the manifest's ``shard_size``.

Why not boto3's transfer manager (``upload_file``/``upload_fileobj``): it is the library that
does multipart uploads, but not this job. It changes the part size on its own (5 MiB minimum,
10,000 parts maximum), which breaks the equality between a manifest's sharded digest and the
composite checksum; it completes a multipart upload with no hook in between, whereas a file
whose bytes differ from the manifest must never become a visible object; and for a single
PutObject it gives botocore the file to read twice (checksum, then body), so the checksum need
not describe the bytes sent if the file changes in between. Speed is not the reason: an upload
is network-bound, and parts go up concurrently here too (``parts_in_flight``).

The file is opened with ``O_NOFOLLOW`` and must stay a regular file of the size its descriptor
had when opened; a file that grows, shrinks or differs from ``expected`` is an
:class:`~stepguard.errors.IntegrityError` and leaves nothing behind.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from stepguard.errors import ConfigurationError, IntegrityError
from stepguard.integrity._digests import open_regular
from stepguard.integrity._manifest import DEFAULT_SHARD_SIZE, Manifest, ManifestEntry
from stepguard.integrity._s3 import S3Location, call, default_client
from stepguard.integrity._tree import create_manifest, finish, jobs_arg

__all__ = ["S3Put", "put_file", "upload"]


@dataclass(frozen=True)
class S3Put:
    """What :func:`put_file` stored.

    ``digest``: the object's digest under the manifest rules (``sha256:<hex>`` for one
    PutObject, ``sha256-sharded:<hex>`` over the parts of a multipart upload). ``sha256``: the
    plain SHA-256 (hex) of the whole object (``None`` when not asked for). ``parts``: 0 for a
    single PutObject.
    """

    digest: str
    sha256: str | None
    size: int
    parts: int


def put_file(client: Any, path: str | os.PathLike[str], bucket: str, key: str, *,
             part_size: int = DEFAULT_SHARD_SIZE, multipart_above: int | None = None,
             parts_in_flight: int = 1, expected: str | None = None,
             plain_sha256: bool = True) -> S3Put:
    """Upload the regular file ``path`` to ``bucket``/``key`` with SHA-256 checksums.

    ``multipart_above`` (default ``part_size``): larger files go up in ``part_size`` parts, at
    most ``parts_in_flight`` of them in memory and in flight at once. ``expected``: the digest
    the bytes must have (see :class:`S3Put`), checked before the object becomes visible; on a
    mismatch nothing is stored and IntegrityError is raised. ``plain_sha256``: also compute the
    whole file's plain SHA-256 for a multipart upload (a second hash of every byte).
    S3 failures raise :class:`~stepguard.errors.TransientError` or
    :class:`~stepguard.errors.OperationalError`.

    >>> put_file(None, "/no/such/file", "bucket", "key")
    Traceback (most recent call last):
    ...
    stepguard.errors.IntegrityError: cannot open (No such file or directory): /no/such/file
    """
    if part_size < 1 or parts_in_flight < 1:
        raise ConfigurationError("part_size and parts_in_flight must be positive",
                                 subject=f"{part_size}, {parts_in_flight}")
    limit = part_size if multipart_above is None else multipart_above
    name = os.fspath(path)
    fd, st = open_regular(name)
    try:
        if st.st_size > limit:
            return _put_parts(client, fd, st.st_size, bucket, key, part_size=part_size,
                              in_flight=parts_in_flight, expected=expected,
                              plain=plain_sha256, name=name)
        data = _read(fd, st.st_size + 1)
        if len(data) != st.st_size:
            raise IntegrityError("file changed while it was being uploaded", subject=name,
                                 details=(f"size {st.st_size} -> {len(data)}",))
        raw = hashlib.sha256(data).digest()
        digest = "sha256:" + raw.hex()
        if expected is not None and digest != expected:
            raise IntegrityError("content differs from the manifest; not uploaded", subject=name)
        call(client.put_object, "put", f"s3://{bucket}/{key}", Bucket=bucket, Key=key,
             Body=data, ChecksumAlgorithm="SHA256",
             ChecksumSHA256=base64.b64encode(raw).decode())
        return S3Put(digest, raw.hex(), len(data), 0)
    finally:
        os.close(fd)


def _read(fd: int, n: int) -> bytes:
    """Up to ``n`` bytes (fewer only at the end of the file)."""
    first = os.read(fd, n)
    if len(first) == n or not first:
        return first
    chunks = [first]
    left = n - len(first)
    while left:
        more = os.read(fd, left)
        if not more:
            break
        chunks.append(more)
        left -= len(more)
    return b"".join(chunks)


def _put_parts(client: Any, fd: int, size: int, bucket: str, key: str, *, part_size: int,
               in_flight: int, expected: str | None, plain: bool, name: str) -> S3Put:
    subject = f"s3://{bucket}/{key}"
    mpu = call(client.create_multipart_upload, "create multipart", subject, Bucket=bucket,
               Key=key, ChecksumAlgorithm="SHA256")
    upload_id = mpu["UploadId"]
    whole = hashlib.sha256() if plain else None
    digests: list[bytes] = []
    sent: list[Future[dict[str, Any]]] = []
    done = False

    def send(number: int, data: bytes, raw: bytes) -> dict[str, Any]:
        b64 = base64.b64encode(raw).decode()
        r = call(client.upload_part, "upload part", subject, Bucket=bucket, Key=key,
                 UploadId=upload_id, PartNumber=number, Body=data, ChecksumAlgorithm="SHA256",
                 ChecksumSHA256=b64)
        return {"PartNumber": number, "ETag": r["ETag"], "ChecksumSHA256": b64}

    try:
        with ThreadPoolExecutor(max_workers=in_flight,
                                thread_name_prefix="stepguard-s3-part") as pool:
            for number in range(1, -(-size // part_size) + 1):
                # Bounded memory: wait for the oldest part before reading another.
                pending = [f for f in sent if not f.done()]
                if len(pending) >= in_flight:
                    pending[0].result()
                data = _read(fd, min(part_size, size - (number - 1) * part_size))
                if len(data) != min(part_size, size - (number - 1) * part_size):
                    raise IntegrityError("file changed while it was being uploaded",
                                         subject=name, details=("truncated",))
                raw = hashlib.sha256(data).digest()
                digests.append(raw)
                if whole is not None:
                    whole.update(data)
                sent.append(pool.submit(send, number, data, raw))
                del data
            parts = [f.result() for f in sent]
        if os.read(fd, 1):
            raise IntegrityError("file changed while it was being uploaded", subject=name,
                                 details=("grew",))
        digest = "sha256-sharded:" + hashlib.sha256(b"".join(digests)).hexdigest()
        if expected is not None and digest != expected:
            raise IntegrityError("content differs from the manifest; not uploaded", subject=name)
        call(client.complete_multipart_upload, "complete multipart", subject, Bucket=bucket,
             Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
        done = True
        return S3Put(digest, whole.hexdigest() if whole is not None else None, size,
                     len(parts))
    finally:
        if not done:
            # Best effort: the error that got us here matters more than a failed abort.
            with contextlib.suppress(Exception):
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)


def upload(
    path: str | os.PathLike[str],
    location: S3Location,
    *,
    client: Any = None,
    manifest: Manifest | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    jobs: int | None = None,
) -> Manifest:
    """Upload a file or tree under ``location`` with SHA-256 checksums S3 checks on arrival.

    Every request carries the SHA-256 we computed from the bytes we send, so S3 rejects anything
    corrupted in transit; files above ``shard_size`` go up as multipart uploads with
    ``shard_size`` parts, so their composite checksum equals the manifest's ``sha256-sharded``
    digest. If ``manifest`` is given, the bytes sent are checked against it (IntegrityError and
    nothing left behind on mismatch); otherwise a manifest is created first. Returns the manifest.
    """
    s3 = default_client(client)
    n_jobs = jobs_arg(jobs)
    if manifest is None:
        manifest = create_manifest(path, shard_size=shard_size, jobs=n_jobs)
    if manifest.algorithm != "sha256":
        raise ConfigurationError("S3 uploads use SHA-256 manifests", subject=manifest.algorithm)
    shard = int(manifest.params.get("shard_size", 0))
    root = os.path.realpath(os.fspath(path))
    is_file = manifest.params.get("root") == "file"

    def one(entry: ManifestEntry) -> str | None:
        src = root if is_file else os.path.join(root, entry.path)
        try:
            put_file(s3, src, location.bucket, location.key(entry.path),
                     part_size=shard or DEFAULT_SHARD_SIZE,
                     multipart_above=shard or sys.maxsize, expected=entry.digest,
                     plain_sha256=False)
        except IntegrityError:
            return f"modified: {entry.path} (content differs from the manifest; not uploaded)"
        return None

    # Uploads are network-bound: more workers than cores, but bounded memory (<= 64 MiB each).
    with ThreadPoolExecutor(max_workers=min(max(n_jobs, 4), 8)) as pool:
        problems = [p for p in pool.map(one, manifest.entries) if p]
    finish(problems, root)
    return manifest
