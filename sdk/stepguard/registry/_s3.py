"""A registry in an S3 bucket prefix (boto3, imported lazily)."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any

from stepguard.errors import IntegrityError, RegistryError
from stepguard.registry._base import Registry

#: Files up to this size go in one PutObject carrying our SHA-256, which S3 checks against the
#: bytes it receives; larger files use multipart upload with per-part SHA-256 checksums.
SINGLE_PUT_MAX = 64 * 1024 * 1024
PART_SIZE = 64 * 1024 * 1024


class S3Registry(Registry):
    """``s3://bucket/prefix``. Endpoint from ``endpoint_url`` or ``AWS_ENDPOINT_URL``."""

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None,
                 endpoint_url: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client = client
        self._endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")

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

    def _put_file(self, key: str, src: Path, sha256_hex: str, size: int) -> None:
        from boto3.s3.transfer import TransferConfig

        try:
            if size <= SINGLE_PUT_MAX:
                with open(src, "rb") as fh:
                    self.client.put_object(
                        Bucket=self.bucket, Key=self._key(key), Body=fh,
                        ChecksumAlgorithm="SHA256",
                        ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256_hex)).decode())
            else:
                self.client.upload_file(
                    str(src), self.bucket, self._key(key),
                    ExtraArgs={"ChecksumAlgorithm": "SHA256"},
                    Config=TransferConfig(multipart_threshold=SINGLE_PUT_MAX,
                                          multipart_chunksize=PART_SIZE, max_concurrency=8))
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code in ("BadDigest", "InvalidRequest") and size <= SINGLE_PUT_MAX:
                raise IntegrityError("file changed between signing and upload (S3 checksum "
                                     "mismatch)", subject=str(src)) from exc
            raise self._err(exc, "upload", key) from exc

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
                    os.write(fd, chunk)
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
