"""Steps that share no disk: producer and consumer in different working and state directories,
passing data, manifests and receipts through the object store only, with just-in-time
credentials (Vault identity token -> moto STS with IAM enforced). Real OpenBao, real moto."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

from stepguard.errors import IntegrityError, OperationalError
from stepguard.settings import Settings
from stepguard.spec import RunContext, StepSpec
from stepguard.step import run_step

pytestmark = [pytest.mark.services]

BUCKET = "stepguard-data"


@pytest.fixture
def worker_env(dev_stack, monkeypatch):
    """A worker's environment: Vault AppRole login and the S3 endpoint; no AWS keys at all."""
    monkeypatch.setenv("VAULT_ROLE_ID", dev_stack.approle_role_id)
    monkeypatch.setenv("VAULT_SECRET_ID_FILE", str(dev_stack.approle_secret_id_file))
    monkeypatch.setenv("AWS_ENDPOINT_URL", dev_stack.moto_endpoint)
    monkeypatch.setenv("AWS_REGION", dev_stack.aws_region)
    for name in ("VAULT_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    return dev_stack


EXTRA: dict[str, object] = {}


def _worker(root: Path, dev_stack) -> Settings:
    """One worker: its own working directory and state dir."""
    root.mkdir(parents=True)
    os.chdir(root)
    return Settings.from_dict({"vault": {"addr": dev_stack.vault_addr, "auth": "approle"},
                               "audit": {"exporter": "none"}, "state_dir": str(root / "state"),
                               **EXTRA})


def _lake(dev_stack) -> dict[str, object]:
    return {"name": "lake", "kind": "aws_web_identity", "role": dev_stack.web_identity_role_arn}


def _produce(tmp_path: Path, dev_stack, run_id: str, *, with_credential: bool = True):
    settings = _worker(tmp_path / "producer", dev_stack)
    spec = StepSpec.from_dict({
        "name": "ingest", "isolation": {"mode": "process"},
        "credentials": [_lake(dev_stack)] if with_credential else [],
        "storage": {"credential": "lake"} if with_credential else None,
        "outputs": [{"name": "dataset", "path": f"s3://{BUCKET}/runs/{{run_id}}/dataset"}],
    })

    def body(env):
        out = env.outputs["dataset"]
        (out / "train.csv").write_text("x,y\n1,0\n2,1\n")
        (out / "parts").mkdir()
        (out / "parts" / "big.bin").write_bytes(os.urandom(300_000))

    return run_step(spec, body=body, settings=settings,
                    context=RunContext(pipeline="p", run_id=run_id, step="ingest"))


def _consume(tmp_path: Path, dev_stack, receipt_text: str, name: str = "consumer"):
    settings = _worker(tmp_path / name, dev_stack)
    seen: dict[str, object] = {}
    data = json.loads(receipt_text)
    spec = StepSpec.from_dict({
        "name": "train", "isolation": {"mode": "process"},
        "credentials": [_lake(dev_stack)], "storage": {"credential": "lake"},
        "inputs": [{"name": "dataset", "path": data["outputs"][0]["path"],
                    "receipt": receipt_text}],
    })

    def body(env):
        seen["path"] = env.inputs["dataset"]
        seen["csv"] = (env.inputs["dataset"] / "train.csv").read_text()

    receipt = run_step(spec, body=body, settings=settings,
                       context=RunContext(pipeline="p", run_id=data["context"]["run_id"],
                                          step="train"))
    return receipt, seen


@pytest.fixture
def chdir_back():
    here = os.getcwd()
    yield
    os.chdir(here)


def test_producer_and_consumer_share_only_the_object_store(tmp_path, worker_env, chdir_back,
                                                           aws_admin_session):
    run_id = f"xw-{uuid.uuid4().hex[:8]}"
    produced = _produce(tmp_path, worker_env, run_id)
    out = produced.output("dataset")
    assert out.path == f"s3://{BUCKET}/runs/{run_id}/dataset/data/"
    assert out.manifest.startswith(f"s3://{BUCKET}/runs/{run_id}/dataset/manifest/sha256-")
    assert out.files == 2
    # Nothing in the receipt points at the producer's disk.
    text = produced.to_json()
    assert str(tmp_path / "producer") not in json.dumps(json.loads(text)["outputs"])
    # The objects carry SHA-256 checksums S3 checked on arrival.
    s3 = aws_admin_session.client("s3", endpoint_url=worker_env.moto_endpoint)
    head = s3.head_object(Bucket=BUCKET, Key=f"runs/{run_id}/dataset/data/train.csv",
                          ChecksumMode="ENABLED")
    assert head.get("ChecksumSHA256")

    shutil.rmtree(tmp_path / "producer")  # the producer's worker is gone
    consumed, seen = _consume(tmp_path, worker_env, text)
    assert seen["csv"] == "x,y\n1,0\n2,1\n"
    assert not str(seen["path"]).startswith(str(tmp_path / "producer"))
    rec = consumed.inputs[0]
    assert rec.verified and rec.digest == out.digest and rec.path == out.path
    assert rec.source == "receipt:step ingest#dataset"
    assert not Path(str(seen["path"])).exists()  # scratch is gone after the step


def test_changed_object_is_an_integrity_verdict(tmp_path, worker_env, chdir_back,
                                                aws_admin_session):
    run_id = f"xw-{uuid.uuid4().hex[:8]}"
    text = _produce(tmp_path, worker_env, run_id).to_json()
    s3 = aws_admin_session.client("s3", endpoint_url=worker_env.moto_endpoint)
    s3.put_object(Bucket=BUCKET, Key=f"runs/{run_id}/dataset/data/train.csv",
                  Body=b"x,y\n1,1\n2,1\n")
    with pytest.raises(IntegrityError, match="train.csv") as info:
        _consume(tmp_path, worker_env, text)
    assert "train.csv" in "\n".join(info.value.details)


def test_missing_input_is_operational_not_a_verdict(tmp_path, worker_env, chdir_back,
                                                    aws_admin_session):
    run_id = f"xw-{uuid.uuid4().hex[:8]}"
    text = _produce(tmp_path, worker_env, run_id).to_json()
    s3 = aws_admin_session.client("s3", endpoint_url=worker_env.moto_endpoint)
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"runs/{run_id}/dataset/data/")
    for obj in listed["Contents"]:
        s3.delete_object(Bucket=BUCKET, Key=obj["Key"])
    with pytest.raises(OperationalError, match="does not exist") as info:
        _consume(tmp_path, worker_env, text)
    assert not isinstance(info.value, IntegrityError)


def test_missing_local_input_is_operational(tmp_path, worker_env, chdir_back):
    from stepguard.integrity import create_manifest

    settings = _worker(tmp_path / "w", worker_env)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("a")
    (tmp_path / "m.json").write_text(create_manifest(tmp_path / "data").to_json())
    shutil.rmtree(tmp_path / "data")  # the data was on another worker's disk
    spec = StepSpec.from_dict({
        "name": "train", "isolation": {"mode": "process"},
        "inputs": [{"name": "d", "path": str(tmp_path / "data"),
                    "manifest": str(tmp_path / "m.json")}]})
    with pytest.raises(OperationalError, match="input does not exist") as info:
        run_step(spec, body=lambda env: None, settings=settings)
    assert not isinstance(info.value, IntegrityError)


def test_without_the_credential_the_same_step_cannot_reach_the_bucket(tmp_path, worker_env,
                                                                        chdir_back):
    with pytest.raises(OperationalError) as info:
        _produce(tmp_path, worker_env, f"xw-{uuid.uuid4().hex[:8]}", with_credential=False)
    assert info.value.subject and info.value.subject.startswith(f"s3://{BUCKET}/")


def test_credential_reaches_only_the_buckets_its_role_allows(tmp_path, worker_env, chdir_back):
    settings = _worker(tmp_path / "w", worker_env)
    spec = StepSpec.from_dict({
        "name": "ingest", "isolation": {"mode": "process"},
        "credentials": [_lake(worker_env)], "storage": {"credential": "lake"},
        "outputs": [{"name": "d", "path": "s3://stepguard-models/x/{run_id}"}]})
    with pytest.raises(OperationalError, match="AccessDenied"):
        run_step(spec, body=lambda env: None, settings=settings)


def test_storage_credential_must_be_a_declared_aws_credential():
    from stepguard.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="AWS credentials"):
        StepSpec.from_dict({"name": "s", "storage": {"credential": "lake"},
                            "outputs": [{"name": "o", "path": "s3://b/o"}]})


@pytest.fixture
def signed_receipts(tmp_path, monkeypatch):
    """Every worker signs the receipts it writes and refuses receipts not signed by steps."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    keys = tmp_path / "keys"
    keys.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    (keys / "steps.pem").write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                                       ser.NoEncryption()))
    (keys / "steps.pub").write_bytes(key.public_key().public_bytes(
        ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    monkeypatch.setitem(EXTRA, "receipts", {"signer": "key", "key": str(keys / "steps.pem"),
                                            "policy": "steps"})
    monkeypatch.setitem(EXTRA, "policies", {"steps": {"kind": "key",
                                                      "public_keys": [str(keys / "steps.pub")]}})


def test_signed_receipt_is_verified_before_use(tmp_path, worker_env, chdir_back,
                                               signed_receipts):
    produced = _produce(tmp_path, worker_env, f"xw-{uuid.uuid4().hex[:8]}")
    assert produced.signature
    consumed, seen = _consume(tmp_path, worker_env, produced.to_json())
    assert seen["csv"].startswith("x,y") and consumed.signature


@pytest.mark.parametrize("edit", ["digest", "unsigned", "manifest"])
def test_edited_or_unsigned_receipt_is_refused(tmp_path, worker_env, chdir_back,
                                               signed_receipts, aws_admin_session, edit):
    from stepguard.errors import SignatureError

    run_id = f"xw-{uuid.uuid4().hex[:8]}"
    data = json.loads(_produce(tmp_path, worker_env, run_id).to_json())
    out = data["outputs"][0]
    if edit == "digest":
        # The XCom editor points the consumer at other data: bytes and a matching manifest.
        out["digest"] = "sha256:" + "00" * 32
    elif edit == "manifest":
        s3 = aws_admin_session.client("s3", endpoint_url=worker_env.moto_endpoint)
        s3.put_object(Bucket=BUCKET, Key=f"runs/{run_id}/other.json", Body=b"{}")
        out["manifest"] = f"s3://{BUCKET}/runs/{run_id}/other.json"
    else:
        del data["signature"]
    with pytest.raises(SignatureError) as info:
        _consume(tmp_path, worker_env, json.dumps(data))
    assert info.value.subject == "step ingest"
    assert ("not signed" if edit == "unsigned" else "changed after it was signed") in str(
        info.value)


def _cli(*args, env):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "stepguard.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_audit_segments_leave_the_host_and_verify_across_steps(tmp_path, worker_env, chdir_back,
                                                               monkeypatch, aws_admin_session):
    monkeypatch.setitem(EXTRA, "audit", {"exporter": "jsonl"})
    settings = _worker(tmp_path / "producer", worker_env)
    run_id = f"xw-{uuid.uuid4().hex[:8]}"
    receipts = []
    for name in ("ingest", "clean"):
        spec = StepSpec.from_dict({
            "name": name, "isolation": {"mode": "process"},
            "credentials": [_lake(worker_env)], "storage": {"credential": "lake"},
            "outputs": [{"name": "d", "path": f"s3://{BUCKET}/runs/{{run_id}}/{name}"}]})
        receipts.append(run_step(
            spec, body=lambda env: (env.outputs["d"] / "x.txt").write_text("x"),
            settings=settings, context=RunContext(pipeline="p", run_id=run_id, step=name)))
    for r in receipts:
        assert r.audit_segment and r.audit_segment.startswith(f"s3://{BUCKET}/runs/{run_id}/")
        assert r.audit_head and r.audit_segment.endswith(
            f"-{int(r.audit_head.split(':')[0]):020d}.jsonl")
    shutil.rmtree(tmp_path / "producer")  # the host and its log are gone

    env = {k: v for k, v in os.environ.items()}
    creds = aws_admin_session.get_credentials()
    env.update(AWS_ACCESS_KEY_ID=creds.access_key, AWS_SECRET_ACCESS_KEY=creds.secret_key)
    ok = _cli("audit", "verify", "--json", f"s3://{BUCKET}/runs/{run_id}/", env=env)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert (report["segments"], report["logs"], report["joined"], report["anchored"]) == (
        2, 1, 1, 2)

    s3 = aws_admin_session.client("s3", endpoint_url=worker_env.moto_endpoint)
    key = receipts[0].audit_segment[len(f"s3://{BUCKET}/"):]
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    s3.put_object(Bucket=BUCKET, Key=key, Body=body.replace(b'"ingest"', b'"ingest2"', 1))
    bad = _cli("audit", "verify", f"s3://{BUCKET}/runs/{run_id}/", env=env)
    assert bad.returncode != 0 and "edited" in bad.stderr


def test_unreachable_object_store_is_transient(tmp_path, worker_env, chdir_back):
    from stepguard.errors import TransientError

    text = _produce(tmp_path, worker_env, f"xw-{uuid.uuid4().hex[:8]}").to_json()
    settings = _worker(tmp_path / "consumer", worker_env)
    data = json.loads(text)
    spec = StepSpec.from_dict({
        "name": "train", "isolation": {"mode": "process"},
        "credentials": [_lake(worker_env)],
        "storage": {"credential": "lake", "endpoint_url": "http://127.0.0.1:9"},  # nothing there
        "inputs": [{"name": "dataset", "path": data["outputs"][0]["path"], "receipt": text}]})
    with pytest.raises(TransientError) as info:
        run_step(spec, body=lambda env: None, settings=settings)
    assert not isinstance(info.value, IntegrityError)


def test_credentials_in_the_audit_trail_name_kind_lease_ttl_and_what_was_revoked(
        tmp_path, worker_env, chdir_back, monkeypatch):
    """A database lease (revocable) and a web-identity credential (it can only expire): the
    acquire span names both with hashed lease ids -- the receipt's own values -- TTL and
    revocability; only the database lease gets ``credentials.revoked`` PASS, the web-identity
    one ``credentials.not_revocable`` (expires), never "revoked"."""
    from stepguard import audit
    from stepguard.testing.spans import records_from_log

    monkeypatch.setitem(EXTRA, "audit", {"exporter": "jsonl"})
    settings = _worker(tmp_path / "worker", worker_env)
    spec = StepSpec.from_dict({
        "name": "ingest", "isolation": {"mode": "process"},
        "credentials": [_lake(worker_env),
                        {"name": "db", "kind": "database", "role": "stepguard-step"}],
        "outputs": [{"name": "d", "path": str(tmp_path / "out")}]})
    receipt = run_step(spec, body=lambda env: (env.outputs["d"] / "x").write_text("x"),
                       settings=settings,
                       context=RunContext(pipeline="p", run_id="creds-1", step="ingest"))
    leases = {c.name: c for c in receipt.credentials}
    assert leases["db"].revocable and leases["db"].revoked
    assert not leases["lake"].revocable and not leases["lake"].revoked
    spans = {s["name"]: s for s in records_from_log(settings.audit_path)}
    acquire = spans["stepguard.credentials.acquire"]["attributes"]
    assert acquire["stepguard.credentials.names"] == ["lake", "db"]
    assert acquire["stepguard.credentials.kinds"] == ["aws_web_identity", "database"]
    assert acquire["stepguard.credentials.lease_ids"] == [leases["lake"].lease or "",
                                                          leases["db"].lease]
    assert leases["db"].lease.startswith("sha256:")
    assert acquire["stepguard.credentials.revocable"] == [False, True]
    assert all(t > 0 for t in acquire["stepguard.credentials.ttl_s"])
    verdicts = [(e["attributes"]["stepguard.verdict.name"],
                 e["attributes"]["stepguard.verdict.credential"],
                 e["attributes"]["stepguard.verdict.passed"])
                for e in spans["stepguard.credentials.revoke"]["events"]]
    assert verdicts == [("credentials.not_revocable", "lake", True),
                        ("credentials.revoked", "db", True)]
    outcome = spans["stepguard.credentials.revoke"]["events"][0]["attributes"]
    assert outcome["stepguard.verdict.outcome"] == "expires"
    text = audit.show(settings.audit_path)
    assert "PASS credentials.not_revocable  credential=lake" in text
    assert "PASS credentials.revoked  credential=lake" not in text
    assert f"lease={leases['db'].lease}" in text
