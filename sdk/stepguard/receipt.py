"""Receipts: the small JSON record a secured step hands to the next one.

A receipt names what the step read (input manifest digests), what it wrote (output manifest
digests, where the manifests are, where the signed artifacts went), which credentials it used
(lease ids *hashed*, whether they were revoked), how it was isolated and which trace holds its
audit spans. It never holds a credential. It is what goes to XCom / KFP outputs, and the next
step verifies its inputs against it: integrity becomes a chain of custody.

>>> from stepguard.receipt import Receipt, OutputRecord
>>> from stepguard.spec import RunContext
>>> r = Receipt(step="train", context=RunContext(pipeline="p", run_id="r1", step="train"),
...             status="succeeded",
...             outputs=(OutputRecord(name="model", path="/out/model",
...                                   digest="sha256:" + "ab" * 32, manifest="/m.json",
...                                   files=3, bytes=1024),))
>>> Receipt.from_json(r.to_json()) == r
True
>>> r.output("model").digest[:9]
'sha256:ab'
>>> r.digest.startswith("sha256:")
True
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stepguard._private.schema import from_mapping, to_plain
from stepguard.errors import ConfigurationError
from stepguard.spec import RunContext

__all__ = [
    "ErrorRecord",
    "InputRecord",
    "LeaseRecord",
    "OutputRecord",
    "PublishRecord",
    "Receipt",
]

SCHEMA = "https://stepguard.dev/receipt/v1"


@dataclass(frozen=True)
class InputRecord:
    """One verified input: where it was read from and the manifest root digest it matched."""

    name: str
    path: str
    digest: str | None
    verified: bool
    files: int = 0
    bytes: int = 0
    source: str | None = None  # "manifest:<path>" | "receipt:<path>#<output>" | "unverified"
    signer: str | None = None


@dataclass(frozen=True)
class PublishRecord:
    """Where an output was published and what signed it."""

    registry: str
    name: str
    version: str
    uri: str
    bundle_uri: str | None = None
    bundle_digest: str | None = None
    signer: str | None = None
    provenance_uri: str | None = None


@dataclass(frozen=True)
class OutputRecord:
    """One output: its manifest root digest and where the manifest is stored."""

    name: str
    path: str
    digest: str
    manifest: str
    files: int = 0
    bytes: int = 0
    published: PublishRecord | None = None


@dataclass(frozen=True)
class LeaseRecord:
    """A credential the step used. ``lease`` is a one-way hash of the lease id, never the id."""

    name: str
    kind: str
    lease: str | None
    revocable: bool
    revoked: bool | None = None
    static: bool = False
    ttl_s: float | None = None


@dataclass(frozen=True)
class ErrorRecord:
    """Why a step failed: the error type and its one-line, secret-free message."""

    type: str
    message: str
    subject: str | None = None


@dataclass(frozen=True)
class Receipt:
    """The record of one secured step run (see module docs)."""

    step: str
    context: RunContext
    status: Literal["succeeded", "failed"]
    inputs: tuple[InputRecord, ...] = ()
    outputs: tuple[OutputRecord, ...] = ()
    credentials: tuple[LeaseRecord, ...] = ()
    isolation: Mapping[str, str] = field(default_factory=dict)
    trace_id: str | None = None
    audit_head: str | None = None  # "<seq>:<digest>" of the local audit log after this step
    started_at: str | None = None
    finished_at: str | None = None
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    error: ErrorRecord | None = None
    schema: str = SCHEMA

    def output(self, name: str) -> OutputRecord:
        """The output record called ``name`` (ConfigurationError if there is none)."""
        for out in self.outputs:
            if out.name == name:
                return out
        raise ConfigurationError(
            f"receipt of step {self.step!r} has no output {name!r}",
            subject=name,
            hint=f"outputs: {', '.join(o.name for o in self.outputs) or 'none'}",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as written to XCom / KFP outputs."""
        out: dict[str, Any] = to_plain(self)
        return out

    def to_json(self, *, indent: int | None = None) -> str:
        """Canonical JSON (sorted keys)."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=indent,
                          separators=(",", ":") if indent is None else None)

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` over the canonical JSON: what provenance and audit refer to."""
        return "sha256:" + hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Receipt:
        """Parse a receipt strictly (unknown keys refused)."""
        receipt = from_mapping(cls, data, "receipt")
        if receipt.schema != SCHEMA:
            raise ConfigurationError(f"unsupported receipt schema {receipt.schema!r}",
                                     subject="receipt.schema")
        return receipt

    @classmethod
    def from_json(cls, text: str | bytes) -> Receipt:
        """Parse a receipt from JSON text."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigurationError("receipt is not valid JSON", subject="receipt") from exc
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> Receipt:
        """Read a receipt file."""
        p = Path(path)
        try:
            return cls.from_json(p.read_bytes())
        except OSError as exc:
            raise ConfigurationError(f"cannot read receipt ({exc.strerror})",
                                     subject=str(p)) from exc
