"""A registry in an S3 bucket prefix (boto3, imported lazily).

Files are uploaded by integrity's uploader (:func:`stepguard.integrity.s3.put_file`), which
returns the SHA-256 of exactly the bytes stored; those digests are what the version's signature
covers.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stepguard._private.fileio import write_all
from stepguard.errors import IntegrityError, RegistryError, StepguardError
from stepguard.registry._base import Registry

#: Files up to this size go in one PutObject carrying their SHA-256 (read once, hashed once);
#: larger files use a multipart upload with per-part SHA-256 checksums (at most
#: MAX_PARTS_IN_FLIGHT parts in memory per file).
SINGLE_PUT_MAX = 64 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024
MAX_PARTS_IN_FLIGHT = 4
#: Bytes that concurrent single PUTs of one registry may hold in memory at once.
SINGLE_PUT_BUDGET = 192 * 1024 * 1024


class _Budget:
    """A byte budget shared by concurrent uploads (bounded memory, whatever the file sizes)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._left = total
        self._cv = threading.Condition()

    @contextlib.contextmanager
    def take(self, n: int) -> Iterator[None]:
        n = min(n, self.total)
        with self._cv:
            while self._left < n:
                self._cv.wait()
            self._left -= n
        try:
            yield
        finally:
            with self._cv:
                self._left += n
                self._cv.notify_all()


class S3Registry(Registry):
    """``s3://bucket/prefix``. Endpoint from ``endpoint_url`` or ``AWS_ENDPOINT_URL``."""

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None,
                 endpoint_url: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client = client
        self._endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        self._budget = _Budget(SINGLE_PUT_BUDGET)

    def __repr__(self) -> str:
        return f"S3Registry({self.url!r})"

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3", endpoint_url=self._endpoint,
                config=Config(retries={"max_attempts": 5, "mode": "standard"},
                              connect_timeout=10, read_timeout=60,
                              max_pool_connections=16))
        return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _err(self, exc: Exception, what: str, key: str) -> RegistryError:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
        return RegistryError(f"S3 {what} failed ({code})", subject=self._uri(key))

    def _any_under(self, prefix: str) -> bool:
        try:
            resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(prefix),
                                               MaxKeys=1)
        except Exception as exc:
            raise self._err(exc, "list", prefix) from exc
        return bool(resp.get("KeyCount"))

    def _put_file(self, key: str, src: Path, size: int) -> str:
        # One uploader for the whole project (stepguard.integrity.s3.put_file): small files in
        # one PutObject carrying their SHA-256 (read once, hashed once, within the byte budget);
        # larger ones as multipart uploads with per-part SHA-256 checksums.
        from stepguard.integrity.s3 import put_file

        single = size <= SINGLE_PUT_MAX
        try:
            with self._budget.take(size if single else 0):
                put = put_file(self.client, src, self.bucket, self._key(key),
                               part_size=max(PART_SIZE, -(-size // 9000)),
                               multipart_above=SINGLE_PUT_MAX,
                               parts_in_flight=MAX_PARTS_IN_FLIGHT)
        except IntegrityError:
            raise
        except StepguardError as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
            raise self._err(cause, "upload" if single else "multipart upload", key) from exc
        assert put.sha256 is not None
        return put.sha256

    def _put_bytes(self, key: str, data: bytes, *, exclusive: bool) -> None:
        args: dict[str, Any] = {
            "Bucket": self.bucket, "Key": self._key(key), "Body": data,
            "ChecksumAlgorithm": "SHA256",
            "ChecksumSHA256": base64.b64encode(hashlib.sha256(data).digest()).decode(),
        }
        if exclusive:
            args["IfNoneMatch"] = "*"
        try:
            self.client.put_object(**args)
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise RegistryError("object already exists (versions are immutable)",
                                    subject=self._uri(key)) from exc
            raise self._err(exc, "upload", key) from exc

    def _get_bytes(self, key: str) -> bytes | None:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            data: bytes = resp["Body"].read()
            return data
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self._err(exc, "download", key) from exc

    def _list_keys(self, prefix: str) -> list[str]:
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        out: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=full):
                out.extend(o["Key"][strip:] for o in page.get("Contents", []))
        except Exception as exc:
            raise self._err(exc, "list", prefix) from exc
        return out

    def _download(self, key: str, dest: Path) -> str:
        h = hashlib.sha256()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            fd = os.open(dest, flags, 0o644)
            try:
                for chunk in resp["Body"].iter_chunks(chunk_size=4 * 1024 * 1024):
                    h.update(chunk)
                    write_all(fd, chunk)
            finally:
                os.close(fd)
        except OSError:
            raise
        except Exception as exc:
            raise self._err(exc, "download", key) from exc
        return h.hexdigest()

    def _delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i:i + 1000]]
            if batch:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch,
                                                                       "Quiet": True})
