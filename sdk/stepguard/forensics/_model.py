"""The forensic record as data: what ``stepguard trace`` found, in frozen dataclasses.

Every value here comes from a receipt, the registry or an audit record; none is a secret (lease
ids are the receipts' one-way hashes). ``None`` means "not recorded": the renderers say so
instead of guessing. :meth:`Trace.to_dict` is the ``--json`` document (schema
:data:`TRACE_SCHEMA`, documented in ``docs/reference/trace.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from stepguard._private.schema import to_plain

#: The ``schema`` member of the ``--json`` document; bumped on any incompatible change.
TRACE_SCHEMA = "https://stepguard.dev/trace/v1"

#: Where a credential stands now: ``revoked`` (its lease or step token was revoked),
#: ``expired`` (it cannot be revoked and its TTL has run out), ``expiring`` (cannot be revoked,
#: TTL still running), ``static`` (a static secret, e.g. KV: nothing to revoke), ``unknown``
#: (revocable but not revoked: treat it as possibly leaked until its lease is checked).
CredentialState = Literal["revoked", "expired", "expiring", "static", "unknown"]

#: The stages of the chain of custody, in order, as the drawing shows them.
STAGES = ("data", "train", "model", "signature", "gate", "deploy")

Verdict = Literal["pass", "fail", "not recorded"]


@dataclass(frozen=True)
class Artifact:
    """One input or output of a step: its manifest root digest and where it is."""

    name: str
    digest: str | None
    uri: str
    manifest: str | None = None
    files: int = 0
    bytes: int = 0
    verified: bool | None = None  # inputs: verified against a manifest before the body ran
    source: str | None = None  # inputs: "receipt:...#out" | "manifest:..." | "unverified"


@dataclass(frozen=True)
class Credential:
    """One credential a step used, and where it stands (see :data:`CredentialState`)."""

    step: str
    name: str
    kind: str
    lease_hash: str | None
    state: CredentialState
    revocable: bool
    ttl_s: float = 0.0
    revoked_by: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Check:
    """One verdict a control recorded: from the audit log (a verdict event) or, when no audit
    record names it, from the receipt (the step's outcome)."""

    step: str
    name: str
    passed: bool
    source: Literal["audit", "receipt"]
    control: str | None = None
    details: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """One step's receipt, read back: what it read and wrote, how, with what credentials."""

    step: str
    run_id: str
    pipeline: str
    try_number: int
    status: str
    receipt: str  # where the receipt was read from
    receipt_digest: str
    receipt_signed: bool
    #: The receipt's signature verified under the settings' receipts policy: True, False (not
    #: signed as the policy requires, or edited after signing), None: not checked.
    receipt_verified: bool | None = None
    stage: str | None = None  # one of STAGES, when the step is part of the drawn chain
    inputs: tuple[Artifact, ...] = ()
    outputs: tuple[Artifact, ...] = ()
    credentials: tuple[Credential, ...] = ()
    checks: tuple[Check, ...] = ()
    #: Signer, policy and identity attributes the step's spans recorded (newer audit trails:
    #: the signing span, the gate's verdict), keys without the ``stepguard.`` prefix.
    signing: Mapping[str, str] = field(default_factory=dict)
    isolation: str | None = None
    image: str | None = None
    trace_id: str | None = None
    audit_segment: str | None = None
    audit_head: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Signature:
    """Who signed the model and whether the registry's bundle is the one the receipt names."""

    signer: str | None
    bundle_uri: str | None
    bundle_digest: str | None  # what the publishing receipt recorded
    registry_bundle_digest: str | None = None  # what the registry holds now
    subjects: tuple[str, ...] = ()  # digests the signed statement names
    provenance_uri: str | None = None
    key_hint: str | None = None

    @property
    def bundle_matches(self) -> bool | None:
        """True/False when both digests are known, else None."""
        if self.bundle_digest is None or self.registry_bundle_digest is None:
            return None
        return self.bundle_digest == self.registry_bundle_digest


@dataclass(frozen=True)
class Gate:
    """The deployment gate's verdict: the policy it verified under and the signer it accepted
    (``None``: not recorded -- older audit logs do not carry them)."""

    step: str | None
    verdict: Verdict
    policy: str | None = None
    signer: str | None = None
    digest: str | None = None


@dataclass(frozen=True)
class Source:
    """Code and image the model was built from (SLSA provenance and the training receipt)."""

    code: str | None = None
    code_uri: str | None = None
    image: str | None = None
    builder: str | None = None
    invocation: str | None = None


@dataclass(frozen=True)
class Segment:
    """One audit log or segment and whether its hash chain verified. ``where`` names the broken
    record (``line N``) when it did not."""

    location: str
    intact: bool
    records: int = 0
    anchored_by: tuple[str, ...] = ()  # steps whose receipt's audit head this chain holds
    error: str | None = None
    where: str | None = None
    details: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stage:
    """One node of the drawn chain: data -> train -> model -> signature -> gate -> deploy."""

    kind: str
    label: str
    verdict: Verdict
    detail: str = ""


@dataclass(frozen=True)
class Model:
    """The model asked about: its registry coordinates and root digest."""

    name: str
    version: str
    registry: str | None
    digest: str | None
    uri: str | None = None


@dataclass(frozen=True)
class Trace:
    """The answer to "which data trained this model, who signed it, which credentials touched
    it, what did every check say, and is the record intact"."""

    subject: str
    run_ids: tuple[str, ...]
    steps: tuple[Step, ...]
    model: Model | None = None
    signature: Signature | None = None
    gate: Gate | None = None
    source: Source = field(default_factory=Source)
    audit: tuple[Segment, ...] = ()
    chain: tuple[Stage, ...] = ()
    problems: tuple[str, ...] = ()
    #: Tasks of the traced runs that the audit trail shows ran without stepguard (an Airflow
    #: task span with ``stepguard.secured`` false): no receipt, no checks, no credentials record.
    unsecured: tuple[str, ...] = ()

    @property
    def intact(self) -> bool:
        """True when every audit chain verified and nothing in the record contradicts it."""
        return not self.problems and all(s.intact for s in self.audit)

    @property
    def data(self) -> tuple[Artifact, ...]:
        """The data sources: outputs of the steps of the ``data`` stage (deduplicated)."""
        seen: dict[str | None, Artifact] = {}
        for step in self.steps:
            if step.stage == "data":
                for out in step.outputs:
                    seen.setdefault(out.digest, out)
        return tuple(seen.values())

    @property
    def credentials(self) -> tuple[Credential, ...]:
        """Every credential of every step traced."""
        return tuple(c for s in self.steps for c in s.credentials)

    @property
    def checks(self) -> tuple[Check, ...]:
        """Every check of every step traced."""
        return tuple(c for s in self.steps for c in s.checks)

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document (see ``docs/reference/trace.md``)."""
        plain: dict[str, Any] = to_plain(self)
        if self.signature is not None:
            plain["signature"]["bundle_matches"] = self.signature.bundle_matches
        plain["data"] = [to_plain(a) for a in self.data]
        plain["intact"] = self.intact
        return {"schema": TRACE_SCHEMA, **plain}
