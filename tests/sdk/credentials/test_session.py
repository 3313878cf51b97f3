"""Per-step sessions against the real dev stack: OpenBao, PostgreSQL and moto.

Every test checks the effect where it lives: the PostgreSQL role in ``pg_roles``, the lease in
Vault (looked up with the root token), the token's own lookup.
"""

from __future__ import annotations

from typing import Any

import pytest

from stepguard.credentials import open_session
from stepguard.errors import CredentialDenied
from stepguard.spec import CredentialRequest, RunContext

pytestmark = pytest.mark.services

DB = CredentialRequest(name="db", kind="database", role="stepguard-step")


def _lease_ids(session: Any) -> list[str]:
    return [i.lease_id for i in session._issued if i.lease_id]


def test_database_lease_works_and_is_gone_after_success(vault_cfg, dev_postgres, probes,
                                                         vault_client):
    import psycopg2

    ctx = RunContext(pipeline="train_dag", run_id="manual__1", step="train", try_number=2)
    with open_session([DB], settings=vault_cfg, context=ctx, ttl_s=120) as session:
        creds = session.values["db"]
        user = creds.reveal("username")
        conn = psycopg2.connect(host=dev_postgres.host, port=dev_postgres.port,
                                dbname=dev_postgres.database, user=user,
                                password=creds.reveal("password"), sslmode="disable")
        with conn.cursor() as cur:
            cur.execute("select current_user")
            assert cur.fetchone()[0] == user
        conn.close()
        assert probes.role_exists(user)
        lease_ids = _lease_ids(session)
        assert lease_ids and probes.lease_exists(lease_ids[0])
        # The child token carries the run's identity and only the declared policies.
        tok = session.token
        assert tok is not None and tok.child
        assert tok.metadata["run_id"] == "manual__1" and tok.metadata["try"] == "2"
        assert set(tok.policies) <= {"default", "stepguard-step"}
        step_token = session._step_token
        env = session.env()
        assert env["DB_USERNAME"] == user and "DB_PASSWORD" in env
    assert not probes.role_exists(user)
    assert not probes.lease_exists(lease_ids[0])
    rec = session.leases[0]
    assert rec.revoked and rec.revoked_by == "lease" and rec.revocable and not rec.static
    assert rec.lease_id_hash and lease_ids[0] not in repr(session.leases)
    assert session.token.revoked and session.revocation_ok
    import hvac.exceptions

    with pytest.raises(hvac.exceptions.Forbidden):
        vault_client.adapter.post("/v1/auth/token/lookup", json={"token": step_token})


def test_revoked_after_exception_in_body(vault_cfg, probes, vault_client):
    with pytest.raises(RuntimeError, match="body failed"):
        with open_session([DB], settings=vault_cfg, context=RunContext(step="x"),
                          ttl_s=60) as session:
            user = session.values["db"].reveal("username")
            lease_id = _lease_ids(session)[0]
            raise RuntimeError("body failed")
    assert not probes.role_exists(user)
    assert not probes.lease_exists(lease_id)


def test_child_token_cannot_exceed_declared_policies(vault_cfg):
    """A step that declares a policy its parent lacks gets no token at all."""
    with pytest.raises(CredentialDenied):
        with open_session([DB], settings=vault_cfg, context=RunContext(), ttl_s=60,
                          policies=["root"]):
            pass


def test_child_token_without_database_policy_is_denied(vault_cfg, vault_client):
    with pytest.raises(CredentialDenied) as info:
        with open_session([DB], settings=vault_cfg, context=RunContext(), ttl_s=60,
                          policies=["default"]):
            pass
    assert "database/creds/stepguard-step" in str(info.value)


def test_declared_policies_are_refused_not_ignored_without_a_child_token(dev_stack):
    """An in-pod JWT/Kubernetes login uses its own token as the step token; declared policies
    could not narrow it, so asking for them is an error rather than silently dropped."""
    import warnings

    from stepguard.credentials import TokenAuth, VaultConfig
    from stepguard.errors import ConfigurationError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auth = TokenAuth(dev_stack.vault_root_token)
    cfg = VaultConfig(addr=dev_stack.vault_addr, auth=auth, child_token=False)
    with pytest.raises(ConfigurationError, match="declares policies"):
        with open_session([DB], settings=cfg, context=RunContext(step="x"), ttl_s=60,
                          policies=["read-train-db"]):
            pass
