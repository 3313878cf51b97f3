"""DSSE envelopes inside Sigstore bundles v0.3, and the model-signing in-toto statement.

The byte layout follows what ``model_signing`` 1.1 writes and reads, so bundles made here verify
with the stock ``model_signing verify key`` and the other way round. Parsing is strict: anything
the stock format allows that could widen what a signature covers is refused here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from stepguard.errors import SignatureError

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
#: Older media types sigstore-python still emits for keyless bundles.
SIGSTORE_MEDIA_TYPES = (
    BUNDLE_MEDIA_TYPE,
    "application/vnd.dev.sigstore.bundle+json;version=0.3",
)
INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
MODEL_PREDICATE_TYPE = "https://model_signing/signature/v1.0"
#: Top-level git paths ``model_signing`` leaves out of a signature by default
#: (``ignore_git_paths``) and records in ``ignore_paths``; we do the same when signing, and
#: ignore them when verifying unless the signature covers them.
GIT_IGNORE_PATHS = frozenset({".git", ".gitignore", ".github", ".gitattributes"})
MAX_BUNDLE_BYTES = 64 * 1024 * 1024

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what a DSSE signature actually covers."""
    head = f"DSSEv1 {len(payload_type.encode())} {payload_type} {len(payload)} "
    return head.encode() + payload


def public_key_hint(public_pem_spki: bytes) -> str:
    """The ``verificationMaterial.publicKey.hint`` model_signing writes: SHA-256 of the PEM."""
    return hashlib.sha256(public_pem_spki).hexdigest()


def build_key_bundle(payload: bytes, signature: bytes, *, hint: str, keyid: str = "",
                     payload_type: str = INTOTO_PAYLOAD_TYPE) -> dict[str, Any]:
    """A Sigstore bundle v0.3 holding one DSSE signature made with a plain public key."""
    return {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": hint}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": payload_type,
            "signatures": [{"sig": base64.b64encode(signature).decode(), "keyid": keyid}],
        },
    }


def dump_bundle(bundle: Mapping[str, Any]) -> bytes:
    """Serialize a bundle as JSON text (what gets written next to a model)."""
    return (json.dumps(bundle, indent=2) + "\n").encode()


@dataclass(frozen=True)
class Envelope:
    """The DSSE envelope of a bundle, decoded but NOT yet verified."""

    payload_type: str
    payload: bytes
    signature: bytes
    keyid: str
    hint: str | None
    media_type: str
    has_certificate: bool


def load_bundle(data: bytes | str, *, subject: str = "bundle") -> dict[str, Any]:
    """Parse bundle JSON (bounded size) into a dict, or raise SignatureError."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > MAX_BUNDLE_BYTES:
        raise SignatureError("signature bundle is too large", subject=subject)
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SignatureError("signature bundle is not valid JSON", subject=subject) from exc
    if not isinstance(doc, dict):
        raise SignatureError("signature bundle is not a JSON object", subject=subject)
    return doc


def _b64(value: object, what: str, subject: str) -> bytes:
    if not isinstance(value, str):
        raise SignatureError(f"bundle {what} is missing or not a string", subject=subject)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"bundle {what} is not valid base64", subject=subject) from exc


def parse_envelope(bundle: Mapping[str, Any], *, subject: str = "bundle") -> Envelope:
    """Extract the single DSSE signature of a bundle; refuse every other shape."""
    media = bundle.get("mediaType")
    if media not in SIGSTORE_MEDIA_TYPES:
        raise SignatureError(f"unsupported bundle media type {media!r}", subject=subject)
    env = bundle.get("dsseEnvelope")
    if not isinstance(env, dict):
        raise SignatureError("bundle holds no DSSE envelope (message signatures are refused)",
                             subject=subject)
    sigs = env.get("signatures")
    if not isinstance(sigs, list) or len(sigs) != 1 or not isinstance(sigs[0], dict):
        raise SignatureError("DSSE envelope must carry exactly one signature", subject=subject)
    payload_type = env.get("payloadType")
    if not isinstance(payload_type, str):
        raise SignatureError("DSSE envelope has no payload type", subject=subject)
    material = bundle.get("verificationMaterial")
    if not isinstance(material, dict):
        raise SignatureError("bundle has no verification material", subject=subject)
    pk = material.get("publicKey")
    hint = pk.get("hint") if isinstance(pk, dict) else None
    has_cert = "certificate" in material or "x509CertificateChain" in material
    keyid = sigs[0].get("keyid") or ""
    return Envelope(
        payload_type=payload_type,
        payload=_b64(env.get("payload"), "payload", subject),
        signature=_b64(sigs[0].get("sig"), "signature", subject),
        keyid=keyid if isinstance(keyid, str) else "",
        hint=hint if isinstance(hint, str) and hint else None,
        media_type=str(media),
        has_certificate=has_cert,
    )


# -- the model statement ----------------------------------------------------------------------


def _posix_sort_key(name: str) -> tuple[str, ...]:
    # model_signing sorts PurePosixPath keys, which compare by path components.
    return PurePosixPath(name).parts


def root_digest(resources: Sequence[tuple[str, str]]) -> str:
    """SHA-256 over the raw per-file digests, in the listed order (model_signing's subject)."""
    h = hashlib.sha256()
    for _, hexdigest in resources:
        h.update(bytes.fromhex(hexdigest))
    return h.hexdigest()


def build_model_statement(model_name: str, digests: Mapping[str, str], *,
                          binding: Mapping[str, Any] | None = None) -> bytes:
    """The in-toto Statement model_signing signs: files, sha256, no symlinks.

    ``binding`` goes into ``predicate.stepguard``; v1.0 verifiers ignore unknown predicate
    fields, so stock verification still works, while ours checks the binding (registry name and
    version, integrity manifest digest) so a valid bundle cannot be replayed under another name.
    """
    ordered = sorted(digests.items(), key=lambda kv: _posix_sort_key(kv[0]))
    predicate: dict[str, Any] = {
        "serialization": {
            "method": "files",
            "hash_type": "sha256",
            "allow_symlinks": False,
            "ignore_paths": sorted(GIT_IGNORE_PATHS),
        },
        "resources": [
            {"name": name, "algorithm": "sha256", "digest": hexd} for name, hexd in ordered
        ],
    }
    if binding:
        predicate["stepguard"] = dict(binding)
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model_name, "digest": {"sha256": root_digest(ordered)}}],
        "predicateType": MODEL_PREDICATE_TYPE,
        "predicate": predicate,
    }
    return json.dumps(statement, indent=2).encode()


@dataclass(frozen=True)
class SignedModel:
    """What a verified model statement says: name, root digest, per-file digests, binding."""

    name: str
    root_digest: str
    files: Mapping[str, str]
    binding: Mapping[str, Any]
    ignore_paths: frozenset[str]


def _path_problem(name: str) -> str | None:
    if not name or "\x00" in name or "\\" in name or name.startswith("/"):
        return "absolute, empty or contains NUL/backslash"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "contains a control character"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "contains '', '.' or '..' components (escapes the model directory)"
    if len(name) >= 2 and name[1] == ":":
        return "looks like a drive letter"
    return None


def parse_model_statement(payload_type: str, payload: bytes, *,
                          subject: str = "bundle",
                          extra_ignored: frozenset[str] = frozenset()) -> SignedModel:
    """Strictly parse a VERIFIED model statement; check serialization against the allow-list."""
    if payload_type != INTOTO_PAYLOAD_TYPE:
        raise SignatureError(f"unexpected DSSE payload type {payload_type!r}", subject=subject)
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SignatureError("signed payload is not valid JSON", subject=subject) from exc
    if not isinstance(doc, dict) or doc.get("_type") != STATEMENT_TYPE:
        raise SignatureError("signed payload is not an in-toto Statement v1", subject=subject)
    if doc.get("predicateType") != MODEL_PREDICATE_TYPE:
        raise SignatureError(
            f"signed payload is not a model signature (predicateType "
            f"{doc.get('predicateType')!r})", subject=subject)
    subjects = doc.get("subject")
    if not isinstance(subjects, list) or len(subjects) != 1 or not isinstance(subjects[0], dict):
        raise SignatureError("model statement must have exactly one subject", subject=subject)
    name = subjects[0].get("name")
    digest = subjects[0].get("digest")
    if not isinstance(name, str) or not isinstance(digest, dict) or \
            not isinstance(digest.get("sha256"), str):
        raise SignatureError("model statement subject lacks a name or sha256 digest",
                             subject=subject)
    pred = doc.get("predicate")
    if not isinstance(pred, dict):
        raise SignatureError("model statement has no predicate", subject=subject)
    ser = pred.get("serialization")
    findings: list[str] = []
    if not isinstance(ser, dict):
        raise SignatureError("model statement has no serialization settings", subject=subject)
    unknown = set(ser) - {"method", "hash_type", "allow_symlinks", "ignore_paths"}
    if unknown:
        findings.append(f"unknown serialization settings: {', '.join(sorted(unknown))}")
    if ser.get("method") != "files":
        findings.append(f"serialization method {ser.get('method')!r} is not allowed "
                        "(allowed: 'files')")
    if ser.get("hash_type") != "sha256":
        findings.append(f"hash type {ser.get('hash_type')!r} is not allowed (allowed: 'sha256')")
    if ser.get("allow_symlinks") is not False:
        findings.append("signature was made with allow_symlinks enabled (refused)")
    ignore = ser.get("ignore_paths", [])
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        findings.append("ignore_paths is not a list of strings")
        ignore = []
    bad_ignore = sorted(set(ignore) - GIT_IGNORE_PATHS - extra_ignored)
    if bad_ignore:
        findings.append("signature leaves files unsigned via ignore_paths: "
                        + ", ".join(bad_ignore))
    if findings:
        raise SignatureError("signed serialization settings are not on the allow-list",
                             subject=subject, details=findings)
    resources = pred.get("resources")
    if not isinstance(resources, list):
        raise SignatureError("model statement has no resources", subject=subject)
    files: dict[str, str] = {}
    folded: dict[str, str] = {}
    ordered: list[tuple[str, str]] = []
    for res in resources:
        if not isinstance(res, dict):
            findings.append("resource entry is not an object")
            continue
        rname, alg, hexd = res.get("name"), res.get("algorithm"), res.get("digest")
        if not isinstance(rname, str):
            findings.append("resource without a name")
            continue
        # model_signing names the only resource of a single-file model "."
        problem = None if (rname == "." and len(resources) == 1) else _path_problem(rname)
        if problem:
            findings.append(f"unsafe entry {rname!r}: {problem}")
            continue
        if alg != "sha256" or not isinstance(hexd, str) or not _HEX64.match(hexd):
            findings.append(f"entry {rname!r}: digest is not a sha256 hex digest")
            continue
        if rname in files:
            findings.append(f"duplicate entry {rname!r}")
            continue
        key = rname.casefold()
        if key in folded:
            findings.append(f"entries {folded[key]!r} and {rname!r} collide on a case-folding FS")
        folded[key] = rname
        files[rname] = hexd
        ordered.append((rname, hexd))
    if findings:
        raise SignatureError("signed manifest has unsafe entries", subject=subject,
                             details=findings)
    if root_digest(ordered) != digest["sha256"]:
        raise SignatureError("signed manifest is inconsistent: root digest does not match "
                             "its resources", subject=subject)
    binding = pred.get("stepguard")
    return SignedModel(
        name=name,
        root_digest="sha256:" + digest["sha256"],
        files=files,
        binding=dict(binding) if isinstance(binding, dict) else {},
        ignore_paths=frozenset(ignore),
    )
