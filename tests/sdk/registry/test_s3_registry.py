"""The s3:// registry against the dev stack's moto server (IAM enforced)."""

from __future__ import annotations

import uuid

import pytest

from stepguard.errors import IntegrityError, RegistryError, SignatureError, VersionConflict
from stepguard.registry import open_registry
from stepguard.signing import KeyPolicy, KeySigner

pytestmark = pytest.mark.services


@pytest.fixture
def s3(dev_stack, aws_admin_session):
    return aws_admin_session.client("s3", endpoint_url=dev_stack.moto_endpoint)


@pytest.fixture
def bucket(s3):
    name = f"models-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def reg(dev_stack, monkeypatch, bucket):
    # the documented path: boto3 credentials + AWS_ENDPOINT_URL from the environment
    monkeypatch.setenv("AWS_ENDPOINT_URL", dev_stack.moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", dev_stack.aws_access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", dev_stack.aws_secret_access_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", dev_stack.aws_region)
    return open_registry(f"s3://{bucket}/prod/models")


def _policy(keys):
    return KeyPolicy(public_keys=(keys.public,))


def test_publish_fetch_list_s3(reg, s3, bucket, model, keys, tmp_path):
    rec = reg.publish(model, "bert", "1.0", signer=KeySigner(keys.private),
                      provenance={"step": "train"})
    assert rec.bundle_uri == f"s3://{bucket}/prod/models/bert/1.0/model.sig"
    head = s3.head_object(Bucket=bucket, Key="prod/models/bert/1.0/files/config.json",
                          ChecksumMode="ENABLED")
    assert head.get("ChecksumSHA256")
    out = reg.fetch("bert", "1.0", policy=_policy(keys), dest=tmp_path / "out")
    assert (out / "config.json").read_text() == '{"hidden": 8}\n'
    assert [(e.name, e.version) for e in reg.list(policy=_policy(keys))] == [("bert", "1.0")]
    assert reg.publish(model, "bert", "1.0", signer=KeySigner(keys.private)) == rec
    (model / "config.json").write_text("{}\n")
    with pytest.raises(VersionConflict, match="immutable"):
        reg.publish(model, "bert", "1.0", signer=KeySigner(keys.private))


def test_s3_uncommitted_and_tampered(reg, s3, bucket, model, keys, tmp_path):
    reg.publish(model, "bert", "1.0", signer=KeySigner(keys.private))
    s3.put_object(Bucket=bucket, Key="prod/models/bert/1.0/files/evil.py", Body=b"import os")
    with pytest.raises(IntegrityError, match="evil.py"):
        reg.fetch("bert", "1.0", policy=_policy(keys), dest=tmp_path / "out")
    s3.delete_object(Bucket=bucket, Key="prod/models/bert/1.0/files/evil.py")
    s3.put_object(Bucket=bucket, Key="prod/models/bert/1.0/files/config.json", Body=b"{}")
    with pytest.raises(IntegrityError, match="config.json"):
        reg.fetch("bert", "1.0", policy=_policy(keys), dest=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    s3.delete_object(Bucket=bucket, Key="prod/models/bert/1.0/model.sig")
    assert reg.list() == []
    with pytest.raises(RegistryError, match="not committed"):
        reg.fetch("bert", "1.0", policy=_policy(keys), dest=tmp_path / "out")


def test_s3_failed_publish_removes_partial_upload(reg, s3, bucket, model, keys):
    class Boom(Exception):
        pass

    orig = reg._put_bytes

    def failing(key, data, *, exclusive):
        if key.endswith("model.sig"):
            raise Boom("network cut")
        orig(key, data, exclusive=exclusive)

    reg._put_bytes = failing
    with pytest.raises(RegistryError, match="partial upload removed"):
        reg.publish(model, "bert", "1.0", signer=KeySigner(keys.private), provenance={})
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_s3_other_signer_refused(reg, model, keys, other_keys, tmp_path):
    reg.publish(model, "bert", "1.0", signer=KeySigner(other_keys.private))
    with pytest.raises(SignatureError):
        reg.fetch("bert", "1.0", policy=_policy(keys), dest=tmp_path / "out")
    assert reg.list(policy=_policy(keys)) == []


def _mutate_before_upload(reg, victim: str):
    orig = reg._put_file

    def put(key, src, size):
        if key.endswith(victim):
            data = bytearray(src.read_bytes())
            data[0] ^= 0xFF
            src.write_bytes(bytes(data))  # same size, different bytes: after the manifest
        return orig(key, src, size)

    reg._put_file = put


def test_s3_file_changed_after_manifest_never_lands(reg, s3, bucket, model, keys):
    from stepguard.integrity import create_manifest

    manifest = create_manifest(model)
    _mutate_before_upload(reg, "model.safetensors")
    with pytest.raises(IntegrityError, match="does not describe"):
        reg.publish(model, "bert", "1.0", signer=KeySigner(keys.private), manifest=manifest)
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_s3_multipart_round_trip(reg, s3, bucket, model, keys, tmp_path, monkeypatch):
    import os

    from stepguard.integrity import create_manifest
    from stepguard.registry import _s3

    monkeypatch.setattr(_s3, "SINGLE_PUT_MAX", 1024 * 1024)
    monkeypatch.setattr(_s3, "PART_SIZE", 5 * 1024 * 1024)
    (model / "big.safetensors").write_bytes(os.urandom(12 * 1024 * 1024 + 17))
    reg.publish(model, "bert", "1.0", signer=KeySigner(keys.private))
    head = s3.head_object(Bucket=bucket, Key="prod/models/bert/1.0/files/big.safetensors",
                          ChecksumMode="ENABLED")
    assert head["ContentLength"] == 12 * 1024 * 1024 + 17
    out = reg.fetch("bert", "1.0", policy=_policy(keys), dest=tmp_path / "out")
    assert (out / "big.safetensors").read_bytes() == (model / "big.safetensors").read_bytes()
    manifest = create_manifest(model)
    _mutate_before_upload(reg, "big.safetensors")
    with pytest.raises(IntegrityError, match="does not describe"):
        reg.publish(model, "bert", "2.0", signer=KeySigner(keys.private), manifest=manifest)
    assert not [k for k in reg._list_keys("bert/2.0/")]
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
