"""Signed data manifests: an integrity manifest (an in-toto Statement) in a DSSE bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stepguard.errors import SignatureError
from stepguard.signing._bundle import INTOTO_PAYLOAD_TYPE, load_bundle
from stepguard.signing._policy import Policy
from stepguard.signing._signers import Signer

MANIFEST_PREDICATE_TYPE = "https://stepguard.dev/manifest/v1"


def _manifest_cls() -> Any:
    from stepguard import integrity

    return integrity.Manifest


def sign_manifest(manifest: Any, signer: Signer, *, bundle_path: str | Path | None = None) -> bytes:
    """Sign an integrity ``Manifest`` as-is (its JSON is the DSSE payload); return the bundle."""
    payload = manifest.to_json().encode()
    bundle = signer.sign_dsse(payload, INTOTO_PAYLOAD_TYPE)
    if bundle_path is not None:
        Path(bundle_path).write_bytes(bundle)
    return bundle


def verify_manifest_signature(bundle: str | Path | bytes, policy: Policy, *,
                              manifest: Any = None) -> Any:
    """Verify a signed manifest under ``policy``; return the signed ``Manifest``.

    With ``manifest`` (a Manifest, its JSON text, or a path to it), the signed manifest must be
    exactly that one (same root digest), so a training step can require "this data manifest was
    signed by the ingestion identity" before it verifies the data against it.
    """
    label = "bundle" if isinstance(bundle, bytes) else str(bundle)
    raw = bundle if isinstance(bundle, bytes) else Path(bundle).read_bytes()
    verified = policy.verify_bundle(load_bundle(raw, subject=label), subject=label)
    if verified.payload_type != INTOTO_PAYLOAD_TYPE:
        raise SignatureError("signed payload is not an in-toto statement", subject=label)
    try:
        kind = json.loads(verified.payload).get("predicateType")
    except (ValueError, AttributeError) as exc:
        raise SignatureError("signed payload is not valid JSON", subject=label) from exc
    if kind != MANIFEST_PREDICATE_TYPE:
        raise SignatureError(f"bundle does not sign a data manifest (predicateType {kind!r})",
                             subject=label)
    signed = _manifest_cls().from_json(verified.payload)
    if manifest is not None:
        expected = manifest
        if isinstance(manifest, Path) or (isinstance(manifest, str)
                                          and not manifest.lstrip().startswith("{")):
            expected = _manifest_cls().from_json(Path(manifest).read_text(encoding="utf-8"))
        elif isinstance(manifest, str | bytes):
            expected = _manifest_cls().from_json(manifest)
        if expected.digest != signed.digest:
            raise SignatureError("bundle signs a different manifest", subject=label,
                                 details=(f"signed {signed.digest}", f"given {expected.digest}"))
    return signed
