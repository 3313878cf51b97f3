"""Vault down, slow, overloaded then recovering, refusing; and a retried issuance that must not
leave an orphan lease. A small HTTP proxy in front of the real OpenBao injects the faults."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from stepguard.credentials import VaultConfig, open_session
from stepguard.errors import CredentialDenied, TransientCredentialError
from stepguard.spec import CredentialRequest, RunContext

pytestmark = pytest.mark.services

DB = CredentialRequest(name="db", kind="database", role="stepguard-step")
CREDS = "/v1/database/creds/stepguard-step"
PREFIX = "database/creds/stepguard-step/"


def _cfg(addr, auth, **kw):
    base = {"timeout_s": 1.0, "retry_total_s": 8.0, "retry_backoff_s": 0.05}
    base.update(kw)
    return VaultConfig(addr=addr, auth=auth, **base)


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vault_down_gives_one_clear_error_after_bounded_retries(approle_auth, caplog):
    caplog.set_level(logging.DEBUG)
    cfg = _cfg(f"http://127.0.0.1:{_closed_port()}", approle_auth)
    t0 = time.monotonic()
    with pytest.raises(TransientCredentialError) as info:
        with open_session([DB], settings=cfg, context=RunContext(), ttl_s=60):
            pytest.fail("no session without Vault")
    elapsed = time.monotonic() - t0
    assert elapsed < cfg.retry_total_s + 2
    err = info.value
    assert "Vault unreachable" in str(err) and "4 attempt(s)" in err.diagnostics()
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 3
    assert approle_auth.secret_id not in caplog.text


def test_vault_slow_times_out_each_call(fault_proxy, approle_auth):
    fault_proxy.rule = lambda m, p, n: ("delay", 3.0) if p.endswith("/login") else "pass"
    cfg = _cfg(fault_proxy.url, approle_auth, timeout_s=0.5, retry_total_s=5)
    t0 = time.monotonic()
    with pytest.raises(TransientCredentialError) as info:
        with open_session([DB], settings=cfg, context=RunContext(), ttl_s=60):
            pass
    assert time.monotonic() - t0 < 6.5
    assert "timed out" in info.value.diagnostics()
    assert fault_proxy.counts["/v1/auth/approle/login"] == 4


def test_503_then_recovery(fault_proxy, approle_auth, probes):
    fault_proxy.rule = lambda m, p, n: ("status", 503) if p == CREDS and n <= 2 else "pass"
    cfg = _cfg(fault_proxy.url, approle_auth)
    with open_session([DB], settings=cfg, context=RunContext(), ttl_s=60) as s:
        user = s.values["db"].reveal("username")
        assert probes.role_exists(user)
    assert fault_proxy.counts[CREDS] == 3
    assert not probes.role_exists(user)


def test_429_and_502_are_retried_500_is_not(fault_proxy, approle_auth):
    from stepguard.errors import CredentialError

    fault_proxy.rule = lambda m, p, n: (("status", 429) if n == 1 else ("status", 502)
                                        if n == 2 else "pass") if p == CREDS else "pass"
    with open_session([DB], settings=_cfg(fault_proxy.url, approle_auth),
                      context=RunContext(), ttl_s=60):
        pass
    assert fault_proxy.counts[CREDS] == 3
    fault_proxy.counts.clear()
    fault_proxy.rule = lambda m, p, n: ("status", 500) if p == CREDS else "pass"
    with pytest.raises(CredentialError) as info:
        with open_session([DB], settings=_cfg(fault_proxy.url, approle_auth),
                          context=RunContext(), ttl_s=60):
            pass
    assert not isinstance(info.value, TransientCredentialError)
    assert fault_proxy.counts[CREDS] == 1


def _live_tokens_of_run(vault_client, run_id):
    keys = vault_client.adapter.list("/v1/auth/token/accessors")["data"]["keys"]
    live = []
    for acc in keys:
        try:
            data = vault_client.adapter.post("/v1/auth/token/lookup-accessor",
                                             json={"accessor": acc})["data"]
        except Exception:
            continue
        if (data.get("meta") or {}).get("run_id") == run_id:
            live.append(acc)
    return live


def test_403_is_denied_at_once_and_token_still_revoked(fault_proxy, approle_auth,
                                                       vault_client):
    fault_proxy.rule = lambda m, p, n: ("status", 403) if p == CREDS else "pass"
    ctx = RunContext(run_id="run-403")
    seen_token = []
    orig = fault_proxy.rule
    fault_proxy.rule = lambda m, p, n: (seen_token.append(
        _live_tokens_of_run(vault_client, "run-403")) or orig(m, p, n)) if p == CREDS \
        else orig(m, p, n)
    t0 = time.monotonic()
    with pytest.raises(CredentialDenied) as info:
        with open_session([DB], settings=_cfg(fault_proxy.url, approle_auth),
                          context=ctx, ttl_s=60):
            pass
    assert time.monotonic() - t0 < 5
    assert fault_proxy.counts[CREDS] == 1
    assert "HTTP 403" in str(info.value)
    # The child token existed when the refusal came, and was revoked on the way out.
    assert seen_token and len(seen_token[0]) == 1
    assert _live_tokens_of_run(vault_client, "run-403") == []


def test_retried_issuance_leaves_no_orphan_lease(fault_proxy, approle_auth, probes):
    """Vault creates the user and the lease, the response is lost, the retry creates a second
    one. Both are under the step token, so the session's exit takes both down."""
    fault_proxy.rule = lambda m, p, n: "drop_response" if p == CREDS and n == 1 else "pass"
    before_leases = set(probes.leases_under(PREFIX))
    before_roles = probes.dynamic_roles()
    with open_session([DB], settings=_cfg(fault_proxy.url, approle_auth),
                      context=RunContext(step="orphan"), ttl_s=60) as s:
        assert fault_proxy.counts[CREDS] == 2
        new_leases = set(probes.leases_under(PREFIX)) - before_leases
        new_roles = probes.dynamic_roles() - before_roles
        assert len(new_leases) == 2, "the dropped response did create a lease"
        assert len(new_roles) == 2
        assert s.values["db"].reveal("username") in new_roles
    # The orphan is not in the session's records, yet revoking the token revoked it.
    assert probes.wait_for(lambda: not (set(probes.leases_under(PREFIX)) & new_leases), 15)
    assert probes.wait_for(lambda: not (probes.dynamic_roles() & new_roles), 15)


@pytest.mark.slow
def test_revocation_does_not_wait_for_a_hanging_renewal(fault_proxy, approle_auth, probes):
    """Vault hangs on renewal: revocation (e.g. at SIGTERM, inside a grace period) waits at
    most one request timeout for the renewal in flight, then revokes anyway."""
    fault_proxy.rule = lambda m, p, n: ("delay", 20) if p.endswith("/renew-self") else "pass"
    cfg = _cfg(fault_proxy.url, approle_auth, token_heartbeat_s=3, retry_total_s=20)
    with open_session([DB], settings=cfg, context=RunContext(step="hang"), ttl_s=60) as s:
        user = s.values["db"].reveal("username")
        time.sleep(2.6)  # the renewal (due at 2 s) is now stuck in Vault
        assert any(p.endswith("/renew-self") for _, p, _ in fault_proxy.seen)
        t0 = time.monotonic()
    took = time.monotonic() - t0
    assert took < cfg.timeout_s + 2, took
    assert s.revocation_ok
    assert not probes.role_exists(user)


@pytest.mark.slow
def test_one_sessions_broken_renewal_does_not_stop_the_others(dev_stack, approle_auth,
                                                             caplog):
    """One renewal thread serves the process: an unexpected error in one session's renewal is
    logged (no values) and the other sessions go on being renewed."""
    cfg = VaultConfig(addr=dev_stack.vault_addr, auth=approle_auth, token_heartbeat_s=3)
    caplog.set_level(logging.WARNING, logger="stepguard.credentials")
    with open_session([], settings=cfg, context=RunContext(step="bad"), ttl_s=60,
                      handle_sigterm=False) as bad, \
            open_session([], settings=cfg, context=RunContext(step="good"), ttl_s=60,
                         handle_sigterm=False) as good:

        def broken(remaining: float) -> None:
            raise KeyError("internal")

        bad._renew_once = broken  # type: ignore[method-assign]
        time.sleep(4.5)
        assert good.token.renewals >= 1
    assert "renewal for step bad failed unexpectedly (KeyError)" in caplog.text
    assert good.revocation_ok and bad.revocation_ok


@pytest.mark.slow
def test_a_hanging_renewal_does_not_starve_other_sessions(fault_proxy, dev_stack, approle_auth):
    """One session's Vault hangs on renewal (a whole retry budget per attempt); a second
    session in the same process must still be renewed on time, or its short-TTL token expires
    under a running step."""
    fault_proxy.rule = lambda m, p, n: ("delay", 20) if p.endswith("/renew-self") else "pass"
    stuck_cfg = VaultConfig(addr=fault_proxy.url, auth=approle_auth, token_heartbeat_s=3,
                            timeout_s=15)
    good_cfg = VaultConfig(addr=dev_stack.vault_addr, auth=approle_auth, token_heartbeat_s=3)
    with open_session([], settings=stuck_cfg, context=RunContext(step="stuck"), ttl_s=60,
                      handle_sigterm=False):
        time.sleep(2.5)  # the stuck session's renewal is now hanging
        with open_session([], settings=good_cfg, context=RunContext(step="good"), ttl_s=60,
                          handle_sigterm=False) as good:
            time.sleep(4.5)
            assert good.token.renewals >= 1
            # Still valid (an expired token is refused with 403, raised as CredentialDenied);
            # Vault reports a token in its last second as ttl 0, so the value is not compared.
            body = good.step_api().request("GET", "auth/token/lookup-self", what="lookup")
            assert body is not None and body["data"]["ttl"] >= 0
