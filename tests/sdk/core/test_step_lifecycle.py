"""The step lifecycle: ordering, verification before the body, receipts, cleanup on every path."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from stepguard.errors import BodyFailed, ConfigurationError, IntegrityError, StepTimeout
from stepguard.integrity import create_manifest
from stepguard.receipt import Receipt
from stepguard.settings import Settings
from stepguard.spec import RunContext, StepSpec
from stepguard.step import run_step


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_dict({"state_dir": str(tmp_path / "state"), "audit": {"exporter": "none"}})


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "train.csv").write_text("x,y\n1,2\n3,4\n")
    (data / "sub" / "labels.txt").write_text("a\nb\n")
    manifest = tmp_path / "data.manifest.json"
    manifest.write_text(create_manifest(data).to_json())
    return data, manifest


def _spec(tmp_path: Path, data: Path, manifest: Path, **extra: object) -> StepSpec:
    return StepSpec.from_dict({
        "name": "train",
        "inputs": [{"name": "data", "path": str(data), "manifest": str(manifest)}],
        "outputs": [{"name": "model", "path": str(tmp_path / "out" / "model")}],
        "isolation": {"mode": "process"},
        **extra,
    })


def test_success_verifies_runs_hashes_and_writes_receipt(tmp_path, settings, dataset):
    data, manifest = dataset
    seen: dict[str, object] = {}

    def body(env):
        seen["input"] = env.inputs["data"]
        rows = (env.inputs["data"] / "train.csv").read_text().splitlines()
        (env.outputs["model"] / "weights.json").write_text(json.dumps({"rows": len(rows)}))

    ctx = RunContext(pipeline="p1", run_id="run-1", step="train")
    receipt = run_step(_spec(tmp_path, data, manifest), body=body, settings=settings, context=ctx)

    assert receipt.status == "succeeded"
    assert seen["input"] == data
    [inp] = receipt.inputs
    assert inp.verified and inp.digest == create_manifest(data).digest and inp.files == 2
    out = receipt.output("model")
    assert out.files == 1 and out.digest.startswith("sha256:")
    assert Path(out.manifest).is_file()
    on_disk = Receipt.load(Path(settings.state_dir) / "runs" / "run-1" / "train" / "receipt.json")
    assert on_disk == receipt
    assert set(receipt.timings_ms) >= {"verify_inputs", "body", "hash_outputs"}


def test_consumer_verifies_inputs_against_producer_receipt(tmp_path, settings, dataset):
    data, manifest = dataset

    def produce(env):
        (env.outputs["model"] / "w.bin").write_bytes(b"\x00" * 1000)

    producer = run_step(_spec(tmp_path, data, manifest), body=produce, settings=settings,
                        context=RunContext(run_id="r2", step="train"))
    rpath = tmp_path / "producer-receipt.json"
    rpath.write_text(producer.to_json())
    model_dir = Path(producer.output("model").path)

    consumer = StepSpec.from_dict({
        "name": "evaluate", "isolation": {"mode": "process"},
        "inputs": [{"name": "model", "path": str(model_dir), "receipt": str(rpath)}],
    })
    ran = []
    r = run_step(consumer, body=lambda env: ran.append(1), settings=settings,
                 context=RunContext(run_id="r2", step="evaluate"))
    assert ran == [1]
    assert r.inputs[0].digest == producer.output("model").digest
    assert r.inputs[0].source.startswith("receipt:")

    # Chain of custody: a byte changed between producer and consumer stops the consumer.
    (model_dir / "w.bin").write_bytes(b"\x01" + b"\x00" * 999)
    with pytest.raises(IntegrityError) as info:
        run_step(consumer, body=lambda env: ran.append(2), settings=settings,
                 context=RunContext(run_id="r3", step="evaluate"))
    assert ran == [1]
    assert "w.bin" in info.value.diagnostics()


def test_swapped_manifest_not_matching_receipt_is_refused(tmp_path, settings, dataset):
    data, manifest = dataset
    producer = run_step(_spec(tmp_path, data, manifest),
                        body=lambda env: (env.outputs["model"] / "a").write_text("1"),
                        settings=settings, context=RunContext(run_id="r4", step="train"))
    out = producer.output("model")
    # An attacker rewrites both the model and its manifest file; the receipt still pins the digest.
    (Path(out.path) / "a").write_text("2")
    Path(out.manifest).write_text(create_manifest(Path(out.path)).to_json())
    rpath = tmp_path / "r.json"
    rpath.write_text(producer.to_json())
    consumer = StepSpec.from_dict({"name": "use", "isolation": {"mode": "process"},
                                   "inputs": [{"name": "model", "path": out.path, "receipt": str(rpath)}]})
    with pytest.raises(IntegrityError, match="producer's receipt"):
        run_step(consumer, body=lambda env: None, settings=settings)


@pytest.mark.parametrize("attack", ["modify", "add", "remove"])
def test_tampered_input_stops_step_before_body(tmp_path, settings, dataset, attack):
    data, manifest = dataset
    if attack == "modify":
        (data / "train.csv").write_text("x,y\n1,2\n3,5\n")
    elif attack == "add":
        (data / "poison.csv").write_text("evil\n")
    else:
        (data / "sub" / "labels.txt").unlink()
    ran = []
    with pytest.raises(IntegrityError) as info:
        run_step(_spec(tmp_path, data, manifest), body=lambda env: ran.append(1), settings=settings,
                 context=RunContext(run_id=f"t-{attack}", step="train"))
    assert ran == [], "the body ran on unverified data"
    err = info.value
    assert err.receipt.status == "failed"
    assert err.receipt.error.type == "IntegrityError"
    assert any(n in err.diagnostics() for n in ("train.csv", "poison.csv", "labels.txt"))
    # the failed receipt is on disk too, and no output manifest was produced
    assert Receipt.load(Path(settings.state_dir) / "runs" / f"t-{attack}" / "train" / "receipt.json").status == "failed"
    assert err.receipt.outputs == ()


def test_pinned_digest_mismatch_is_refused(tmp_path, settings, dataset):
    data, manifest = dataset
    spec = StepSpec.from_dict({
        "name": "train", "isolation": {"mode": "process"},
        "inputs": [{"name": "data", "path": str(data), "manifest": str(manifest),
                    "digest": "sha256:" + "0" * 64}],
    })
    with pytest.raises(IntegrityError, match="pinned digest"):
        run_step(spec, body=lambda env: None, settings=settings)


def test_body_exception_is_typed_and_keeps_text_out_of_receipt(tmp_path, settings, dataset):
    data, manifest = dataset

    def body(env):
        raise RuntimeError("password=hunter2-canary")

    with pytest.raises(BodyFailed) as info:
        run_step(_spec(tmp_path, data, manifest), body=body, settings=settings)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "hunter2" not in info.value.receipt.to_json()
    assert "hunter2" not in str(info.value)


def test_body_message_is_kept_masked_in_error_and_receipt(tmp_path, settings, dataset):
    """The body's own first line reaches the error and the receipt: registered secrets and
    values of secret-named keys masked."""
    from stepguard.audit import register_secret

    data, manifest = dataset
    canary = "reg1stered-" + "canary-5e7d"
    register_secret(canary)

    def body(env):
        raise ValueError(f"column 3 has NaN (token={canary}, api_key=abc123456)\nmore")

    with pytest.raises(BodyFailed) as info:
        run_step(_spec(tmp_path, data, manifest), body=body, settings=settings)
    want = "step body raised ValueError: [REDACTED]"
    assert info.value.message == want
    assert info.value.receipt.error.message == want

    def body2(env):
        raise ValueError("column 3 has NaN; api_key=abc123456")

    with pytest.raises(BodyFailed) as info:
        run_step(_spec(tmp_path / "2", data, manifest), body=body2, settings=settings)
    want = "step body raised ValueError: column 3 has NaN; api_key=[REDACTED]"
    assert info.value.message == want
    assert info.value.receipt.error.message == want
    assert "abc123456" not in info.value.receipt.to_json()


def test_in_process_deadline_interrupts_body(tmp_path, settings, dataset):
    data, manifest = dataset
    spec = _spec(tmp_path, data, manifest, deadline_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(StepTimeout):
        run_step(spec, body=lambda env: time.sleep(30), settings=settings)
    assert time.monotonic() - t0 < 5


def test_non_empty_output_dir_is_refused(tmp_path, settings, dataset):
    data, manifest = dataset
    stale = tmp_path / "out" / "model"
    stale.mkdir(parents=True)
    (stale / "old.bin").write_text("from a previous run")
    ran = []
    with pytest.raises(ConfigurationError, match="not empty"):
        run_step(_spec(tmp_path, data, manifest), body=lambda env: ran.append(1), settings=settings)
    assert ran == []


def test_callable_body_cannot_claim_sandbox(tmp_path, settings, dataset):
    data, manifest = dataset
    spec = StepSpec.from_dict({"name": "s", "isolation": {"mode": "sandbox"}})
    with pytest.raises(ConfigurationError, match="cannot be sandboxed"):
        run_step(spec, body=lambda env: None, settings=settings)


def test_input_without_verification_reference_is_refused():
    with pytest.raises(ConfigurationError, match="nothing to verify against") as info:
        StepSpec.from_dict({"name": "s", "inputs": [{"name": "d", "path": "/data"}]})
    assert info.value.subject == "inputs.d"


def test_unsafe_unverified_input_is_recorded_and_warns(tmp_path, settings, dataset):
    data, _ = dataset
    spec = StepSpec.from_dict({"name": "s", "isolation": {"mode": "process"},
                               "inputs": [{"name": "d", "path": str(data), "unsafe_unverified": True}]})
    with pytest.warns(UserWarning, match="without verification"):
        r = run_step(spec, body=lambda env: None, settings=settings)
    assert r.inputs[0].verified is False and r.inputs[0].source == "unverified"


def test_receipt_carries_audit_head_that_anchors_the_log(tmp_path, dataset):
    """The receipt (kept elsewhere, e.g. XCom) anchors the audit log: cutting its tail and
    rewriting the head file beside it is still caught."""
    from stepguard.audit import ChainHead, verify_chain
    from stepguard.errors import AuditError

    data, manifest = dataset
    log = tmp_path / "audit" / "audit.jsonl"
    settings = Settings.from_dict({"state_dir": str(tmp_path / "state"),
                                   "audit": {"exporter": "jsonl", "path": str(log)}})
    first = run_step(_spec(tmp_path, data, manifest), body=lambda env: None, settings=settings,
                     context=RunContext(run_id="a1", step="train"))
    seq, digest = first.audit_head.split(":", 1)
    assert verify_chain(log, anchor=ChainHead(int(seq), digest, 0)).tail_anchored

    # An attacker drops this step's records and the head file that would have noticed.
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:2]))
    head = log.with_name(log.name + ".head")
    if head.exists():
        head.unlink()
    with pytest.raises(AuditError):
        verify_chain(log, anchor=ChainHead(int(seq), digest, 0))
    head.touch()  # the process's cached audit log fsyncs its head file at exit


@pytest.mark.sandbox
def test_sandboxed_command_sees_declared_code_only_and_fresh_outputs(tmp_path, settings, dataset,
                                                                     monkeypatch):
    import shutil
    import sys

    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed")
    data, manifest = dataset
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / ".env").write_text("DB_PASSWORD=canary-next-to-the-code\n")
    (work / "train.py").write_text(
        "import os, pathlib\n"
        "out = pathlib.Path(os.environ['STEPGUARD_OUTPUT_MODEL'])\n"
        "rows = (pathlib.Path(os.environ['STEPGUARD_INPUT_DATA']) / 'train.csv').read_text()\n"
        "(out / 'rows').write_text(str(len(rows.splitlines())))\n"
        "(out / 'saw_env_file').write_text(str(pathlib.Path('" + str(work / ".env") + "').exists()))\n"
    )
    spec = StepSpec.from_dict({
        "name": "train",
        "inputs": [{"name": "data", "path": str(data), "manifest": str(manifest)}],
        "outputs": [{"name": "model", "path": "out/{run_id}/model"}],
        "isolation": {"mode": "sandbox", "read_only_paths": ["train.py"]},
    })
    for run in ("r-1", "r-2"):  # the second run must not trip over the first run's output
        receipt = run_step(spec, command=[sys.executable, str(work / "train.py")],
                           settings=settings, context=RunContext(run_id=run, step="train"))
        out = Path(receipt.output("model").path)
        assert out == work / "out" / run / "model"
        assert (out / "rows").read_text() == "3"
        assert (out / "saw_env_file").read_text() == "False"


def _keypair(d: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = d / f"{name}.pem", d / f"{name}.pub"
    priv.write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(s.Encoding.PEM,
                                                   s.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def test_input_must_be_signed_by_the_named_identity(tmp_path, dataset):
    """'Data signed by the ingestion identity': the manifest's bundle must verify under the
    policy named in settings, else the body never runs."""
    from stepguard.errors import SignatureError
    from stepguard.integrity import Manifest
    from stepguard.signing import KeySigner, sign_manifest

    data, manifest = dataset
    ingest_priv, ingest_pub = _keypair(tmp_path, "ingest")
    other_priv, _ = _keypair(tmp_path, "other")
    settings = Settings.from_dict({
        "state_dir": str(tmp_path / "state"), "audit": {"exporter": "none"},
        "policies": {"ingestion": {"kind": "key", "public_keys": [str(ingest_pub)]}}})
    m = Manifest.from_json(manifest.read_text())

    def spec(bundle):
        return StepSpec.from_dict({
            "name": "train", "isolation": {"mode": "process"},
            "inputs": [{"name": "data", "path": str(data), "manifest": str(manifest),
                        "signature": str(bundle), "signature_policy": "ingestion"}]})

    good = tmp_path / "good.sig"
    sign_manifest(m, KeySigner(ingest_priv), bundle_path=good)
    ran = []
    r = run_step(spec(good), body=lambda env: ran.append(1), settings=settings)
    assert ran == [1] and r.inputs[0].signer

    bad = tmp_path / "bad.sig"
    sign_manifest(m, KeySigner(other_priv), bundle_path=bad)
    with pytest.raises(SignatureError):
        run_step(spec(bad), body=lambda env: ran.append(2), settings=settings)
    assert ran == [1]

    # A validly signed bundle for *other* data does not vouch for this manifest.
    other = tmp_path / "other-data"
    other.mkdir()
    (other / "x.csv").write_text("1\n")
    replay = tmp_path / "replay.sig"
    sign_manifest(create_manifest(other), KeySigner(ingest_priv), bundle_path=replay)
    with pytest.raises((SignatureError, IntegrityError)):
        run_step(spec(replay), body=lambda env: ran.append(3), settings=settings)
    assert ran == [1]


def test_publish_uses_the_hashed_directory_not_the_literal_template(tmp_path, dataset, monkeypatch):
    """Output paths with {run_id} are expanded once; publishing signs that directory. An
    attacker's pre-created literal 'out/{run_id}/model' is never published."""
    from stepguard.registry import open_registry
    from stepguard.signing import KeyPolicy

    data, manifest = dataset
    priv, pub = _keypair(tmp_path, "release")
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "out" / "{run_id}" / "model"
    evil.mkdir(parents=True)
    (evil / "w.safetensors").write_bytes(b"EVIL")
    settings = Settings.from_dict({"state_dir": str(tmp_path / "state"),
                                   "audit": {"exporter": "none"},
                                   "registry": {"url": f"file://{tmp_path / 'reg'}"}})
    spec = StepSpec.from_dict({
        "name": "train", "isolation": {"mode": "process"},
        "inputs": [{"name": "data", "path": str(data), "manifest": str(manifest)}],
        "outputs": [{"name": "model", "path": "out/{run_id}/model",
                     "publish": {"name": "m", "version": "1"}}],
        "signing": {"signer": "key", "key": str(priv)},
    })
    r = run_step(spec, body=lambda env: (env.outputs["model"] / "w.safetensors").write_bytes(b"GOOD"),
                 settings=settings, context=RunContext(run_id="run-7", step="train"))
    assert r.output("model").path == str(tmp_path / "out" / "run-7" / "model")
    fetched = open_registry(f"file://{tmp_path / 'reg'}").fetch(
        "m", "1", policy=KeyPolicy(public_keys=(pub,)), dest=tmp_path / "fetched")
    assert (fetched / "w.safetensors").read_bytes() == b"GOOD"


@pytest.mark.parametrize("change", ["same-size", "grown"])
def test_sharded_file_changed_after_hashing_never_publishes(tmp_path, change):
    """Big files carry sharded digests in manifests; publishing must still prove the stored
    bytes are the hashed bytes."""
    from stepguard.registry import open_registry
    from stepguard.signing import KeySigner

    priv, _ = _keypair(tmp_path, "k")
    model = tmp_path / "model"
    model.mkdir()
    big = model / "w.safetensors"
    big.write_bytes(b"\x01" * (3 << 20))
    m = create_manifest(model, shard_size=1 << 20)
    assert m.entries[0].digest.startswith("sha256-sharded:")
    big.write_bytes(b"\x02" * (3 << 20) if change == "same-size" else b"\x01" * ((3 << 20) + 1))
    reg = open_registry(f"file://{tmp_path / 'reg'}")
    with pytest.raises(IntegrityError):
        reg.publish(model, "m", "1", signer=KeySigner(priv), manifest=m)
    assert reg.list() == []


def test_consumer_refuses_a_failed_producers_receipt(tmp_path, settings, dataset):
    data, manifest = dataset

    def body(env):
        (env.outputs["model"] / "w.bin").write_bytes(b"1")
        raise RuntimeError("training diverged")

    with pytest.raises(BodyFailed) as info:
        run_step(_spec(tmp_path, data, manifest), body=body, settings=settings,
                 context=RunContext(run_id="f1", step="train"))
    failed = info.value.receipt
    rpath = tmp_path / "failed.json"
    rpath.write_text(failed.to_json())
    consumer = StepSpec.from_dict({"name": "use", "isolation": {"mode": "process"},
                                   "inputs": [{"name": "model", "path": str(tmp_path / "out" / "model"),
                                               "receipt": str(rpath)}]})
    ran = []
    with pytest.raises(IntegrityError, match="did not succeed"):
        run_step(consumer, body=lambda env: ran.append(1), settings=settings)
    assert ran == []


def test_run_directories_per_step_and_per_mapped_instance(tmp_path, settings):
    """Two specs under one run context (default step name) keep their own run directories;
    instances of one spec named ``<name>.<n>`` by the orchestrator keep theirs too."""
    def spec(name: str) -> StepSpec:
        return StepSpec.from_dict({"name": name, "isolation": {"mode": "process"},
                                   "outputs": [{"name": "o", "path": str(tmp_path / "o" / "{step}")}]})

    def body(env):
        (env.outputs["o"] / "x").write_text("1")

    shared = RunContext(run_id="r")
    for name in ("prep", "train"):
        run_step(spec(name), body=body, settings=settings, context=shared)
    for i in (1, 12):
        run_step(spec("fit"), body=body, settings=settings,
                 context=RunContext(run_id="r", step=f"fit.{i}"))
    runs = Path(settings.state_dir) / "runs" / "r"
    assert sorted(p.name for p in runs.iterdir()) == ["fit.1", "fit.12", "prep", "train"]
    for name in ("prep", "train", "fit.1", "fit.12"):
        receipt = Receipt.load(runs / name / "receipt.json")
        assert receipt.output("o").path == str(tmp_path / "o" / name)
