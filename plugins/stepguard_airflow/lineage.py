"""OpenLineage for secured tasks: datasets with their digests, the signer, every verdict.

Every stepguard operator implements the Airflow OpenLineage provider's
``get_openlineage_facets_on_complete`` and ``get_openlineage_facets_on_failure``
(:class:`LineageMixin`). With the provider installed and a transport configured
(``[openlineage] transport`` or ``OPENLINEAGE__TRANSPORT__*``), a task's COMPLETE or FAIL event
then carries, read from the step's receipt -- never re-derived:

* **inputs / outputs** as OpenLineage datasets named after their locations (:func:`dataset_id`:
  ``s3://bucket/key`` -> namespace ``s3://bucket``, name ``key``; a local path or ``file://``
  URI -> namespace ``file``, name the absolute path; a published model is named by its
  registry URI), each with the ``stepguard_manifest`` facet (root digest, manifest location,
  whether it was verified) and, when signed, ``stepguard_signature`` (signer, bundle digest);
* the run facet ``stepguard_verdicts``: the integrity verdict, the deployment gate's policy,
  accepted signer and verdict, credentials by kind and hashed lease id, the receipt's digest
  and location, the trace id and audit head.

The facet classes and their JSON Schemas are in :mod:`stepguard_airflow.facets`. Nothing here
imports OpenLineage until the provider asks for facets, and without the provider the methods are
simply never called: DAG parsing stays fast and the operators work as before.

>>> dataset_id("s3://lake/churn/raw/")
('s3://lake', 'churn/raw')
>>> dataset_id("file:///srv/models/churn")
('file', '/srv/models/churn')
>>> dataset_id("/srv/data")
('file', '/srv/data')
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from stepguard.receipt import InputRecord, OutputRecord, Receipt

__all__ = [
    "LineageMixin",
    "StepRecord",
    "dataset_id",
    "forget",
    "operator_lineage",
    "remember",
]

log = logging.getLogger("stepguard.airflow")

#: Attribute of the operator that holds the :class:`StepRecord` of its last run.
RECORD_ATTR = "_stepguard_record"
#: Error types that are a gate's *refusal* (anything else failing is an ``error`` verdict).
_REFUSALS = frozenset({"SignatureError", "PolicyViolation", "IntegrityError", "ManifestError"})


@dataclass(frozen=True)
class StepRecord:
    """What a task run leaves on its operator for lineage: the receipt (also of a failed
    step), where the receipt is stored, and the gate's facts for the deployment gate."""

    receipt: Receipt
    receipt_uri: str | None = None
    gate: dict[str, Any] = field(default_factory=dict)


def remember(task: object, receipt: Receipt, receipt_uri: str | None = None,
             gate: Mapping[str, Any] | None = None) -> None:
    """Keep ``receipt`` on ``task`` (the operator) for its lineage methods."""
    if task is None:
        return
    try:
        setattr(task, RECORD_ATTR, StepRecord(receipt, receipt_uri, dict(gate or {})))
    except AttributeError:  # an operator that refuses attributes: no lineage, not a failure
        log.debug("cannot keep the receipt on %r for lineage", task)


def forget(task: object) -> None:
    """Drop what an earlier run left on ``task``: a run that fails before its step reports
    no stepguard lineage rather than another run's."""
    if task is not None and getattr(task, RECORD_ATTR, None) is not None:
        setattr(task, RECORD_ATTR, None)


def dataset_id(location: str) -> tuple[str, str]:
    """``(namespace, name)`` of a location, per the OpenLineage dataset naming conventions."""
    parts = urlsplit(location)
    if parts.scheme in ("", "file"):
        path = parts.path if parts.scheme else location
        return "file", str(Path(path).absolute()).rstrip("/") or "/"
    if parts.scheme == "s3":
        return f"s3://{parts.netloc}", parts.path.strip("/")
    return f"{parts.scheme}://{parts.netloc}", parts.path.rstrip("/") or "/"


def _manifest_facet(role: str, rec: InputRecord | OutputRecord) -> Any:
    from stepguard_airflow.facets import StepguardManifestDatasetFacet

    if role == "input":
        return StepguardManifestDatasetFacet(
            digest=rec.digest or "", role=role, files=rec.files, totalBytes=rec.bytes,
            verified=bool(getattr(rec, "verified", False)), source=getattr(rec, "source", None))
    return StepguardManifestDatasetFacet(
        digest=rec.digest or "", role=role, manifestUri=getattr(rec, "manifest", None),
        files=rec.files, totalBytes=rec.bytes, verified=True)


def _dataset(kind: str, location: str, facets: Mapping[str, Any]) -> Any:
    from openlineage.client.event_v2 import InputDataset, OutputDataset

    namespace, name = dataset_id(location)
    cls = InputDataset if kind == "input" else OutputDataset
    return cls(namespace=namespace, name=name, facets=dict(facets))


def _inputs(receipt: Receipt, gate: Mapping[str, Any]) -> list[Any]:
    from stepguard_airflow.facets import StepguardSignatureDatasetFacet

    datasets = []
    for inp in receipt.inputs:
        facets: dict[str, Any] = {"stepguard_manifest": _manifest_facet("input", inp)}
        if inp.signer:
            facets["stepguard_signature"] = StepguardSignatureDatasetFacet(signer=inp.signer)
        datasets.append(_dataset("input", inp.path, facets))
    if gate.get("uri"):
        # The gate's input is the published model; the signer is the one its policy accepted.
        facets = {"stepguard_signature": StepguardSignatureDatasetFacet(
            signer=gate.get("signer"), bundleDigest=gate.get("bundle_digest"),
            bundleUri=gate.get("bundle_uri"), registry=gate.get("registry"),
            modelName=gate.get("name"), modelVersion=gate.get("version"),
            policy=gate.get("policy"))}
        datasets.append(_dataset("input", str(gate["uri"]), facets))
    return datasets


def _outputs(receipt: Receipt) -> list[Any]:
    from stepguard_airflow.facets import StepguardSignatureDatasetFacet

    datasets = []
    for out in receipt.outputs:
        facets: dict[str, Any] = {"stepguard_manifest": _manifest_facet("output", out)}
        pub = out.published
        if pub is not None:
            facets["stepguard_signature"] = StepguardSignatureDatasetFacet(
                signer=pub.signer, bundleDigest=pub.bundle_digest, bundleUri=pub.bundle_uri,
                registry=pub.registry, modelName=pub.name, modelVersion=pub.version,
                provenanceUri=pub.provenance_uri)
        datasets.append(_dataset("output", pub.uri if pub is not None else out.path, facets))
    return datasets


def _verdicts(record: StepRecord) -> Any:
    from stepguard_airflow._failures import control_of_name
    from stepguard_airflow.facets import StepguardVerdictsRunFacet

    receipt = record.receipt
    err = receipt.error
    failed_integrity = err is not None and control_of_name(err.type) == "integrity"
    if failed_integrity:
        verdict = "fail"
    elif receipt.inputs and all(i.verified for i in receipt.inputs):
        verdict = "pass"
    elif receipt.inputs:
        verdict = "fail" if err is not None else "not_checked"
    else:
        verdict = "not_checked"
    integrity: dict[str, Any] = {
        "verdict": verdict,
        "inputs": [{"name": i.name, "digest": i.digest, "verified": i.verified,
                    "source": i.source} for i in receipt.inputs],
        "outputs": [{"name": o.name, "digest": o.digest} for o in receipt.outputs],
    }
    if failed_integrity and err is not None:
        integrity["subject"] = err.subject
    gate = None
    if record.gate:
        g = record.gate
        if receipt.status == "succeeded":
            gate_verdict = "accepted"
        else:
            gate_verdict = "refused" if err is not None and err.type in _REFUSALS else "error"
        gate = {"policy": g.get("policy"), "verdict": gate_verdict, "signer": g.get("signer"),
                "registry": g.get("registry"), "name": g.get("name"),
                "version": g.get("version"),
                "digest": receipt.outputs[0].digest if receipt.outputs else None}
    return StepguardVerdictsRunFacet(
        step=receipt.context.step or receipt.step, status=receipt.status,
        receiptDigest=receipt.digest, receiptUri=record.receipt_uri,
        receiptSigned=receipt.signature is not None, traceId=receipt.trace_id,
        auditHead=receipt.audit_head, auditSegment=receipt.audit_segment,
        integrity=integrity, gate=gate,
        credentials=[{"name": c.name, "kind": c.kind, "leaseHash": c.lease,
                      "revocable": c.revocable, "revoked": c.revoked}
                     for c in receipt.credentials],
        error=None if err is None else {"type": err.type, "control": control_of_name(err.type),
                                        "message": err.message, "subject": err.subject})


def operator_lineage(record: StepRecord) -> Any:
    """The provider's ``OperatorLineage`` for one recorded step run (see the module docs)."""
    from airflow.providers.openlineage.extractors import OperatorLineage

    return OperatorLineage(inputs=_inputs(record.receipt, record.gate),
                           outputs=_outputs(record.receipt),
                           run_facets={"stepguard_verdicts": _verdicts(record)})


class LineageMixin:
    """The OpenLineage provider's extraction methods for operators that run a stepguard step.

    ``execute`` leaves the step's receipt on the operator (:func:`remember`, done by
    ``execute_step``); these read it. No receipt -- the task failed before its step ran --
    means no stepguard facets (the provider still sends its own).
    """

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """Lineage of a succeeded task (called by the OpenLineage provider)."""
        record = getattr(self, RECORD_ATTR, None)
        if not isinstance(record, StepRecord):
            return None
        return operator_lineage(record)

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        """Lineage of a failed task: its failed receipt's verdicts, the error among them."""
        return self.get_openlineage_facets_on_complete(task_instance)
