"""Artifacts by location: where a step's inputs, outputs, manifests and receipts live.

Part of the composition layer, beside :mod:`stepguard.step`: the lifecycle asks this module for
a manifest, a producer's receipt, a verified input or a place for an output, whether that is a
path on this worker's disk or an object-store location (``s3://bucket/prefix``).

* **Object-store inputs** are downloaded into the step's scratch directory and hashed on their
  way to disk (:func:`stepguard.integrity.s3.download_and_verify`): the body reads the very bytes
  that were verified; nothing is read twice.
* **Object-store outputs**: the body writes into scratch; after it, the tree is hashed and
  uploaded under ``<location>/data/`` with SHA-256 checksums S3 checks on arrival
  (:func:`stepguard.integrity.s3.upload`, which refuses bytes that differ from the manifest),
  and the manifest is stored beside it, content-addressed:
  ``<location>/manifest/<algorithm>-<hex>.json``.
* **Receipts** name those locations, never a worker's path, so a consumer on any worker needs
  only the receipt and its own credentials.
* Each S3 client is made from a just-in-time credential of the step
  (:func:`stepguard.wiring.s3_client`); there are no static keys.

A location that cannot be read (no such object, access denied, unreachable) is an
:class:`~stepguard.errors.OperationalError` (``TransientError`` when a retry may help), never an
integrity verdict: only bytes that differ from a manifest are.

>>> is_uri("s3://lake/churn/v1"), is_uri("data/churn")
(True, False)
>>> manifest_key("sha256:" + "ab" * 32)[:16]
'manifest/sha256-'
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from stepguard.errors import ConfigurationError, OperationalError
from stepguard.receipt import Receipt
from stepguard.settings import Settings
from stepguard.spec import InputSpec, StepSpec

__all__ = ["Artifacts", "is_uri", "load_receipt", "manifest_key"]

#: Where the files of an object-store output go, under its location.
DATA_PREFIX = "data/"


def is_uri(value: str) -> bool:
    """True for an object-store location (``s3://...``)."""
    return value.startswith("s3://")


def manifest_key(digest: str) -> str:
    """The content-addressed key of a manifest, relative to its output's location."""
    algorithm, _, hexd = digest.partition(":")
    return f"manifest/{algorithm}-{hexd}.json"


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key:
        raise ConfigurationError("object location needs a bucket and a key", subject=uri)
    return bucket, key


def _get_bytes(client: Any, uri: str, what: str) -> bytes:
    """One object's bytes; a missing or unreadable object is operational, named by its URI."""
    from botocore.exceptions import BotoCoreError, ClientError

    from stepguard.errors import TransientError

    bucket, key = _split(uri)
    try:
        return bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "ClientError"))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        cls = TransientError if status >= 500 or code in ("SlowDown", "RequestTimeout") \
            else OperationalError
        raise cls(f"cannot read the {what} ({code})", subject=uri) from None
    except BotoCoreError as exc:
        raise TransientError(f"cannot read the {what} ({type(exc).__name__})",
                             subject=uri) from None


def load_receipt(value: str, client: Callable[[], Any] | None = None) -> Receipt:
    """A producer's receipt from a file, its JSON text or an ``s3://`` URI.

    >>> from stepguard.spec import RunContext
    >>> r = Receipt(step="ingest", context=RunContext(run_id="r1"), status="succeeded")
    >>> load_receipt(r.to_json()) == r
    True
    >>> load_receipt("/nonexistent/receipt.json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    stepguard.errors.OperationalError: cannot read receipt (No such file or directory): ...
    """
    text = value.lstrip()
    if text.startswith("{"):
        return Receipt.from_json(text)
    if is_uri(value):
        if client is None:
            raise ConfigurationError("a receipt in object storage needs an S3 client",
                                     subject=value)
        return Receipt.from_json(_get_bytes(client(), value, "receipt"))
    try:
        data = Path(value).read_bytes()
    except OSError as exc:
        raise OperationalError(f"cannot read receipt ({exc.strerror})", subject=value) from exc
    return Receipt.from_json(data)


def _load_local_manifest(path: str) -> Any:
    from stepguard.integrity import Manifest

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise OperationalError("manifest does not exist", subject=path) from exc
    except OSError as exc:
        raise ConfigurationError(f"cannot read manifest ({exc.strerror})", subject=path) from exc
    return Manifest.from_json(text)


class Artifacts:
    """The object-store side of one step run: scratch, S3 clients, staging and uploads.

    ``credentials`` returns the values of a step credential by name (the open session's); the
    clients are made once per credential. Use as a context manager: scratch goes at the end.
    """

    def __init__(self, spec: StepSpec, *, scratch_parent: str | None = None) -> None:
        self.spec = spec
        self._scratch_parent = scratch_parent
        self._scratch: Path | None = None
        self._clients: dict[str | None, Any] = {}
        self._values: Callable[[str], Mapping[str, Any]] | None = None
        self._check: Callable[[Receipt], Receipt] = lambda r: r

    def __enter__(self) -> Artifacts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_for(self, session: Any, settings: Settings) -> None:
        """Take credential values from the step's ``session`` (once it is open) and check
        every producer's receipt under ``settings.receipts`` before it is used."""
        from stepguard.credentials import CredentialSession
        from stepguard.wiring import check_receipt

        if session is not None:
            values = session.values
            self._values = lambda name: values[name]
        own = session if isinstance(session, CredentialSession) else None
        self._check = lambda r: check_receipt(r, settings, session=own)

    def hand_off(self, build: Callable[[str | None], Receipt], *, settings: Settings,
                 segment: tuple[str, bytes] | None, failed: bool,
                 target: tuple[str, str, str | None] | None) -> Receipt:
        """The step's receipt as it leaves the step. With an object-store output (``target``:
        name, location, credential), the step's audit log ``segment`` goes next to that
        output first, the receipt (``build(segment URI)``) is sealed, and a copy of it is
        stored there as ``receipt.json``. A failed step's receipt still leaves when the
        object store cannot be reached (the step's own error is what is reported)."""
        from stepguard.errors import StepguardError
        from stepguard.integrity.s3 import S3Location

        seg_uri = None
        try:
            if target is not None and segment is not None:
                base = S3Location.parse(target[1])
                self.put_bytes(self.client(target[2]), base.bucket, base.prefix + segment[0],
                               segment[1])
                seg_uri = f"s3://{base.bucket}/{base.prefix}{segment[0]}"
            receipt = self.seal(build(seg_uri), settings, failed=failed)
            if target is not None:
                base = S3Location.parse(target[1])
                self.put_bytes(self.client(target[2]), base.bucket, base.prefix + "receipt.json",
                               (receipt.to_json(indent=2) + "\n").encode())
        except StepguardError:
            if not failed:
                raise
            return self.seal(build(seg_uri), settings, failed=True)
        return receipt

    @staticmethod
    def seal(receipt: Receipt, settings: Settings, *, failed: bool) -> Receipt:
        """The step's receipt as it leaves the step: signed when ``receipts.signer`` is set.
        A failed step's receipt that cannot be signed still leaves (for forensics)."""
        from stepguard.errors import StepguardError
        from stepguard.wiring import sign_receipt

        try:
            return sign_receipt(receipt, settings)
        except StepguardError:
            if not failed:
                raise
            return receipt

    # -- clients and scratch -------------------------------------------------------------------

    def client(self, credential: str | None) -> Any:
        """The S3 client for ``credential`` (a step credential's name; None: the spec's
        ``storage.credential``, else boto3's default chain)."""
        name = self.spec.storage_credential(credential)
        if name not in self._clients:
            from stepguard.wiring import s3_client

            values = None
            if name is not None:
                if self._values is None:
                    raise ConfigurationError("the step's credentials are not open yet",
                                             subject=name)
                values = self._values(name)
            endpoint = self.spec.storage.endpoint_url if self.spec.storage else None
            self._clients[name] = s3_client(values, endpoint_url=endpoint)
        return self._clients[name]

    @property
    def scratch(self) -> Path:
        """This run's private scratch directory (0700), made on first use."""
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="stepguard-scratch-",
                                                  dir=self._scratch_parent))
        return self._scratch

    def close(self) -> None:
        """Remove scratch (staged inputs are read-only: made writable first)."""
        if self._scratch is None:
            return
        for dirpath, _dirs, _files in os.walk(self._scratch):
            with contextlib.suppress(OSError):
                os.chmod(dirpath, stat.S_IRWXU)
        shutil.rmtree(self._scratch, ignore_errors=True)
        self._scratch = None

    # -- inputs ----------------------------------------------------------------------------------

    def receipt(self, value: str, credential: str | None) -> Receipt:
        """A producer's receipt (file, JSON text, or object URI read with ``credential``),
        checked (signature) before anything in it is used."""
        return self._check(load_receipt(value, lambda: self.client(credential)))

    def manifest(self, ref: str, credential: str | None) -> Any:
        """A manifest from a local file or an object URI (read with ``credential``)."""
        from stepguard.integrity import Manifest

        if is_uri(ref):
            return Manifest.from_json(_get_bytes(self.client(credential), ref, "manifest"))
        return _load_local_manifest(ref)

    def reference(self, inp: InputSpec) -> tuple[Any, str]:
        """The manifest ``inp`` is verified against (a producer's receipt, a manifest file or
        an object URI) and how the receipt records its source."""
        from stepguard.errors import IntegrityError

        if inp.receipt:
            producer = self.receipt(inp.receipt, inp.credential)
            label = inp.receipt if len(inp.receipt) < 512 and "\n" not in inp.receipt \
                and not inp.receipt.lstrip().startswith("{") else f"step {producer.step}"
            if producer.status != "succeeded":
                raise IntegrityError(
                    "producer step did not succeed; its outputs are not vouched for",
                    subject=label,
                    details=[f"step {producer.step}: {producer.status}"
                             + (f" ({producer.error.type})" if producer.error else "")])
            out = producer.output(inp.receipt_output or inp.name)
            manifest = self.manifest(out.manifest, inp.credential)
            if manifest.digest != out.digest:
                raise IntegrityError(
                    "manifest does not match the producer's receipt", subject=out.manifest,
                    details=[f"receipt: {out.digest}", f"manifest: {manifest.digest}"],
                )
            return manifest, f"receipt:{label}#{out.name}"
        assert inp.manifest is not None  # guaranteed by InputSpec
        return self.manifest(inp.manifest, inp.credential), f"manifest:{inp.manifest}"

    def stage_input(self, name: str, uri: str, manifest: Any, credential: str | None) -> Path:
        """Download ``uri``'s objects into scratch, hashed as they arrive; the staged,
        read-only tree. Differing, added or missing objects are an IntegrityError; a location
        with no objects at all is operational (nothing there to judge)."""
        from stepguard.integrity.s3 import S3Location, download_and_verify

        client = self.client(credential)
        loc = S3Location.parse(uri)
        self._require_objects(client, loc, uri)
        dest = self.scratch / "inputs" / name
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        download_and_verify(loc, manifest, dest, client=client)
        # Readable, never writable, by the body's uid (a sandbox may run it as another user);
        # scratch itself stays 0700, so nobody else on the host reaches the copy.
        for dirpath, _dirs, files in os.walk(dest):
            for f in files:
                os.chmod(os.path.join(dirpath, f), 0o444, follow_symlinks=False)
            os.chmod(dirpath, 0o555)  # noqa: S103 -- read-only; scratch above is 0700
        return dest

    @staticmethod
    def _any_object(client: Any, loc: Any, uri: str, what: str) -> bool:
        """Whether ``loc`` holds an object; unreachable is transient, refused operational."""
        from botocore.exceptions import BotoCoreError, ClientError

        from stepguard.errors import TransientError

        try:
            page = client.list_objects_v2(Bucket=loc.bucket, Prefix=loc.prefix, MaxKeys=1)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", "ClientError"))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            cls = TransientError if status >= 500 else OperationalError
            raise cls(f"cannot list the {what} ({code})", subject=uri) from None
        except BotoCoreError as exc:
            raise TransientError(f"cannot list the {what} ({type(exc).__name__})",
                                 subject=uri) from None
        return bool(page.get("KeyCount"))

    def _require_objects(self, client: Any, loc: Any, uri: str) -> None:
        if not self._any_object(client, loc, uri, "input"):
            raise OperationalError("input does not exist (no objects at the location)",
                                   subject=uri,
                                   hint="was the producer's output deleted or moved?")

    # -- outputs ---------------------------------------------------------------------------------

    def output_dir(self, name: str, uri: str, credential: str | None) -> Path:
        """Where the body writes output ``name`` bound for ``uri`` (which must hold nothing)."""
        from stepguard.integrity.s3 import S3Location

        loc = S3Location.parse(uri)
        if self._any_object(self.client(credential), loc, uri, "output location"):
            raise ConfigurationError(
                "output location already holds objects: they would be mixed with this run's",
                subject=uri, hint="use a fresh location per run: e.g. s3://bucket/out/{run_id}")
        path = self.scratch / "outputs" / name
        path.mkdir(mode=0o700, parents=True)
        return path

    def upload_output(self, path: Path, uri: str, manifest: Any,
                      credential: str | None) -> tuple[str, str]:
        """Upload the hashed tree and its manifest; ``(data URI, manifest URI)``."""
        from stepguard.integrity.s3 import S3Location, upload

        client = self.client(credential)
        base = S3Location.parse(uri)
        data = S3Location(base.bucket, base.prefix + DATA_PREFIX)
        upload(path, data, client=client, manifest=manifest)
        mkey = base.prefix + manifest_key(manifest.digest)
        self.put_bytes(client, base.bucket, mkey, manifest.to_json().encode())
        return str(data), f"s3://{base.bucket}/{mkey}"

    @staticmethod
    def put_bytes(client: Any, bucket: str, key: str, body: bytes) -> None:
        """One small object with its SHA-256 checksum (S3 checks it on arrival)."""
        import base64
        import hashlib

        try:
            client.put_object(Bucket=bucket, Key=key, Body=body, ChecksumAlgorithm="SHA256",
                              ChecksumSHA256=base64.b64encode(
                                  hashlib.sha256(body).digest()).decode())
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
            raise OperationalError(f"S3 put failed ({code})",
                                   subject=f"s3://{bucket}/{key}") from None
