"""The facet classes (need ``openlineage-python``; see the package docs)."""

from __future__ import annotations

from typing import Any, ClassVar

from attrs import define
from openlineage.client.facet_v2 import DatasetFacet, RunFacet

from stepguard_airflow.facets import PRODUCER, schema_url

__all__ = [
    "StepguardManifestDatasetFacet",
    "StepguardSignatureDatasetFacet",
    "StepguardVerdictsRunFacet",
]


@define
class StepguardManifestDatasetFacet(DatasetFacet):
    """A dataset's content manifest as the step verified (input) or hashed (output) it.

    ``digest`` is the manifest's root digest (``sha256:<hex>``), ``manifestUri`` where the
    manifest is stored, ``verified`` whether an input was checked against it before the body
    ran (always true for an output: stepguard hashed it), ``source`` what the input was
    checked against (``receipt:<path>#<output>``, ``manifest:<path>``).
    """

    digest: str
    role: str
    manifestUri: str | None = None
    files: int = 0
    totalBytes: int = 0
    verified: bool = False
    source: str | None = None

    _additional_skip_redact: ClassVar[list[str]] = ["digest", "role", "manifestUri", "source"]

    def __attrs_post_init__(self) -> None:
        self._producer = self._producer or PRODUCER
        super().__attrs_post_init__()

    @staticmethod
    def _get_schema() -> str:
        return schema_url("StepguardManifestDatasetFacet")


@define
class StepguardSignatureDatasetFacet(DatasetFacet):
    """Who signed a model and where its OpenSSF model-signing bundle is.

    On a published output: the signer identity the publishing step signed as. On the input of
    the deployment gate: the signer the gate's policy *accepted* in the fetched bundle, and
    the policy's name (``policy``).
    """

    signer: str | None
    bundleDigest: str | None = None
    bundleUri: str | None = None
    registry: str | None = None
    modelName: str | None = None
    modelVersion: str | None = None
    provenanceUri: str | None = None
    policy: str | None = None

    _additional_skip_redact: ClassVar[list[str]] = [
        "signer", "bundleDigest", "bundleUri", "registry", "provenanceUri"]

    def __attrs_post_init__(self) -> None:
        self._producer = self._producer or PRODUCER
        super().__attrs_post_init__()

    @staticmethod
    def _get_schema() -> str:
        return schema_url("StepguardSignatureDatasetFacet")


@define
class StepguardVerdictsRunFacet(RunFacet):
    """Every check of the secured step and the receipt that records them.

    ``integrity``: ``{"verdict": "pass"|"fail"|"not_checked", "inputs": [...],
    "outputs": [...]}``; ``gate``: the deployment gate's ``{"policy", "signer", "verdict":
    "accepted"|"refused"|"error", ...}`` (absent for other steps); ``credentials``: kind,
    hashed lease id and whether it was revoked (never a value); ``error``: why the step failed.
    """

    step: str
    status: str
    receiptDigest: str
    integrity: dict[str, Any]
    traceId: str | None = None
    auditHead: str | None = None
    auditSegment: str | None = None
    receiptUri: str | None = None
    receiptSigned: bool = False
    gate: dict[str, Any] | None = None
    credentials: list[dict[str, Any]] | None = None
    error: dict[str, Any] | None = None

    _additional_skip_redact: ClassVar[list[str]] = [
        "step", "status", "receiptDigest", "traceId", "auditHead", "auditSegment", "receiptUri"]

    def __attrs_post_init__(self) -> None:
        self._producer = self._producer or PRODUCER
        super().__attrs_post_init__()

    @staticmethod
    def _get_schema() -> str:
        return schema_url("StepguardVerdictsRunFacet")
