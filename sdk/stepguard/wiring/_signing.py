"""Settings -> signers, verification policies and registries; publishing and the gate.

``signing`` and ``registry`` know nothing of settings: this module reads the named policy,
signer and registry out of settings, hands Transit the one Vault client (the step token's when a
credential session is open), and runs the publish and fetch the step lifecycle and the adapters
need.

Every signature made here is a ``stepguard.signing.sign`` span (signer, key and version, bundle
digest, statement subjects) and every verification a ``stepguard.signing.verify`` span (policy,
accepted signer, the ``signing.verified`` verdict), in the running step's trace
(:func:`~stepguard.wiring._audit.current_audit`); the verifications also go into its receipt.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepguard.errors import ConfigurationError
from stepguard.receipt import PublishRecord, Receipt, VerificationRecord
from stepguard.settings import PolicySettings, Settings
from stepguard.spec import InputSpec, OutputSpec, StepSpec
from stepguard.wiring._audit import StepAudit, current_audit
from stepguard.wiring._vault import vault_client

if TYPE_CHECKING:
    from stepguard.credentials import CredentialSession
    from stepguard.registry import FetchedModel
    from stepguard.signing import Policy


def build_policy(policy: PolicySettings, client: Any = None) -> Policy:
    """The signing package's Policy object for a named policy in settings (``client``: an
    authenticated ``hvac.Client``, needed by Transit policies)."""
    from stepguard.signing import KeyPolicy, SigstorePolicy, TransitPolicy

    if policy.kind == "key":
        return KeyPolicy(public_keys=tuple(Path(p) for p in policy.public_keys),
                         allow_pickle=policy.allow_pickle)
    if policy.kind == "transit":
        assert policy.key is not None
        return TransitPolicy(key=policy.key, client=client,
                             versions=policy.versions, min_version=policy.min_version,
                             mount=policy.mount, allow_pickle=policy.allow_pickle)
    assert policy.identity is not None and policy.issuer is not None
    return SigstorePolicy(identity=policy.identity, issuer=policy.issuer,
                          trust_config=Path(policy.trust_config) if policy.trust_config else None,
                          allow_pickle=policy.allow_pickle)


@contextlib.contextmanager
def policy_from_settings(settings: Settings, name: str, *,
                         session: CredentialSession | None = None) -> Iterator[Policy]:
    """The verification policy called ``name`` in ``settings``, ready to verify with.

    A Transit policy reads the key's public versions from Vault, with the step token of an open
    ``session`` or else a login made for this block (revoked when the block ends): use the
    policy inside it.

    >>> import tempfile, pathlib
    >>> from cryptography.hazmat.primitives.asymmetric import ec
    >>> from cryptography.hazmat.primitives import serialization as s
    >>> from stepguard.settings import Settings
    >>> from stepguard.wiring import policy_from_settings
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    >>> _ = (d / "release.pub").write_bytes(pub.public_bytes(s.Encoding.PEM,
    ...                                     s.PublicFormat.SubjectPublicKeyInfo))
    >>> settings = Settings.from_dict({"policies": {"release": {
    ...     "kind": "key", "public_keys": [str(d / "release.pub")]}}})
    >>> with policy_from_settings(settings, "release") as policy:
    ...     print(type(policy).__name__)
    KeyPolicy
    >>> with policy_from_settings(settings, "prod"):
    ...     pass
    Traceback (most recent call last):
    ...
    stepguard.errors.ConfigurationError: no such verification policy: policies.prod
    """
    named = settings.policy(name)
    if named.kind != "transit":
        yield build_policy(named)
        return
    with vault_client(settings, session=session) as client:
        yield build_policy(named, client.hvac())


@contextlib.contextmanager
def _verify_span(kind: str, policy: str, subject: str, settings: Settings,
                 registry: str | None = None) -> Iterator[dict[str, str]]:
    """The ``signing.verify`` span of one verification; the caller puts the accepted signer in
    the yielded dict. A failure is a FAIL verdict (and an error span), then re-raised."""
    audit = current_audit()
    found: dict[str, str] = {}
    policy_kind = _policy_kind(settings, policy)
    if audit is None:
        yield found
        return
    with audit.control("signing", "verify", kind=kind, subject=subject):
        try:
            yield found
        except BaseException as exc:
            audit.verified(VerificationRecord(
                kind=kind, policy=policy, subject=subject, signer="", verified=False,  # type: ignore[arg-type]
                registry=registry, policy_kind=policy_kind))
            audit.attributes({"stepguard.signing.error": type(exc).__name__})
            raise
        audit.verified(VerificationRecord(
            kind=kind, policy=policy, subject=subject, signer=found.get("signer", ""),  # type: ignore[arg-type]
            registry=registry, policy_kind=policy_kind))


def _policy_kind(settings: Settings, name: str) -> str | None:
    try:
        return str(settings.policy(name).kind)
    except ConfigurationError:
        return None


def verify_input_signature(inp: InputSpec, manifest: Any, settings: Settings, *,
                           session: CredentialSession | None = None) -> str:
    """Require ``inp``'s manifest to be signed under its named policy; return the signer."""
    from stepguard.signing import load_bundle, verify_manifest_signature

    assert inp.signature is not None and inp.signature_policy is not None
    with _verify_span("input", inp.signature_policy, inp.name, settings) as found, \
            policy_from_settings(settings, inp.signature_policy, session=session) as policy:
        verify_manifest_signature(Path(inp.signature), policy, manifest=manifest)
        bundle = load_bundle(Path(inp.signature).read_bytes(), subject=inp.signature)
        verified = policy.verify_bundle(bundle, subject=inp.signature)
        found["signer"] = str(verified.signer)
    return str(verified.signer)


def publish_output(out: OutputSpec, path: Path, manifest: Any, *, spec: StepSpec,
                   settings: Settings, receipt: Receipt,
                   session: CredentialSession | None = None) -> PublishRecord:
    """Sign and publish one output from ``path`` (the directory the step hashed: the spec's
    path with its placeholders expanded); the signature bundle is uploaded last. Transit signs
    with the step token of an open ``session`` (no second login). An ``s3://`` registry is
    reached with the step's storage credential (``spec.storage.credential``) when it has one."""
    from stepguard.registry import open_registry
    from stepguard.signing import signer_from_spec

    pub = out.publish
    assert pub is not None
    url = pub.registry or settings.registry.url
    if not url:
        raise ConfigurationError("no registry to publish to", subject=f"outputs.{out.name}.publish",
                                 hint="set publish.registry or registry.url in settings")
    if spec.signing is None:
        raise ConfigurationError("publishing signs the output, but the step has no signer",
                                 subject="step.signing",
                                 hint="add signing: {signer: key|transit|sigstore, key: ...}")
    provenance = receipt.to_dict() if pub.provenance else None
    with contextlib.ExitStack() as stack:
        client = None
        if spec.signing.signer == "transit":
            client = stack.enter_context(vault_client(settings, session=session)).hvac()
        signer = signer_from_spec(spec.signing, vault_client=client)
        audit = current_audit()
        if audit is not None and audit.enabled:
            signer = _audited_signer(signer, audit, spec.signing.signer)
        registry = open_registry(url, s3_client=_storage_client(url, spec, session))
        rec = registry.publish(path, pub.name, pub.version, signer=signer,
                               provenance=provenance, manifest=manifest,
                               allow_pickle=pub.allow_pickle)
    return PublishRecord(registry=url, name=rec.name, version=rec.version, uri=rec.uri,
                         bundle_uri=rec.bundle_uri, bundle_digest=rec.bundle_digest,
                         signer=rec.signer, provenance_uri=rec.provenance_uri)


def _storage_client(url: str, spec: StepSpec, session: Any) -> Any:
    """The S3 client of the step's storage credential, for an ``s3://`` registry."""
    name = spec.storage.credential if spec.storage is not None else None
    if not url.startswith("s3://") or name is None or session is None:
        return None
    from stepguard.wiring._storage import s3_client

    assert spec.storage is not None
    return s3_client(session.values[name], endpoint_url=spec.storage.endpoint_url)


def fetch_verified(settings: Settings, name: str, version: str, *, policy: str,
                   dest: str | Path, registry: str | None = None,
                   s3_client: Any = None) -> Path:
    """Fetch ``name``/``version`` into ``dest``, verified under the settings policy ``policy``
    (the deployment gate). ``registry`` defaults to ``settings.registry.url``; ``s3_client``
    (see :func:`stepguard.wiring.s3_client`) reaches an ``s3://`` registry with a just-in-time
    credential. Nothing appears at ``dest`` unless every check passed."""
    return fetch_verified_model(settings, name, version, policy=policy, dest=dest,
                                registry=registry, s3_client=s3_client).path


def fetch_verified_model(settings: Settings, name: str, version: str, *, policy: str,
                         dest: str | Path, registry: str | None = None,
                         s3_client: Any = None) -> FetchedModel:
    """:func:`fetch_verified`, returning also who signed the version (as verified)."""
    from stepguard.registry import open_registry

    url = registry or settings.registry.url
    if not url:
        raise ConfigurationError("no registry given and none in settings",
                                 subject="registry.url")
    with _verify_span("gate", policy, f"{name}:{version}", settings, registry=url) as found, \
            policy_from_settings(settings, policy) as verified_by:
        fetched = open_registry(url, s3_client=s3_client).fetch_model(
            name, version, policy=verified_by, dest=dest)
        found["signer"] = fetched.signer
        return fetched


_signer_class: Any = None
_KEYID = re.compile(rb'"keyid"\s*:\s*"([A-Za-z0-9:/._+-]*)"')
_HINT = re.compile(rb'"hint"\s*:\s*"([A-Za-z0-9+/=_-]*)"')


def _audited_signer(inner: Any, audit: StepAudit, method: str) -> Any:
    """``inner`` with every signature it makes in a ``stepguard.signing.sign`` span."""
    global _signer_class  # noqa: PLW0603 - built once, lazily (signing loads only when used)
    if _signer_class is None:
        from stepguard.signing import INTOTO_PAYLOAD_TYPE, Signer

        class AuditedSigner(Signer):
            def __init__(self, inner: Any, audit: StepAudit, method: str) -> None:
                self.inner, self.audit, self.method = inner, audit, method

            @property
            def identity(self) -> str:
                return str(self.inner.identity)

            def sign_dsse(self, payload: bytes, payload_type: str = INTOTO_PAYLOAD_TYPE) -> bytes:
                with self.audit.control("signing", "sign", method=self.method):
                    bundle = bytes(self.inner.sign_dsse(payload, payload_type))
                    self.audit.attributes(signature_attributes(bundle, payload, self.inner))
                return bundle

        _signer_class = AuditedSigner
    return _signer_class(inner, audit, method)


def signature_attributes(bundle: bytes, payload: bytes, signer: Any) -> dict[str, Any]:
    """What a ``signing.sign`` span records of one signature: the signer identity, the key and
    its version (Transit), the bundle's digest, the statement type and subjects
    (``name@sha256:<hex>``; the first one's digest also as ``artifact.hash``).

    >>> import json
    >>> stmt = json.dumps({"_type": "https://in-toto.io/Statement/v1", "predicateType": "p",
    ...     "subject": [{"name": "churn", "digest": {"sha256": "ab" * 32}}]}).encode()
    >>> b = json.dumps({"verificationMaterial": {"publicKey": {"hint": "cd" * 16}},
    ...     "dsseEnvelope": {"signatures": [{"keyid": "transit:transit/release:v3"}]}}).encode()
    >>> a = signature_attributes(b, stmt, None)
    >>> a["stepguard.signing.signer"], a["stepguard.signing.key.version"]
    ('transit:transit/release:v3:sha256:cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd', 3)
    >>> a["stepguard.signing.subjects"]
    ['churn@sha256:abababababababababababababababababababababababababababababababab']
    """
    import hashlib
    import json

    from stepguard.audit import Attr, artifact_attributes

    out: dict[str, Any] = {}
    # The bundle was made a moment ago by our own signer: its key id and public-key hint are
    # read without parsing the whole document (the payload inside it is parsed below).
    found = _KEYID.search(bundle)
    keyid = found.group(1).decode() if found else ""
    found = _HINT.search(bundle)
    hint = found.group(1).decode() if found else ""
    if keyid.startswith("transit:") and hint:
        key, _, version = keyid.removeprefix("transit:").rpartition(":v")
        out[Attr.SIGNER] = f"{keyid}:sha256:{hint}"
        out[Attr.SIGNING_KEY] = f"transit:{key}"
        if version.isdigit():
            out[Attr.SIGNING_KEY_VERSION] = int(version)
    elif hint:
        out[Attr.SIGNER] = f"key:sha256:{hint}"
        out[Attr.SIGNING_KEY] = f"sha256:{hint}"
    elif signer is not None:
        out[Attr.SIGNER] = str(signer.identity)
    subjects: list[str] = []
    try:
        statement = json.loads(payload)
        out[Attr.SIGNING_STATEMENT] = str(statement.get("predicateType") or "")
        for sub in statement.get("subject") or []:
            digest = (sub.get("digest") or {}).get("sha256")
            if digest:
                subjects.append(f"{sub.get('name', '')}@sha256:{digest}")
    except (ValueError, AttributeError, TypeError):
        pass
    if subjects:
        out[Attr.SIGNING_SUBJECTS] = subjects
    out.update(artifact_attributes(
        hash=subjects[0].rpartition("@")[2] if subjects else None,
        attestation_hash="sha256:" + hashlib.sha256(bundle).hexdigest()))
    return out
