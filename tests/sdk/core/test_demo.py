"""The main job: the secured training pipeline end to end on the real dev stack."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepguard.audit import verify_chain
from stepguard.cli._demo import run_pipeline
from stepguard.errors import IntegrityError

pytestmark = [pytest.mark.services, pytest.mark.sandbox, pytest.mark.slow]


def test_pipeline_runs_signs_gates_and_revokes(tmp_path, dev_stack, dev_postgres, pg_roles, capsys,
                                               monkeypatch):
    from stepguard.cli import _demo as demo

    seen = {}
    real_ingest = demo._ingest

    def spy(env, pg):
        seen["user"] = env.credentials["db"].reveal("username")
        seen["password"] = env.credentials["db"].reveal("password")
        return real_ingest(env, pg)

    monkeypatch.setattr(demo, "_ingest", spy)
    before = pg_roles()
    results = run_pipeline(tmp_path, dev_stack)
    captured = capsys.readouterr()
    out = captured.out

    ingest, train, gate = results["ingest"], results["train"], results["gate"]
    # the JIT database user existed only for the ingest step
    [lease] = ingest.credentials
    assert lease.kind == "database" and lease.revoked is True
    assert lease.lease.startswith("sha256:")
    assert pg_roles() == before
    # train verified its input against the ingest receipt and ran in the sandbox
    assert train.inputs[0].digest == ingest.output("dataset").digest
    assert train.isolation["mode"] == "sandbox"
    model = train.output("model")
    assert model.published is not None and model.published.signer.startswith("transit:")
    # the gate promoted exactly the verified model
    serving = Path(gate.output("serving").path) / "churn-model"
    assert (serving / "weights.json").is_file() and (serving / "metrics.json").is_file()
    # audit chain intact; the report says where it is
    settings = results["settings"]
    assert verify_chain(settings.audit_path).records > 5
    assert str(settings.audit_path) in out and "chain intact" in out
    # the report's next command traces the published model: intact, signer, the revoked lease
    import shlex

    from stepguard.cli import main

    [nxt] = [ln.split("next", 1)[1].strip() for ln in out.splitlines()
             if ln.strip().startswith("next ")]
    assert main(shlex.split(nxt)[1:]) == 0
    traced = capsys.readouterr().out
    assert "record intact" in traced and model.published.signer in traced
    assert f"lease {lease.lease}: revoked" in traced
    out += traced
    # the minted user is gone, and its password reached no receipt, log line or audit record
    assert seen["user"] not in pg_roles()
    import base64
    import urllib.parse

    pw = seen["password"]
    forms = {pw, pw.upper(), base64.b64encode(pw.encode()).decode(), urllib.parse.quote(pw)}
    files = [p for p in tmp_path.rglob("*") if p.is_file() and "dev" not in p.parts]
    blob = captured.out + captured.err + "".join(p.read_bytes().decode("latin-1") for p in files)
    for form in forms:
        assert form not in blob


def test_tampered_dataset_stops_before_training(tmp_path, dev_stack, dev_postgres, capsys):
    results = run_pipeline(tmp_path, dev_stack, tampered=True)
    out = capsys.readouterr().out
    assert "train" not in results and "gate" not in results
    err = results["train_error"]
    assert isinstance(err, IntegrityError)
    assert any("churn.csv" in d for d in err.details)
    assert err.receipt.status == "failed" and "body" not in err.receipt.timings_ms
    run_dir = tmp_path / "runs" / results["run_id"]
    assert not any((run_dir / "model").iterdir()), "training wrote a model from tampered data"
    assert "training never started" in out
