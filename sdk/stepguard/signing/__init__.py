"""Model and manifest signing: OpenSSF model-signing bundles, verified against explicit policies.

Bundles are Sigstore bundle v0.3 JSON holding a DSSE envelope over an in-toto Statement v1, the
format of ``model_signing`` 1.x: a bundle made here with a key file or a Vault Transit key verifies
with ``model_signing verify key --public_key``, and bundles made by ``model_signing sign key``
verify here. Verification always takes a policy; there is no default.

>>> import tempfile, pathlib
>>> from cryptography.hazmat.primitives.asymmetric import ec
>>> from cryptography.hazmat.primitives import serialization as s
>>> from stepguard.signing import KeySigner, KeyPolicy, sign_model, verify_model
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> key = ec.generate_private_key(ec.SECP256R1())
>>> _ = (d / "k.pem").write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8,
...                                                 s.NoEncryption()))
>>> _ = (d / "k.pub").write_bytes(key.public_key().public_bytes(s.Encoding.PEM,
...                               s.PublicFormat.SubjectPublicKeyInfo))
>>> (d / "model").mkdir()
>>> _ = (d / "model" / "weights.safetensors").write_bytes(b"\\x00" * 64)
>>> signed = sign_model(d / "model", KeySigner(d / "k.pem"), bundle_path=d / "model.sig")
>>> ok = verify_model(d / "model", d / "model.sig", KeyPolicy(public_keys=(d / "k.pub",)))
>>> ok.root_digest == signed.root_digest
True
>>> _ = (d / "model" / "extra.py").write_text("import os")
>>> verify_model(d / "model", d / "model.sig", KeyPolicy(public_keys=(d / "k.pub",)))
Traceback (most recent call last):
...
stepguard.errors.IntegrityError: model does not match its signature: extra.py
"""

from __future__ import annotations

from stepguard.signing._bundle import (
    BUNDLE_MEDIA_TYPE,
    INTOTO_PAYLOAD_TYPE,
    MODEL_PREDICATE_TYPE,
    SignedModel,
    build_model_statement,
    load_bundle,
    pae,
    parse_model_statement,
)
from stepguard.signing._formats import check_formats, pickle_reason, scan_pickle
from stepguard.signing._manifests import sign_manifest, verify_manifest_signature
from stepguard.signing._model import (
    SignedArtifact,
    VerifiedModel,
    model_files,
    sign_digests,
    sign_model,
    verify_model,
)
from stepguard.signing._policy import (
    KeyPolicy,
    Policy,
    SigstorePolicy,
    TransitPolicy,
    UnsafeVerificationWarning,
    Verified,
    parse_policy,
    unsafe_skip_verification,
)
from stepguard.signing._provenance import (
    SLSA_PREDICATE_TYPE,
    build_provenance,
    sign_provenance,
    verify_provenance,
)
from stepguard.signing._signers import (
    KeySigner,
    Signer,
    SigstoreSigner,
    TransitSigner,
    signer_from_spec,
    transit_public_keys,
)

__all__ = [
    "BUNDLE_MEDIA_TYPE",
    "INTOTO_PAYLOAD_TYPE",
    "MODEL_PREDICATE_TYPE",
    "SLSA_PREDICATE_TYPE",
    "KeyPolicy",
    "KeySigner",
    "Policy",
    "SignedArtifact",
    "SignedModel",
    "Signer",
    "SigstorePolicy",
    "SigstoreSigner",
    "TransitPolicy",
    "TransitSigner",
    "UnsafeVerificationWarning",
    "Verified",
    "VerifiedModel",
    "build_model_statement",
    "build_provenance",
    "check_formats",
    "load_bundle",
    "model_files",
    "pae",
    "parse_model_statement",
    "parse_policy",
    "pickle_reason",
    "scan_pickle",
    "sign_digests",
    "sign_manifest",
    "sign_model",
    "sign_provenance",
    "signer_from_spec",
    "transit_public_keys",
    "unsafe_skip_verification",
    "verify_manifest_signature",
    "verify_model",
    "verify_provenance",
]
