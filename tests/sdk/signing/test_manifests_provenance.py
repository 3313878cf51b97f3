"""Signed data manifests and signed SLSA provenance, with the same signers and policies."""

from __future__ import annotations

import json

import pytest

from stepguard.errors import SignatureError
from stepguard.integrity import create_manifest
from stepguard.signing import (
    KeyPolicy,
    KeySigner,
    sign_manifest,
    sign_model,
    sign_provenance,
    verify_manifest_signature,
    verify_provenance,
)


@pytest.fixture
def dataset(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.csv").write_text("x,y\n1,2\n")
    (d / "test.csv").write_text("x,y\n3,4\n")
    return d


def test_signed_manifest_round_trip(dataset, keys, tmp_path):
    manifest = create_manifest(dataset)
    bundle = sign_manifest(manifest, KeySigner(keys.private), bundle_path=tmp_path / "d.sig")
    got = verify_manifest_signature(bundle, KeyPolicy(public_keys=(keys.public,)),
                                    manifest=manifest)
    assert got.digest == manifest.digest
    (tmp_path / "m.json").write_text(manifest.to_json())
    verify_manifest_signature(tmp_path / "d.sig", KeyPolicy(public_keys=(keys.public,)),
                              manifest=tmp_path / "m.json")


def test_data_signed_by_another_identity_refused(dataset, keys, other_keys):
    manifest = create_manifest(dataset)
    bundle = sign_manifest(manifest, KeySigner(other_keys.private))
    with pytest.raises(SignatureError, match="does not accept"):
        verify_manifest_signature(bundle, KeyPolicy(public_keys=(keys.public,)),
                                  manifest=manifest)


def test_signature_for_another_manifest_refused(dataset, keys):
    old = create_manifest(dataset)
    bundle = sign_manifest(old, KeySigner(keys.private))
    (dataset / "poison.csv").write_text("x,y\n9,9\n")
    new = create_manifest(dataset)
    with pytest.raises(SignatureError, match="different manifest"):
        verify_manifest_signature(bundle, KeyPolicy(public_keys=(keys.public,)), manifest=new)


def test_model_bundle_is_not_a_manifest_signature(model, keys, tmp_path):
    signed = sign_model(model, KeySigner(keys.private))
    with pytest.raises(SignatureError, match="data manifest"):
        verify_manifest_signature(signed.bundle, KeyPolicy(public_keys=(keys.public,)))


RECEIPT = {
    "step": "train",
    "context": {"pipeline": "p", "run_id": "run-1", "step": "train", "try_number": 1},
    "inputs": [{"name": "data", "digest": "sha256:" + "a" * 64}],
    "code_revision": "0" * 40,
    "image_digest": "sha256:" + "b" * 64,
}


def test_provenance_signed_and_bound_to_model(model, keys, other_keys):
    signed = sign_model(model, KeySigner(keys.private))
    bundle = sign_provenance(RECEIPT, {"model": signed.root_digest}, KeySigner(keys.private))
    doc = verify_provenance(bundle, KeyPolicy(public_keys=(keys.public,)),
                            subject_digest=signed.root_digest)
    deps = doc["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert {"name": "data", "digest": {"sha256": "a" * 64},
            "annotations": {"kind": "input-manifest"}} in deps
    assert doc["predicate"]["runDetails"]["metadata"]["invocationId"] == "run-1/train/1"
    with pytest.raises(SignatureError, match="does not name"):
        verify_provenance(bundle, KeyPolicy(public_keys=(keys.public,)),
                          subject_digest="sha256:" + "c" * 64)
    with pytest.raises(SignatureError):
        verify_provenance(bundle, KeyPolicy(public_keys=(other_keys.public,)))
    env = json.loads(bundle)["dsseEnvelope"]
    assert env["payloadType"] == "application/vnd.in-toto+json"
