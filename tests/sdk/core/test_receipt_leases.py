"""A receipt carries the credentials session's own lease records (one type, one meaning of
``revoked``), and receipts written before they were one type still load. Real OpenBao."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from stepguard.receipt import LeaseRecord, Receipt
from stepguard.settings import Settings
from stepguard.spec import RunContext, StepSpec
from stepguard.step import run_step

pytestmark = [pytest.mark.services]


@pytest.fixture
def settings(dev_stack, monkeypatch, vault_client, tmp_path):
    vault_client.secrets.kv.v2.create_or_update_secret(
        path="stepguard/receipt-kv", secret={"api_key": "receipt-kv-canary-31"},
        mount_point="secret")
    monkeypatch.setenv("VAULT_ROLE_ID", dev_stack.approle_role_id)
    monkeypatch.setenv("VAULT_SECRET_ID_FILE", str(dev_stack.approle_secret_id_file))
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    return Settings.from_dict({"vault": {"addr": dev_stack.vault_addr, "auth": "approle"},
                               "audit": {"exporter": "none"},
                               "state_dir": str(tmp_path / "state")})


def _run(tmp_path: Path, settings: Settings) -> Receipt:
    spec = StepSpec.from_dict({
        "name": "train", "isolation": {"mode": "process"},
        "credentials": [{"name": "api", "kind": "kv", "path": "stepguard/receipt-kv"},
                        {"name": "db", "kind": "database", "role": "stepguard-step"}],
        "outputs": [{"name": "out", "path": str(tmp_path / "out" / "{run_id}")}],
    })
    return run_step(spec, command=[sys.executable, "-c", "pass"], settings=settings,
                    context=RunContext(run_id="leases-1", step="train"))


def test_receipt_says_what_the_session_recorded(tmp_path, settings):
    receipt = _run(tmp_path, settings)
    kv, db = receipt.credentials
    assert isinstance(kv, LeaseRecord) and isinstance(db, LeaseRecord)
    # Static: nothing to revoke, so never "revoked" -- one meaning, wherever the record is read.
    assert (kv.kind, kv.revocable, kv.static, kv.revoked, kv.lease) == (
        "kv", False, True, False, None)
    assert db.revocable and db.revoked and db.revoked_by == "lease" and db.error is None
    assert db.lease is not None and db.lease.startswith(("sha256:", "hmac-sha256:"))
    assert db.lease_id_hash == db.lease and db.ttl_s > 0 and db.issue_s > 0
    on_disk = json.loads(receipt.to_json())["credentials"]
    assert {"name", "kind", "lease", "revocable", "revoked", "static", "ttl_s"} <= set(on_disk[1])
    assert on_disk[0]["revoked"] is False and on_disk[1]["revoked"] is True
    assert "receipt-kv-canary-31" not in receipt.to_json()
    assert Receipt.from_json(receipt.to_json()) == receipt


def test_a_receipt_written_before_the_records_were_one_type_still_loads(tmp_path, settings):
    data = json.loads(_run(tmp_path, settings).to_json())
    for cred in data["credentials"]:
        for key in ("renewable", "issue_s", "revoked_by", "error"):
            del cred[key]
    data["credentials"][0]["revoked"] = None  # what a non-revocable credential could say then
    path = tmp_path / "old-receipt.json"
    path.write_text(json.dumps(data))
    kv, db = Receipt.load(path).credentials
    assert kv.revoked is False and not kv.revocable
    assert db.revoked is True and db.revoked_by is None and db.renewable is False
