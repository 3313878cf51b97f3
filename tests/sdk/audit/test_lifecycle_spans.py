"""The spans the real lifecycle emits, checked against the table in docs/reference/audit.md
(parsed from the page): a small pipeline run -- two mapped ingest instances, a training step
whose input must be signed and whose model is signed and published, and the deployment gate --
with the local hash-chained log as the exporter. No hand-built spans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stepguard import audit
from stepguard.errors import SignatureError
from stepguard.integrity import create_manifest
from stepguard.settings import Settings
from stepguard.signing import KeySigner, sign_manifest
from stepguard.spec import RunContext, StepSpec
from stepguard.step import run_step
from stepguard.testing.spans import check_spans, read_span_table, records_from_log

DOC = Path(__file__).resolve().parents[3] / "docs" / "reference" / "audit.md"
PIPELINE, RUN = "churn", "run-2026-12-05"


def _keypair(d: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = d / f"{name}.pem", d / f"{name}.pub"
    priv.write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(s.Encoding.PEM,
                                                   s.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def _ctx(step: str) -> RunContext:
    return RunContext(pipeline=PIPELINE, run_id=RUN, step=step)


@pytest.fixture
def pipeline(tmp_path, monkeypatch):
    """Runs the pipeline; returns (settings, receipts by step, audit log path)."""
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    monkeypatch.delenv("TRACEPARENT", raising=False)
    release_priv, release_pub = _keypair(tmp_path, "release")
    ingest_priv, ingest_pub = _keypair(tmp_path, "ingestion")
    _other_priv, other_pub = _keypair(tmp_path, "other")
    settings = Settings.from_dict({
        "state_dir": str(tmp_path / "state"),
        "audit": {"exporter": "jsonl", "path": str(tmp_path / "audit.jsonl")},
        "registry": {"url": f"file://{tmp_path / 'registry'}"},
        "policies": {"release": {"kind": "key", "public_keys": [str(release_pub)]},
                     "ingestion": {"kind": "key", "public_keys": [str(ingest_pub)]},
                     "other": {"kind": "key", "public_keys": [str(other_pub)]}}})
    receipts = {}
    ingest = StepSpec.from_dict({
        "name": "ingest", "isolation": {"mode": "process"},
        "outputs": [{"name": "data", "path": str(tmp_path / "lake" / "{step}")}]})
    for i in range(2):
        def body(env, i=i):
            (env.outputs["data"] / "rows.csv").write_text(f"x,y\n{i},2\n")
        receipts[f"ingest.{i}"] = run_step(ingest, body=body, context=_ctx(f"ingest.{i}"),
                                           settings=settings)
    data = Path(receipts["ingest.0"].output("data").path)
    manifest = Path(receipts["ingest.0"].output("data").manifest)
    bundle = tmp_path / "data.sig"
    sign_manifest(create_manifest(data), KeySigner(ingest_priv), bundle_path=bundle)
    train = StepSpec.from_dict({
        "name": "train", "isolation": {"mode": "process"},
        "inputs": [{"name": "data", "path": str(data), "manifest": str(manifest),
                    "signature": str(bundle), "signature_policy": "ingestion"}],
        "outputs": [{"name": "model", "path": str(tmp_path / "out" / "model"),
                     "publish": {"name": "churn", "version": "1"}}],
        "signing": {"signer": "key", "key": str(release_priv)}})

    def fit(env):
        (env.outputs["model"] / "model.safetensors").write_bytes(b"weights")
    receipts["train"] = run_step(train, body=fit, context=_ctx("train"), settings=settings)

    def gate_spec(name):
        return StepSpec.from_dict({"name": name, "isolation": {"mode": "process"},
                                   "outputs": [{"name": "model",
                                                "path": str(tmp_path / name / "model")}]})

    def gate(policy):
        def body(env):
            from stepguard.wiring import fetch_verified_model

            fetch_verified_model(settings, "churn", "1", policy=policy,
                                 dest=env.outputs["model"] / "staged")
        return body
    receipts["gate"] = run_step(gate_spec("gate"), body=gate("release"), context=_ctx("gate"),
                                settings=settings)
    with pytest.raises(SignatureError) as refused:
        run_step(gate_spec("gate_other"), body=gate("other"), context=_ctx("gate_other"),
                 settings=settings)
    receipts["gate_other"] = refused.value.receipt
    return settings, receipts, tmp_path / "audit.jsonl"


def test_every_emitted_span_matches_the_documented_table(pipeline):
    _settings, _receipts, log = pipeline
    table = read_span_table(DOC)
    spans = records_from_log(log)
    problems = check_spans(spans, table)
    assert problems == [], "\n".join(sorted(set(problems)))
    emitted = {s["name"] for s in spans}
    # Everything this pipeline exercises (credentials need Vault: the example DAG test).
    assert emitted >= {"stepguard.step", "stepguard.integrity.verify", "stepguard.signing.verify",
                       "stepguard.isolation.run", "stepguard.integrity.hash",
                       "stepguard.registry.publish", "stepguard.signing.sign"}


def test_the_whole_run_is_one_trace_under_the_run_root(pipeline):
    _settings, receipts, log = pipeline
    trace_id, root = audit.run_trace_ids("python", PIPELINE, RUN)
    spans = records_from_log(log)
    assert {s["trace_id"] for s in spans} == {trace_id}
    steps = [s for s in spans if s["name"] == "stepguard.step"]
    assert len(steps) == 5
    assert {s["parent_span_id"] for s in steps} == {root}
    assert {r.trace_id for r in receipts.values()} == {trace_id}
    assert sorted(s["attributes"]["stepguard.step.name"] for s in steps) == [
        "gate", "gate_other", "ingest.0", "ingest.1", "train"]
    mapped = {s["attributes"]["stepguard.step.name"]: s["attributes"].get("stepguard.map_index")
              for s in steps}
    assert mapped["ingest.0"] == 0 and mapped["ingest.1"] == 1 and mapped["train"] is None


def test_signing_gate_and_digests_are_in_the_audit_trail_alone(pipeline):
    _settings, receipts, log = pipeline
    spans = records_from_log(log)
    published = receipts["train"].output("model").published
    assert published is not None and published.signer.startswith("key:sha256:")
    signs = [s for s in spans if s["name"] == "stepguard.signing.sign"]
    assert len(signs) == 2  # the model, then its provenance
    model_digest = receipts["train"].output("model").digest
    for sign in signs:
        a = sign["attributes"]
        assert a["stepguard.signing.signer"] == published.signer
        assert a["stepguard.method"] == "key"
        assert a["artifact.attestation.hash"].startswith("sha256:")
        assert a["stepguard.signing.subjects"]
    model_sign = signs[0]["attributes"]
    assert model_sign["artifact.attestation.hash"] == published.bundle_digest
    [pub_span] = [s for s in spans if s["name"] == "stepguard.registry.publish"]
    assert pub_span["attributes"]["artifact.hash"] == model_digest
    assert pub_span["attributes"]["artifact.attestation.hash"] == published.bundle_digest
    verifies = [s for s in spans if s["name"] == "stepguard.signing.verify"]
    by_kind = {(s["attributes"]["stepguard.kind"], s["status"]): s for s in verifies}
    gate = by_kind[("gate", "OK")]
    assert gate["attributes"]["stepguard.signing.policy"] == "release"
    assert gate["attributes"]["stepguard.signing.signer"] == published.signer
    [verdict] = [e["attributes"] for e in gate["events"]
                 if e["attributes"].get("stepguard.verdict.name") == "signing.verified"]
    assert verdict["stepguard.verdict.passed"] is True
    refused = by_kind[("gate", "ERROR")]
    assert refused["attributes"]["stepguard.signing.policy"] == "other"
    assert [e["attributes"]["stepguard.verdict.passed"] for e in refused["events"]
            if e["name"] == "stepguard.verdict"] == [False]
    assert by_kind[("input", "OK")]["attributes"]["stepguard.signing.policy"] == "ingestion"
    # artifact.* for every input and output digest
    hashed = {s["attributes"]["artifact.hash"] for s in spans
              if s["name"] in ("stepguard.integrity.hash", "stepguard.integrity.verify")}
    for r in receipts.values():
        assert {o.digest for o in r.outputs} <= hashed
        assert {i.digest for i in r.inputs} <= hashed
    # the receipts carry the verifications, with the accepted signer
    [gate_check] = receipts["gate"].verifications
    assert (gate_check.kind, gate_check.policy, gate_check.signer) == (
        "gate", "release", published.signer)
    assert receipts["gate_other"].verifications == ()
    assert receipts["train"].verifications[0].kind == "input"
    assert json.loads(receipts["gate"].to_json())["verifications"][0]["signer"] == published.signer


def test_audit_show_prints_signer_policy_verdict_and_mapped_instances(pipeline):
    _settings, receipts, log = pipeline
    text = audit.show(log)
    signer = receipts["train"].output("model").published.signer
    assert f"signer {signer}" in text
    assert "PASS signing.verified" in text and "policy=release" in text
    assert "FAIL signing.verified" in text and "policy=other" in text
    assert "step ingest.0" in text and "step ingest.1" in text
    assert "step ingest " not in text
    assert text.count(f"run {RUN}") == 1
