"""Credentials through the whole step lifecycle (``stepguard.step.run_step``), and lease renewal
for a database role whose leases are shorter than the step.

Configured here with the root token (the dev stack has no such role): a database role
``stepguard-short`` with 3 s leases and a policy ``stepguard-short`` allowing only its creds.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import urllib.parse
import warnings

import pytest

from stepguard.credentials import TokenAuth, VaultConfig, open_session
from stepguard.spec import CredentialRequest, IsolationSpec, RunContext, StepSpec

pytestmark = pytest.mark.services


def forms(value: str) -> list[str]:
    raw = value.encode()
    return [value, value.upper(), value.lower(), base64.b64encode(raw).decode(),
            base64.b64encode(raw).decode().rstrip("="), urllib.parse.quote(value, safe=""),
            urllib.parse.quote_plus(value)]


@pytest.fixture
def short_role(vault_client):
    conn = vault_client.secrets.database.read_connection("stepguard-pg")["data"]
    vault_client.secrets.database.create_role(
        name="stepguard-short", db_name="stepguard-pg",
        creation_statements=['CREATE ROLE "{{name}}" WITH LOGIN PASSWORD \'{{password}}\' '
                             "VALID UNTIL '{{expiration}}';"],
        revocation_statements=['DROP ROLE IF EXISTS "{{name}}";'],
        default_ttl="5s", max_ttl="120s")
    allowed = set(conn.get("allowed_roles") or [])
    if "stepguard-short" not in allowed and "*" not in allowed:
        vault_client.adapter.post("/v1/database/config/stepguard-pg",
                                  json={"allowed_roles": sorted(allowed | {"stepguard-short"}),
                                        "verify_connection": False})
    vault_client.sys.create_or_update_policy(
        name="stepguard-short",
        policy='path "database/creds/stepguard-short" { capabilities = ["read"] }\n'
               'path "sys/leases/revoke" { capabilities = ["update"] }\n')
    return "stepguard-short"


@pytest.mark.slow
def test_short_leases_are_renewed_while_the_step_runs(dev_stack, short_role, probes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auth = TokenAuth(dev_stack.vault_root_token)
    cfg = VaultConfig(addr=dev_stack.vault_addr, auth=auth)
    req = CredentialRequest(name="db", kind="database", role=short_role)
    with open_session([req], settings=cfg, context=RunContext(step="renew"), ttl_s=60,
                      policies=[short_role]) as s:
        assert s.leases[0].ttl_s == 5
        lease = s._issued[0].lease_id
        user = s.values["db"].reveal("username")
        time.sleep(8)  # past the lease's own 5 s: alive only because it was renewed
        assert probes.lease_exists(lease) and probes.role_exists(user)
        assert s.leases[0].ttl_s > 5
    assert not probes.lease_exists(lease)
    assert not probes.role_exists(user)


def test_canary_absent_from_everything_a_full_step_produced(dev_stack, vault_client, tmp_path,
                                                             caplog, capfd, monkeypatch):
    from stepguard.settings import Settings
    from stepguard.step import run_step

    caplog.set_level(logging.DEBUG)
    canary = "StepCanary/+=42-secret"
    vault_client.secrets.kv.v2.create_or_update_secret(
        path="stepguard/step-canary", secret={"token": canary}, mount_point="secret")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VAULT_ROLE_ID", dev_stack.approle_role_id)
    monkeypatch.setenv("VAULT_SECRET_ID_FILE", str(dev_stack.approle_secret_id_file))
    audit_log = tmp_path / "audit.jsonl"
    settings = Settings.from_dict({
        "vault": {"addr": dev_stack.vault_addr, "auth": "approle"},
        "audit": {"exporter": "jsonl", "path": str(audit_log)},
        "state_dir": str(tmp_path / "state"),
    })
    spec = StepSpec(name="canary-step", isolation=IsolationSpec(mode="process"), deadline_s=60,
                    credentials=(CredentialRequest(name="api", kind="kv",
                                                   path="stepguard/step-canary"),
                                 CredentialRequest(name="db", kind="database",
                                                   role="stepguard-step")))
    issued: list[str] = []

    def body(env):
        issued.append(env.credentials["api"].reveal("token"))
        issued.append(env.credentials["db"].reveal("password"))
        logging.getLogger("user.step").info("credentials: %s %r", env.credentials,
                                            env.credentials["api"])
        raise RuntimeError(f"failing with {env.credentials['api']['token']}")

    with pytest.raises(Exception) as info:
        run_step(spec, body=body, settings=settings, context=RunContext(step="canary-step"))
    assert issued[0] == canary and issued[1]
    texts = [str(info.value), repr(info.value), caplog.text, *capfd.readouterr()]
    receipt = getattr(info.value, "receipt", None)
    assert receipt is not None and audit_log.exists()
    if receipt is not None:
        texts.append(receipt.to_json())
        assert receipt.credentials and all(c.lease is None or c.lease.startswith(("sha256:",
                                           "hmac-sha256:")) for c in receipt.credentials)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files, "the step produced no files: the file check would be vacuous"
    texts += [p.read_text(errors="replace") for p in files]
    for t in texts:
        for v in issued:
            for f in forms(v):
                assert f not in t
    if audit_log.exists():
        assert any(json.loads(line) for line in audit_log.read_text().splitlines() if line)


def test_a_slow_log_masker_does_not_let_short_ttls_expire(dev_stack, short_role, probes,
                                                          monkeypatch):
    """Each value is registered with the log masker after Vault answered, and Airflow's masker
    recompiles one regex over every secret it has seen, so in a long-lived process it slows down.
    TTLs count from the request and renewals are scheduled before the values are registered:
    with 1.2 s per registration, a 3 s step token and a 5 s database lease live through the
    step (scheduled from the end of registration, the token's first renewal came too late)."""
    from stepguard.audit import _redact

    def slow_sink(forms):
        time.sleep(1.2)

    monkeypatch.setattr(_redact._guard, "sinks", (*_redact._guard.sinks, slow_sink))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auth = TokenAuth(dev_stack.vault_root_token)
    cfg = VaultConfig(addr=dev_stack.vault_addr, auth=auth, token_heartbeat_s=3)
    req = CredentialRequest(name="db", kind="database", role=short_role)
    with open_session([req], settings=cfg, context=RunContext(step="slow-mask"), ttl_s=60,
                      policies=[short_role]) as s:
        lease = s._issued[0].lease_id
        time.sleep(6)  # past both first TTLs, counted from the requests
        body = s.step_api().request("GET", "auth/token/lookup-self", what="test lookup")
        assert body["data"]["ttl"] > 0
        assert probes.lease_exists(lease)
    assert s.token.revoked
    assert not probes.lease_exists(lease)
