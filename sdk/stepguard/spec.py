"""The step specification: what a secured step reads, writes, needs, and how it is isolated.

A spec is plain data (frozen dataclasses), loaded strictly from YAML/JSON or built in Python. The
same spec drives the in-process runner, the bubblewrap sandbox, the Kubernetes pod, the Airflow
operators and the KFP components.

>>> from stepguard.spec import StepSpec
>>> spec = StepSpec.from_dict({
...     "name": "train",
...     "inputs": [{"name": "data", "path": "data/", "manifest": "data.manifest.json"}],
...     "outputs": [{"name": "model", "path": "out/model"}],
...     "isolation": {"mode": "sandbox", "network": "none"},
...     "deadline_s": 600,
... })
>>> spec.inputs[0].manifest
'data.manifest.json'
>>> spec.isolation.mode
'sandbox'
>>> StepSpec.from_dict({"name": "x", "isolaton": {}})
Traceback (most recent call last):
...
stepguard.errors.ConfigurationError: unknown setting: step.isolaton
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stepguard._private.schema import from_mapping, load_yaml, to_plain
from stepguard.errors import ConfigurationError

__all__ = [
    "CredentialKind",
    "CredentialRequest",
    "DEFAULT_DEADLINE_S",
    "GPU_DEADLINE_S",
    "InputSpec",
    "IsolationMode",
    "IsolationSpec",
    "OutputSpec",
    "PublishSpec",
    "RunContext",
    "SigningSpec",
    "StepSpec",
    "StorageSpec",
    "env_name",
    "load_spec_data",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

IsolationMode = Literal["process", "sandbox", "pod"]
CredentialKind = Literal["database", "aws_iam", "aws_sts", "aws_web_identity", "kv", "dynamic"]


def env_name(kind: str, name: str) -> str:
    """Environment variable carrying an input/output path to a command body.

    >>> env_name("input", "train-data.v1")
    'STEPGUARD_INPUT_TRAIN_DATA_V1'
    """
    return f"STEPGUARD_{kind.upper()}_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise ConfigurationError(
            f"invalid {kind} name {name!r} (letters, digits, '_', '.', '-'; at most 63)",
            subject=name,
        )


@dataclass(frozen=True)
class RunContext:
    """Who is running: the pipeline run and the step, as the orchestrator names them.

    Goes into child-token metadata, STS session names, span attributes and the receipt.

    >>> ctx = RunContext(pipeline="train_dag", run_id="manual__1", step="train")
    >>> ctx.labels()["stepguard.dev/step"]
    'train'
    """

    pipeline: str = "adhoc"
    run_id: str = field(default_factory=lambda: f"run-{uuid.uuid4().hex[:12]}")
    step: str = "step"
    try_number: int = 1
    orchestrator: Literal["python", "cli", "airflow", "kfp"] = "python"

    def labels(self) -> dict[str, str]:
        """Kubernetes-label-safe identifiers of this run and step."""
        def clean(v: str) -> str:
            v = re.sub(r"[^A-Za-z0-9_.-]", "-", v)[:63].strip("-_.")
            return v or "x"

        return {
            "stepguard.dev/pipeline": clean(self.pipeline),
            "stepguard.dev/run": clean(self.run_id),
            "stepguard.dev/step": clean(self.step),
            "stepguard.dev/try": str(self.try_number),
        }


@dataclass(frozen=True)
class InputSpec:
    """An input the body reads. It must be verified before the body runs.

    Exactly one reference to verify against is required: a ``manifest`` file, a producer's
    ``receipt`` (with ``receipt_output`` naming the output, default: this input's name), or a
    pinned ``digest`` (the manifest root digest, with the manifest from ``manifest``/``receipt``).
    ``signature`` + ``signature_policy`` additionally require the manifest to be signed by the
    identity that the named policy in settings accepts ("data signed by the ingestion identity").
    ``unsafe_unverified`` skips verification and is recorded as such in the receipt and audit.

    ``path`` (and ``manifest``) may be object-store locations (``s3://bucket/prefix``): the
    objects are hashed while they are downloaded into the step's scratch, and the body reads
    that verified copy. ``receipt`` may be a file, a receipt's JSON text or an ``s3://`` URI.
    ``credential`` names the step credential (an ``aws_*`` kind) the S3 client is made from
    (default: the spec's ``storage.credential``).
    """

    name: str
    path: str
    manifest: str | None = None
    receipt: str | None = None
    receipt_output: str | None = None
    digest: str | None = None
    allow_internal_symlinks: bool = False
    signature: str | None = None
    signature_policy: str | None = None
    unsafe_unverified: bool = False
    credential: str | None = None

    def __post_init__(self) -> None:
        _check_name("input", self.name)
        if bool(self.signature) != bool(self.signature_policy):
            raise ConfigurationError(
                "'signature' (a bundle over the manifest) and 'signature_policy' go together",
                subject=f"inputs.{self.name}")
        if not self.unsafe_unverified and not (self.manifest or self.receipt):
            raise ConfigurationError(
                "input has nothing to verify against (set 'manifest' or 'receipt')",
                subject=f"inputs.{self.name}",
                hint="set unsafe_unverified: true only for data you trust unconditionally",
            )


@dataclass(frozen=True)
class PublishSpec:
    """Where an output is published (and signed) after the body succeeds."""

    name: str
    version: str
    registry: str | None = None  # file:///dir or s3://bucket/prefix; default from settings
    provenance: bool = True
    allow_pickle: bool = False


@dataclass(frozen=True)
class OutputSpec:
    """A directory or file the body writes; hashed into a manifest after the body.

    ``path`` may be an object-store location (``s3://bucket/prefix/{run_id}``): the body then
    writes into the step's scratch, and stepguard uploads the files under ``<path>/data/`` with
    SHA-256 checksums and the manifest beside them, named by its root digest. ``credential``
    as for :class:`InputSpec`.
    """

    name: str
    path: str
    publish: PublishSpec | None = None
    credential: str | None = None

    def __post_init__(self) -> None:
        _check_name("output", self.name)


@dataclass(frozen=True)
class CredentialRequest:
    """A just-in-time credential the step needs, minted under the step's child token.

    ``kind`` selects the secret engine; ``role`` the engine role (database role, AWS role, OIDC
    role); ``path`` a KV path or generic dynamic path; ``delivery`` how the body receives it
    (``none``: never -- a credential stepguard itself uses, e.g. for object storage).
    """

    name: str
    kind: CredentialKind
    role: str | None = None
    path: str | None = None
    mount: str | None = None
    params: Mapping[str, str] = field(default_factory=dict)
    delivery: Literal["env", "file", "none"] = "env"
    env_prefix: str | None = None

    def __post_init__(self) -> None:
        _check_name("credential", self.name)
        if self.kind in ("kv", "dynamic") and not self.path:
            raise ConfigurationError("'path' is required for this kind",
                                     subject=f"credentials.{self.name}.path")
        if self.kind in ("database", "aws_iam", "aws_sts", "aws_web_identity") and not self.role:
            raise ConfigurationError("'role' is required for this kind",
                                     subject=f"credentials.{self.name}.role")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CredentialRequest:
        """One credential request from plain data, refusing unknown keys and wrong types.

        >>> CredentialRequest.from_dict({"name": "db", "kind": "database", "role": "etl"}).role
        'etl'
        >>> CredentialRequest.from_dict({"name": "db", "kind": "database", "rol": "etl"})
        Traceback (most recent call last):
        ...
        stepguard.errors.ConfigurationError: unknown setting: credential.rol
        """
        return from_mapping(cls, data, "credential")


@dataclass(frozen=True)
class IsolationSpec:
    """How the body is isolated. One spec for the local sandbox and the Kubernetes pod.

    ``network`` is ``"none"`` (default: loopback only, nothing of the host) or an allowlist of
    ``host:port`` entries (pods: NetworkPolicy egress; the local sandbox cannot filter by host and
    refuses an allowlist unless ``unsafe_host_network`` is set).

    ``gpus: N`` where fewer than N GPUs are visible fails the step
    (:class:`~stepguard.errors.GpuUnavailable`) unless ``gpus_optional`` says the body may run
    without them. ``shm_size`` sizes the memory-backed ``/dev/shm`` of a pod (default: none for
    CPU pods, which keep the runtime's 64 MiB; per-GPU default with GPUs, see
    docs/reference/isolation.md).
    """

    mode: IsolationMode = "sandbox"
    network: Literal["none"] | tuple[str, ...] = "none"
    unsafe_host_network: bool = False
    gpus: int = 0
    cpu: str | None = None
    memory: str | None = None
    pids_limit: int | None = 1024
    uid: int = 65534
    image: str | None = None
    allow_unpinned_image: bool = False
    runtime_class: str | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, str], ...] = ()
    namespace: str | None = None
    service_account: str | None = None
    vault_kubernetes_auth: bool = False
    read_only_paths: tuple[str, ...] = ()
    scratch_size: str = "1Gi"
    gpus_optional: bool = False
    shm_size: str | None = None

    def __post_init__(self) -> None:
        if self.gpus < 0:
            raise ConfigurationError("must be >= 0", subject="isolation.gpus")
        if self.uid == 0:
            raise ConfigurationError("the body never runs as root", subject="isolation.uid")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as in a spec file.

        >>> IsolationSpec(mode="pod", gpus=1).to_dict()["gpus"]
        1
        """
        out: dict[str, Any] = to_plain(self)
        return out


@dataclass(frozen=True)
class SigningSpec:
    """How outputs are signed when published (OpenSSF model-signing bundles).

    ``signer`` is ``key`` (``key`` = path to a PEM private key), ``transit`` (``key`` = Vault
    Transit key name) or ``sigstore`` (keyless; ``identity_token_env`` names the variable holding
    an OIDC token, ``trust_config`` a private Sigstore trust config).
    """

    signer: Literal["key", "transit", "sigstore"]
    key: str | None = None
    identity_token_env: str | None = None
    trust_config: str | None = None
    transit_mount: str = "transit"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SigningSpec:
        """A signing spec from plain data, refusing unknown keys and wrong types.

        >>> SigningSpec.from_dict({"signer": "transit", "key": "release"}).key
        'release'
        """
        return from_mapping(cls, data, "signing")


@dataclass(frozen=True)
class StorageSpec:
    """How the step reaches object storage: ``credential`` names one of the step's credentials
    (``aws_web_identity``, ``aws_sts``, ``aws_iam``) whose just-in-time keys make the S3 client;
    ``endpoint_url`` an S3-compatible endpoint (default: ``AWS_ENDPOINT_URL``).

    >>> StorageSpec(credential="lake").credential
    'lake'
    """

    credential: str | None = None
    endpoint_url: str | None = None


_AWS_KINDS = ("aws_iam", "aws_sts", "aws_web_identity")
#: A step's deadline when its spec sets none (seconds).
DEFAULT_DEADLINE_S = 3600.0
#: A GPU step's deadline when its spec sets none: twelve hours.
GPU_DEADLINE_S = 12 * 3600.0


@dataclass(frozen=True)
class StepSpec:
    """A secured step: inputs, outputs, credentials, isolation, signing and a deadline.

    >>> gpu = IsolationSpec(gpus=1)
    >>> StepSpec(name="s").deadline_s, StepSpec(name="t", isolation=gpu).deadline_s
    (3600.0, 43200.0)
    """

    name: str
    inputs: tuple[InputSpec, ...] = ()
    outputs: tuple[OutputSpec, ...] = ()
    credentials: tuple[CredentialRequest, ...] = ()
    policies: tuple[str, ...] = ()
    isolation: IsolationSpec = field(default_factory=IsolationSpec)
    signing: SigningSpec | None = None
    #: Unset (NaN): :data:`DEFAULT_DEADLINE_S`, or :data:`GPU_DEADLINE_S` when the step asks
    #: for GPUs (training runs for hours; the deadline still bounds it).
    deadline_s: float = math.nan
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None
    storage: StorageSpec | None = None

    def __post_init__(self) -> None:
        _check_name("step", self.name)
        if math.isnan(self.deadline_s):
            object.__setattr__(self, "deadline_s",
                               GPU_DEADLINE_S if self.isolation.gpus else DEFAULT_DEADLINE_S)
        self._check_storage_credentials()
        if not 0 < self.deadline_s <= 7 * 24 * 3600:
            raise ConfigurationError("must be between 0 and 7 days", subject="step.deadline_s")
        for kind, items in (("input", self.inputs), ("output", self.outputs),
                            ("credential", self.credentials)):
            names = [i.name for i in items]
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ConfigurationError(f"duplicate {kind} name", subject=sorted(dup)[0])
        for key in self.env:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ConfigurationError("invalid environment variable name",
                                         subject=f"step.env.{key}")

    def _check_storage_credentials(self) -> None:
        kinds = {c.name: c.kind for c in self.credentials}
        named = [("storage.credential", self.storage.credential if self.storage else None)]
        named += [(f"inputs.{i.name}.credential", i.credential) for i in self.inputs]
        named += [(f"outputs.{o.name}.credential", o.credential) for o in self.outputs]
        for where, cred in named:
            if cred is not None and kinds.get(cred) not in _AWS_KINDS:
                raise ConfigurationError(
                    "object storage needs one of the step's AWS credentials "
                    f"({', '.join(_AWS_KINDS)})", subject=where,
                    hint=f"declare credentials: [{{name: {cred}, kind: aws_web_identity, "
                         "role: ...}]")

    def storage_credential(self, explicit: str | None) -> str | None:
        """The credential an object-store input or output uses: its own, else the spec's.

        >>> StepSpec(name="s").storage_credential(None) is None
        True
        """
        if explicit is not None:
            return explicit
        return self.storage.credential if self.storage is not None else None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepSpec:
        """Build a spec from plain data, refusing unknown keys and wrong types."""
        return from_mapping(cls, data, "step")

    @classmethod
    def from_file(cls, path: str | Path) -> StepSpec:
        """Load a spec from a YAML or JSON file."""
        return cls.from_dict(load_spec_data(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (round-trips through :meth:`from_dict`)."""
        out: dict[str, Any] = to_plain(self)
        return out


def load_spec_data(path: str | Path) -> Any:
    """The plain data of a spec file (YAML or JSON), not yet checked; an empty file is ``{}``.

    For callers that amend a spec before building it with :meth:`StepSpec.from_dict`. An
    unreadable or invalid file is a :class:`~stepguard.errors.ConfigurationError` naming it.

    >>> import pathlib, tempfile
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "step.yaml"
    >>> _ = f.write_text("name: train")
    >>> load_spec_data(f)
    {'name': 'train'}
    """
    data = load_yaml(Path(path), "step spec")
    return data if data is not None else {}
