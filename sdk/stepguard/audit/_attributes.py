"""Attribute names and helpers: ``stepguard.*`` plus OpenTelemetry's ``cicd.*``, ``artifact.*``
and ``k8s.*`` semantic conventions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias

from stepguard.audit._redact import hash_identifier

AttributeValue: TypeAlias = (str | bool | int | float | Sequence[str] | Sequence[bool]
                             | Sequence[int] | Sequence[float])
Attributes: TypeAlias = Mapping[str, AttributeValue]

STEP_SPAN = "stepguard.step"
TASK_SPAN = "stepguard.task"
VERDICT_EVENT = "stepguard.verdict"


class Attr:
    """Attribute keys used by stepguard spans (constants, so typos fail at import time)."""

    # stepguard.*
    SECURED = "stepguard.secured"
    STEP_NAME = "stepguard.step.name"
    STEP_ID = "stepguard.step.id"
    CONTROL = "stepguard.control"
    OPERATION = "stepguard.operation"
    VERDICT_NAME = "stepguard.verdict.name"
    VERDICT_PASSED = "stepguard.verdict.passed"
    LEASE_HASHES = "stepguard.credentials.lease_ids"
    TOKEN_ACCESSOR_HASH = "stepguard.credentials.token_accessor"  # noqa: S105 - a key name
    CREDENTIAL_KIND = "stepguard.credentials.kind"
    # One entry per credential, in the same order as LEASE_HASHES ("" for a lease-less one).
    CREDENTIAL_NAMES = "stepguard.credentials.names"
    CREDENTIAL_KINDS = "stepguard.credentials.kinds"
    CREDENTIAL_TTLS = "stepguard.credentials.ttl_s"
    CREDENTIAL_REVOCABLE = "stepguard.credentials.revocable"
    MANIFEST_DIGEST = "stepguard.integrity.manifest.digest"
    INPUT_DIGESTS = "stepguard.integrity.input.digests"
    OUTPUT_DIGEST = "stepguard.integrity.output.digest"
    OUTPUT_DIGESTS = "stepguard.integrity.output.digests"
    SIGNER = "stepguard.signing.signer"
    SIGNING_METHOD = "stepguard.signing.method"
    SIGNING_KEY = "stepguard.signing.key"
    SIGNING_KEY_VERSION = "stepguard.signing.key.version"
    SIGNING_SUBJECTS = "stepguard.signing.subjects"
    SIGNING_STATEMENT = "stepguard.signing.statement"
    POLICY = "stepguard.signing.policy"
    POLICY_KIND = "stepguard.signing.policy.kind"
    STEP_SPEC = "stepguard.step"  # the spec's name; STEP_NAME is the instance (train.3)
    MAP_INDEX = "stepguard.map_index"
    ISOLATION_MODE = "stepguard.isolation.mode"
    REGISTRY_URI = "stepguard.registry.uri"
    TERMINATED = "stepguard.terminated"
    # OpenTelemetry semantic conventions
    ERROR_TYPE = "error.type"
    PIPELINE_NAME = "cicd.pipeline.name"
    PIPELINE_RUN_ID = "cicd.pipeline.run.id"
    TASK_NAME = "cicd.pipeline.task.name"
    TASK_RUN_ID = "cicd.pipeline.task.run.id"
    ARTIFACT_HASH = "artifact.hash"
    ARTIFACT_FILENAME = "artifact.filename"
    ARTIFACT_VERSION = "artifact.version"
    ARTIFACT_PURL = "artifact.purl"
    ATTESTATION_HASH = "artifact.attestation.hash"
    ATTESTATION_ID = "artifact.attestation.id"
    ATTESTATION_FILENAME = "artifact.attestation.filename"
    K8S_NAMESPACE = "k8s.namespace.name"
    K8S_POD_NAME = "k8s.pod.name"
    K8S_POD_UID = "k8s.pod.uid"
    K8S_CONTAINER_NAME = "k8s.container.name"
    K8S_NODE_NAME = "k8s.node.name"
    K8S_JOB_NAME = "k8s.job.name"


def _pick(pairs: Iterable[tuple[str, AttributeValue | None]]) -> dict[str, AttributeValue]:
    return {k: v for k, v in pairs if v is not None}


def pipeline_attributes(
    pipeline: str | None = None,
    run_id: str | None = None,
    task: str | None = None,
    task_run_id: str | None = None,
) -> dict[str, AttributeValue]:
    """OTel ``cicd.pipeline.*`` attributes (Airflow: dag_id, run_id, task_id, try/map index).

    >>> attrs = pipeline_attributes("train", "manual__2026", "fit")
    >>> attrs["cicd.pipeline.name"], attrs["cicd.pipeline.run.id"], attrs["cicd.pipeline.task.name"]
    ('train', 'manual__2026', 'fit')
    """
    return _pick([(Attr.PIPELINE_NAME, pipeline), (Attr.PIPELINE_RUN_ID, run_id),
                  (Attr.TASK_NAME, task), (Attr.TASK_RUN_ID, task_run_id)])


def artifact_attributes(  # noqa: PLR0917 - keyword use expected; order mirrors the convention
    hash: str | None = None,
    filename: str | None = None,
    version: str | None = None,
    purl: str | None = None,
    attestation_hash: str | None = None,
    attestation_id: str | None = None,
    attestation_filename: str | None = None,
) -> dict[str, AttributeValue]:
    """OTel ``artifact.*`` attributes (model/data digest, signature bundle as attestation).

    >>> artifact_attributes(hash="sha256:ab", attestation_filename="model.sig")
    {'artifact.hash': 'sha256:ab', 'artifact.attestation.filename': 'model.sig'}
    """
    return _pick([(Attr.ARTIFACT_HASH, hash), (Attr.ARTIFACT_FILENAME, filename),
                  (Attr.ARTIFACT_VERSION, version), (Attr.ARTIFACT_PURL, purl),
                  (Attr.ATTESTATION_HASH, attestation_hash), (Attr.ATTESTATION_ID, attestation_id),
                  (Attr.ATTESTATION_FILENAME, attestation_filename)])


def k8s_attributes(  # noqa: PLR0917
    namespace: str | None = None,
    pod_name: str | None = None,
    pod_uid: str | None = None,
    container_name: str | None = None,
    node_name: str | None = None,
    job_name: str | None = None,
) -> dict[str, AttributeValue]:
    """OTel ``k8s.*`` attributes for a step that ran in a pod.

    >>> k8s_attributes(namespace="ml", pod_name="fit-x1")
    {'k8s.namespace.name': 'ml', 'k8s.pod.name': 'fit-x1'}
    """
    return _pick([(Attr.K8S_NAMESPACE, namespace), (Attr.K8S_POD_NAME, pod_name),
                  (Attr.K8S_POD_UID, pod_uid), (Attr.K8S_CONTAINER_NAME, container_name),
                  (Attr.K8S_NODE_NAME, node_name), (Attr.K8S_JOB_NAME, job_name)])


def credential_attributes(
    lease_ids: Iterable[str] = (),
    token_accessor: str | None = None,
    kind: str | None = None,
    *,
    key: bytes | None = None,
    leases: Iterable[Any] = (),
) -> dict[str, AttributeValue]:
    """Credential attributes with every lease id and the token accessor hashed, never raw.

    >>> attrs = credential_attributes(["database/creds/r/abc123"], token_accessor="acc-123456")
    >>> sorted(attrs)
    ['stepguard.credentials.lease_ids', 'stepguard.credentials.token_accessor']
    >>> "abc123" in str(attrs)
    False

    ``leases``: :class:`~stepguard.receipt.LeaseRecord` values (their ``lease`` is already a
    hash, kept as it is so spans and receipts name a lease alike); one entry per credential in
    each of ``.names``, ``.kinds``, ``.lease_ids`` (``""`` without a lease), ``.ttl_s``,
    ``.revocable``:

    >>> from stepguard.receipt import LeaseRecord
    >>> attrs = credential_attributes(leases=[LeaseRecord(
    ...     name="db", kind="database", lease="sha256:ab", revocable=True, ttl_s=900)])
    >>> attrs["stepguard.credentials.lease_ids"], attrs["stepguard.credentials.ttl_s"]
    (['sha256:ab'], [900])
    """
    out: dict[str, AttributeValue] = {}
    records = list(leases)
    if records:
        out[Attr.CREDENTIAL_NAMES] = [str(r.name) for r in records]
        out[Attr.CREDENTIAL_KINDS] = [str(r.kind) for r in records]
        out[Attr.CREDENTIAL_TTLS] = [int(r.ttl_s or 0) for r in records]
        out[Attr.CREDENTIAL_REVOCABLE] = [bool(r.revocable) for r in records]
    hashes = [str(r.lease or "") for r in records]
    hashes += [hash_identifier(lease, key=key) for lease in lease_ids]
    if hashes:
        out[Attr.LEASE_HASHES] = hashes
    if token_accessor:
        out[Attr.TOKEN_ACCESSOR_HASH] = hash_identifier(token_accessor, key=key)
    if kind:
        out[Attr.CREDENTIAL_KIND] = kind
    return out


def stepguard_attributes(**values: AttributeValue | None) -> dict[str, AttributeValue]:
    """``stepguard.``-prefixed attributes from keyword arguments (``None`` values dropped;
    a double underscore becomes a dot).

    >>> stepguard_attributes(step__id="fit-1", secured=True, skipped=None)
    {'stepguard.step.id': 'fit-1', 'stepguard.secured': True}
    """
    return {"stepguard." + k.replace("__", "."): v for k, v in values.items() if v is not None}
