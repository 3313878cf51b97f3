"""SLSA v1 provenance for a step's outputs, as a signed in-toto Statement v1."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stepguard.errors import ConfigurationError, SignatureError
from stepguard.signing._bundle import INTOTO_PAYLOAD_TYPE, STATEMENT_TYPE, load_bundle
from stepguard.signing._policy import Policy
from stepguard.signing._signers import Signer

SLSA_PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://stepguard.dev/step/v1"
BUILDER_ID = "https://stepguard.dev/builder/v1"


def _digest_map(value: str) -> dict[str, str]:
    alg, sep, hexd = value.partition(":")
    if not sep:
        alg, hexd = "sha256", value
    return {alg: hexd}


def _plain(receipt: Any) -> Mapping[str, Any]:
    if hasattr(receipt, "to_dict"):
        out: Mapping[str, Any] = receipt.to_dict()
        return out
    if not isinstance(receipt, Mapping):
        raise ConfigurationError("provenance needs a receipt (dict or Receipt)")
    return receipt


def _image_digest(receipt: Mapping[str, Any]) -> str | None:
    if receipt.get("image_digest"):
        return str(receipt["image_digest"])
    iso = receipt.get("isolation") or {}
    if iso.get("image_digest"):
        return str(iso["image_digest"])
    image = str(iso.get("image") or "")
    return image.split("@", 1)[1] if "@sha256:" in image else None


def build_provenance(receipt: Any, subjects: Mapping[str, str]) -> bytes:
    """An in-toto Statement v1 with an SLSA v1 provenance predicate.

    ``subjects``: name -> digest (``sha256:<hex>`` or hex) of each output (e.g. the model root
    digest). ``receipt`` keys used: ``step``, ``context`` (``pipeline``, ``run_id``, ``step``,
    ``try_number``), ``inputs`` (list of ``{name, digest|root_digest}``), ``code_revision``,
    ``code_uri``, ``image_digest`` (else ``isolation.image_digest`` or a pinned
    ``isolation.image``), ``started_at``, ``finished_at``. A ``Receipt`` object is accepted too
    (its ``to_dict()`` is used).

    >>> st = json.loads(build_provenance(
    ...     {"step": "train", "context": {"run_id": "r1", "step": "train"},
    ...      "inputs": [{"name": "data", "digest": "sha256:" + "a" * 64}],
    ...      "code_revision": "0123abc", "image_digest": "sha256:" + "b" * 64},
    ...     {"model": "sha256:" + "c" * 64}))
    >>> st["predicateType"], st["subject"][0]["digest"]["sha256"][:4]
    ('https://slsa.dev/provenance/v1', 'cccc')
    >>> [d["name"] for d in st["predicate"]["buildDefinition"]["resolvedDependencies"]]
    ['data', 'code', 'image']
    """
    if not subjects:
        raise ConfigurationError("provenance needs at least one subject")
    receipt = _plain(receipt)
    ctx = receipt.get("context") or {}
    deps: list[dict[str, Any]] = []
    for item in receipt.get("inputs") or ():
        digest = item.get("digest") or item.get("root_digest")
        if not digest:
            raise ConfigurationError("receipt input has no digest", subject=str(item.get("name")))
        deps.append({"name": str(item.get("name")), "digest": _digest_map(str(digest)),
                     "annotations": {"kind": "input-manifest"}})
    if receipt.get("code_revision"):
        dep: dict[str, Any] = {"name": "code", "digest": {"gitCommit": receipt["code_revision"]}}
        if receipt.get("code_uri"):
            dep["uri"] = receipt["code_uri"]
        deps.append(dep)
    image = _image_digest(receipt)
    if image:
        deps.append({"name": "image", "digest": _digest_map(image)})
    metadata: dict[str, Any] = {
        "invocationId": f"{ctx.get('run_id', '')}/{ctx.get('step', receipt.get('step', ''))}"
                        f"/{ctx.get('try_number', 1)}",
    }
    if receipt.get("started_at"):
        metadata["startedOn"] = receipt["started_at"]
    if receipt.get("finished_at"):
        metadata["finishedOn"] = receipt["finished_at"]
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": n, "digest": _digest_map(d)} for n, d in sorted(subjects.items())],
        "predicateType": SLSA_PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "pipeline": ctx.get("pipeline"),
                    "step": ctx.get("step", receipt.get("step")),
                },
                "internalParameters": {"run_id": ctx.get("run_id"),
                                       "orchestrator": ctx.get("orchestrator")},
                "resolvedDependencies": deps,
            },
            "runDetails": {"builder": {"id": BUILDER_ID}, "metadata": metadata},
        },
    }
    return json.dumps(statement, indent=2, sort_keys=True).encode()


def sign_provenance(receipt: Any, subjects: Mapping[str, str], signer: Signer,
                    *, bundle_path: str | Path | None = None) -> bytes:
    """Build and sign the provenance statement (DSSE bundle, same signer as the model)."""
    bundle = signer.sign_dsse(build_provenance(receipt, subjects), INTOTO_PAYLOAD_TYPE)
    if bundle_path is not None:
        Path(bundle_path).write_bytes(bundle)
    return bundle


def verify_provenance(bundle: str | Path | bytes, policy: Policy, *,
                      subject_digest: str | None = None) -> dict[str, Any]:
    """Verify a provenance bundle; optionally require ``subject_digest`` among its subjects."""
    label = "bundle" if isinstance(bundle, bytes) else str(bundle)
    raw = bundle if isinstance(bundle, bytes) else Path(bundle).read_bytes()
    verified = policy.verify_bundle(load_bundle(raw, subject=label), subject=label)
    try:
        doc = json.loads(verified.payload)
    except ValueError as exc:
        raise SignatureError("provenance payload is not JSON", subject=label) from exc
    if not isinstance(doc, dict) or doc.get("predicateType") != SLSA_PREDICATE_TYPE:
        raise SignatureError("bundle is not SLSA v1 provenance", subject=label)
    if subject_digest is not None:
        want = _digest_map(subject_digest)
        if not any(s.get("digest") == want for s in doc.get("subject", [])):
            raise SignatureError("provenance does not name this artifact", subject=label,
                                 details=(f"expected subject {subject_digest}",))
    return doc
