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
    "ExportRecord",
    "InputRecord",
    "LeaseRecord",
    "OutputRecord",
    "PublishRecord",
    "Receipt",
    "VerificationRecord",
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
    """One credential a step used, as its receipt, its audit span and ``session.leases`` say.

    The one record type for a credential, shared by :mod:`stepguard.credentials` (which makes
    them) and receipts (which carry them). Never a secret value and never a lease id: ``lease``
    is a one-way hash of the id (``None`` for a credential without one, e.g. a KV secret);
    :attr:`lease_id_hash` is the same value under the name the credentials API uses.

    * ``revocable`` -- False for credentials that can only expire (STS, web identity) or are
      static (KV).
    * ``revoked`` -- True once the credential was revoked: by revoking its lease
      (``revoked_by="lease"``) or by revoking the step token it was minted under
      (``revoked_by="token"``). A credential that cannot be revoked is never revoked: ``False``,
      always. So "left behind" is ``revocable and not revoked``, never ``not revoked`` alone.
    * ``error`` -- why revoking the lease itself failed (a secret-free message), else ``None``.
    * ``ttl_s`` -- the lease's TTL in seconds as last issued or renewed (0: none);
      ``issue_s`` -- how long minting it took.

    >>> rec = LeaseRecord(name="api", kind="kv", lease=None, revocable=False, static=True)
    >>> rec.revoked, rec.lease_id_hash, rec.ttl_s
    (False, None, 0.0)

    Receipts written before ``renewable``, ``issue_s``, ``revoked_by`` and ``error`` were
    recorded still load (the fields take their defaults); one that says ``"revoked": null`` for
    a non-revocable credential reads as ``False``.
    """

    name: str
    kind: str
    lease: str | None
    revocable: bool
    revoked: bool = False
    static: bool = False
    ttl_s: float = 0.0
    renewable: bool = False
    issue_s: float = 0.0
    revoked_by: Literal["lease", "token"] | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        # One representation whoever builds it (Vault returns whole seconds as ints), so the
        # receipt's canonical JSON -- and its digest -- does not depend on the builder.
        object.__setattr__(self, "ttl_s", float(self.ttl_s))
        object.__setattr__(self, "issue_s", float(self.issue_s))

    @property
    def lease_id_hash(self) -> str | None:
        """The hashed lease id (the same value as ``lease``)."""
        return self.lease

    def to_receipt(self) -> LeaseRecord:
        """The record as a receipt carries it: itself (a session's records are the receipt's)."""
        return self

    def to_dict(self) -> dict[str, Any]:
        """The credentials view as plain data (``stepguard credentials check --json``, spans):
        ``lease_id_hash`` for the hashed id and whole-second ``ttl_s``. Receipts serialize the
        fields as they are (:meth:`Receipt.to_dict`).

        >>> LeaseRecord(name="db", kind="database", lease="sha256:ab", revocable=True,
        ...             ttl_s=60).to_dict()["ttl_s"]
        60
        """
        return {
            "name": self.name, "kind": self.kind, "lease_id_hash": self.lease,
            "revocable": self.revocable, "static": self.static, "renewable": self.renewable,
            "ttl_s": int(self.ttl_s), "revoked": self.revoked, "revoked_by": self.revoked_by,
            "error": self.error,
        }


@dataclass(frozen=True)
class VerificationRecord:
    """One signature verification the step made under a named policy: an input's manifest
    signature (``kind="input"``) or the deployment gate's model (``kind="gate"``).

    ``signer`` is the identity the policy accepted, read from the verified bundle (never the
    publisher's claim); ``subject`` names what was verified (``name:version`` for the gate, the
    input's name for an input); ``registry`` where it came from (gate only).

    >>> VerificationRecord(kind="gate", policy="release", subject="churn:7",
    ...                    signer="transit:transit/stepguard-signing:v1:sha256:ab").verified
    True
    """

    kind: Literal["input", "gate"]
    policy: str
    subject: str
    signer: str
    verified: bool = True
    registry: str | None = None
    policy_kind: str | None = None


@dataclass(frozen=True)
class ExportRecord:
    """Whether this step's spans reached the remote (OTLP) collector.

    ``status``: ``ok`` (every span delivered), ``lost`` (``spans_dropped`` could not be
    delivered: collector down, OTLP errors), ``unconfirmed`` (the flush did not finish in time;
    they may yet be lost) or ``none`` (no remote exporter: the local log only). Whatever it says,
    the local hash-chained log holds every span (``audit_head``/``audit_segment``).
    """

    status: Literal["ok", "lost", "unconfirmed", "none"]
    spans_exported: int = 0
    spans_dropped: int = 0


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
    #: Where this step's segment of the hash-chained log went (object storage), ending at
    #: ``audit_head``.
    audit_segment: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    error: ErrorRecord | None = None
    schema: str = SCHEMA
    #: A signature bundle (DSSE, JSON text) over :meth:`payload`, when receipts are signed.
    signature: str | None = None
    #: Every signature verification the step made (inputs, the deployment gate): policy and
    #: accepted signer. Absent from the JSON when empty.
    verifications: tuple[VerificationRecord, ...] = ()
    #: Whether the step's spans reached the OTLP collector. Absent when auditing was off.
    audit_export: ExportRecord | None = None

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
        """Plain-data form, as written to XCom / KFP outputs (no ``signature`` key when the
        receipt is unsigned)."""
        out: dict[str, Any] = to_plain(self)
        # Absent rather than null or empty: older readers refuse keys they do not know.
        for key in ("signature", "audit_segment", "audit_export"):
            if out.get(key) is None:
                out.pop(key, None)
        if not out.get("verifications"):
            out.pop("verifications", None)
        return out

    def payload(self) -> bytes:
        """What a receipt signature signs: the canonical JSON without the signature.

        >>> from stepguard.spec import RunContext
        >>> r = Receipt(step="s", context=RunContext(run_id="r1"), status="succeeded")
        >>> r.payload() == Receipt(**{**r.__dict__, "signature": "{}"}).payload()
        True
        """
        data = self.to_dict()
        data.pop("signature", None)
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

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
        receipt = from_mapping(cls, _upgrade(data), "receipt")
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


def _upgrade(data: object) -> object:
    """Older receipts, read the current way: a credential's ``"revoked": null`` (what a
    non-revocable credential could say) is False, and ``"ttl_s": null`` is 0."""
    if not isinstance(data, Mapping) or not isinstance(data.get("credentials"), list):
        return data
    creds: list[Any] = []
    for entry in data["credentials"]:
        if isinstance(entry, Mapping):
            fixed = {**entry}
            if "revoked" in fixed and fixed["revoked"] is None:
                fixed["revoked"] = False
            if "ttl_s" in fixed and fixed["ttl_s"] is None:
                fixed["ttl_s"] = 0.0
            creds.append(fixed)
        else:
            creds.append(entry)
    return {**data, "credentials": creds}
