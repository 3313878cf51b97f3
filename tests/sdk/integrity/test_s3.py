"""S3 integrity against the dev stack's moto server (IAM enforcement on, admin keys)."""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from stepguard.errors import ConfigurationError, IntegrityError, ManifestError
from stepguard.integrity import create_manifest, verify_manifest
from stepguard.integrity.s3 import (
    S3Location,
    download_and_verify,
    manifest_from_s3,
    upload,
    verify_s3,
)

pytestmark = pytest.mark.services

MiB = 2**20
SHARD = 5 * MiB  # the smallest S3 multipart part size


@pytest.fixture
def s3(dev_stack: Any, aws_admin_session: Any) -> Any:
    return aws_admin_session.client("s3", endpoint_url=dev_stack.moto_endpoint)


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"sg-integrity-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    (root / "shards").mkdir(parents=True)
    for i in range(3):
        (root / "shards" / f"part-{i}.csv").write_bytes(f"id,v\n{i},{i * i}\n".encode() * 40)
    (root / "empty").write_bytes(b"")
    # 2 full 5 MiB parts and a tail: uploaded as a 3-part multipart object.
    (root / "model.bin").write_bytes(os.urandom(2 * SHARD + 777))
    return root


def test_upload_then_manifest_from_stored_checksums(s3, bucket, tree, tmp_path) -> None:
    loc = S3Location(bucket, "datasets/v1")
    local = upload(tree, loc, client=s3, shard_size=SHARD)
    head = s3.head_object(Bucket=bucket, Key="datasets/v1/shards/part-0.csv",
                          ChecksumMode="ENABLED")
    expected = hashlib.sha256((tree / "shards" / "part-0.csv").read_bytes()).digest()
    assert head["ChecksumSHA256"].split("-")[0] == base64.b64encode(expected).decode()
    remote, how = manifest_from_s3(loc, client=s3, shard_size=SHARD)
    # Nothing downloaded: every digest, the multipart one included, came from S3's checksums.
    assert how.streamed == ()
    assert "model.bin" in how.from_checksum
    assert remote.digest == local.digest
    assert verify_s3(loc, local, client=s3).files == 5
    staged = tmp_path / "staged"
    report = download_and_verify(loc, local, staged, client=s3)
    assert report.files == 5
    assert (staged / "model.bin").read_bytes() == (tree / "model.bin").read_bytes()
    verify_manifest(staged, local)


def test_objects_without_sha256_are_streamed(s3, bucket, tree) -> None:
    loc = S3Location(bucket, "raw")
    for path in sorted(tree.rglob("*")):
        if path.is_file() and path.name != "model.bin":
            # No SHA-256 requested: the stored checksum (if any) is CRC-based.
            s3.put_object(Bucket=bucket, Key=loc.key(path.relative_to(tree).as_posix()),
                          Body=path.read_bytes(), ChecksumAlgorithm="CRC32")
    # Multipart with parts that are not shard-sized: its composite checksum is not comparable.
    data = (tree / "model.bin").read_bytes()
    mpu = s3.create_multipart_upload(Bucket=bucket, Key="raw/model.bin",
                                     ChecksumAlgorithm="SHA256")
    cut = 6 * MiB
    parts = []
    for n, chunk in enumerate((data[:cut], data[cut:]), 1):
        r = s3.upload_part(Bucket=bucket, Key="raw/model.bin", UploadId=mpu["UploadId"],
                           PartNumber=n, Body=chunk, ChecksumAlgorithm="SHA256")
        parts.append({"PartNumber": n, "ETag": r["ETag"], "ChecksumSHA256": r["ChecksumSHA256"]})
    s3.complete_multipart_upload(Bucket=bucket, Key="raw/model.bin", UploadId=mpu["UploadId"],
                                 MultipartUpload={"Parts": parts})
    remote, how = manifest_from_s3(loc, client=s3, shard_size=SHARD)
    assert set(how.streamed) == {"empty", "model.bin", "shards/part-0.csv", "shards/part-1.csv",
                                 "shards/part-2.csv"}
    assert remote.digest == create_manifest(tree, shard_size=SHARD).digest
    verify_s3(loc, remote, client=s3)


def test_blake3_manifest_of_a_prefix_streams(s3, bucket, tree) -> None:
    loc = S3Location(bucket, "b3")
    upload(tree, loc, client=s3, shard_size=SHARD)
    remote, how = manifest_from_s3(loc, client=s3, algorithm="blake3")
    assert len(how.streamed) == 5
    assert remote.digest == create_manifest(tree, algorithm="blake3").digest


def test_tampered_prefix_every_difference_reported(s3, bucket, tree, tmp_path) -> None:
    loc = S3Location(bucket, "v2")
    m = upload(tree, loc, client=s3, shard_size=SHARD)
    body = bytearray((tree / "shards" / "part-1.csv").read_bytes())
    body[10] ^= 1  # same size, new content: S3 computes a new checksum for it
    s3.put_object(Bucket=bucket, Key="v2/shards/part-1.csv", Body=bytes(body),
                  ChecksumAlgorithm="SHA256")
    s3.delete_object(Bucket=bucket, Key="v2/empty")
    s3.put_object(Bucket=bucket, Key="v2/shards/poison.csv", Body=b"x")
    # Same size multipart object with one byte changed in the last part.
    big = bytearray((tree / "model.bin").read_bytes())
    big[-1] ^= 0xFF
    s3.put_object(Bucket=bucket, Key="v2/model.bin", Body=bytes(big))
    with pytest.raises(IntegrityError) as info:
        verify_s3(loc, m, client=s3)
    assert set(info.value.details) == {
        "modified: shards/part-1.csv (content differs)",
        "missing: empty",
        "added: shards/poison.csv (object)",
        "modified: model.bin (content differs)",
    }
    staged = tmp_path / "staged"
    with pytest.raises(IntegrityError) as info:
        download_and_verify(loc, m, staged, client=s3)
    assert "modified: model.bin (content differs)" in info.value.details
    assert not staged.exists()


def test_upload_refuses_data_that_does_not_match_manifest(s3, bucket, tree) -> None:
    m = create_manifest(tree, shard_size=SHARD)
    (tree / "shards" / "part-2.csv").write_bytes(b"changed after the manifest was made")
    with open(tree / "model.bin", "r+b") as fh:
        first = fh.read(1)[0]
        fh.seek(0)
        fh.write(bytes([first ^ 0xFF]))
    with pytest.raises(IntegrityError) as info:
        upload(tree, S3Location(bucket, "v3"), client=s3, manifest=m)
    assert any("shards/part-2.csv" in d for d in info.value.details)
    assert any("model.bin" in d for d in info.value.details)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="v3/").get("Contents", [])]
    assert "v3/model.bin" not in keys and "v3/shards/part-2.csv" not in keys


@pytest.mark.parametrize("key", ["evil/../../etc/passwd", "a\\b", "Data.csv"])
def test_unsafe_keys_refused(s3, bucket, key) -> None:
    s3.put_object(Bucket=bucket, Key=f"p/{key}", Body=b"1", ChecksumAlgorithm="SHA256")
    s3.put_object(Bucket=bucket, Key="p/data.csv", Body=b"2", ChecksumAlgorithm="SHA256")
    with pytest.raises(ManifestError) as info:
        manifest_from_s3(S3Location(bucket, "p"), client=s3)
    assert key in "\n".join(info.value.details) or key.lower() in "\n".join(info.value.details)


def test_location_parsing() -> None:
    assert S3Location.parse("s3://b/x/y") == S3Location("b", "x/y/")
    with pytest.raises(ConfigurationError):
        S3Location.parse("https://b/x")


def test_least_privilege_reader_verifies_but_cannot_write(
    dev_stack, aws_admin_session, s3, bucket, tree, tmp_path
) -> None:
    """IAM is enforced: a read-only principal verifies and downloads; its upload is refused,
    and the refusal names no secret."""
    import json as _json

    from stepguard.errors import OperationalError

    loc = S3Location(bucket, "ro")
    m = upload(tree, loc, client=s3, shard_size=SHARD)
    iam = aws_admin_session.client("iam", endpoint_url=dev_stack.moto_endpoint)
    user = f"reader-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="read", PolicyDocument=_json.dumps({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": f"arn:aws:s3:::{bucket}"},
            {"Effect": "Allow", "Action": ["s3:GetObject"],
             "Resource": f"arn:aws:s3:::{bucket}/*"},
        ],
    }))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    try:
        import boto3

        reader = boto3.client("s3", endpoint_url=dev_stack.moto_endpoint,
                              region_name=dev_stack.aws_region,
                              aws_access_key_id=key["AccessKeyId"],
                              aws_secret_access_key=key["SecretAccessKey"])
        assert verify_s3(loc, m, client=reader).files == 5
        download_and_verify(loc, m, tmp_path / "staged", client=reader)
        with pytest.raises(OperationalError) as info:
            upload(tree, S3Location(bucket, "ro-write"), client=reader, manifest=m)
        assert "AccessDenied" in str(info.value)
        secret = key["SecretAccessKey"]
        text = "\n".join([str(info.value), repr(info.value), info.value.diagnostics()])
        from urllib.parse import quote

        for variant in (secret, secret.upper(), base64.b64encode(secret.encode()).decode(),
                        quote(secret, safe="")):
            assert variant not in text
    finally:
        iam.delete_access_key(UserName=user, AccessKeyId=key["AccessKeyId"])
        iam.delete_user_policy(UserName=user, PolicyName="read")
        iam.delete_user(UserName=user)
