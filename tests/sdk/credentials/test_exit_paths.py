"""Revocation on every exit path a step runner can take: SIGTERM, SIGKILL (token TTL),
a deadline-style interruption, and a long step kept alive by background renewal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from stepguard.credentials import VaultConfig, open_session
from stepguard.credentials._renewal import RENEWALS as _RENEWALS
from stepguard.spec import CredentialRequest, RunContext

pytestmark = [pytest.mark.services]

DB = CredentialRequest(name="db", kind="database", role="stepguard-step")

RUNNER = textwrap.dedent("""
    import json, signal, sys, time
    from stepguard.credentials import VaultConfig, open_session, revoke_open_sessions
    mode = sys.argv[4]
    if mode == "audit":
        from stepguard.audit import install_signal_flush
        assert install_signal_flush()
    elif mode == "foreign":
        # Like Airflow 3's task runner: the handler calls on_kill() and does not raise.
        def on_term(signum, frame):
            n = revoke_open_sessions()
            open(sys.argv[1] + ".killed", "w").write(str(n))
        signal.signal(signal.SIGTERM, on_term)
    from stepguard.spec import CredentialRequest, RunContext
    cfg = VaultConfig.from_env()
    cfg = VaultConfig(**{**cfg.__dict__, "token_heartbeat_s": float(sys.argv[2])})
    req = CredentialRequest(name="db", kind="database", role="stepguard-step")
    with open_session([req], settings=cfg, context=RunContext(step="runner"),
                      ttl_s=float(sys.argv[3])) as s:
        info = {"user": s.values["db"].reveal("username"),
                "lease": [i.lease_id for i in s._issued][0]}
        with open(sys.argv[1], "w") as fh:
            json.dump(info, fh)
        time.sleep(120)
""")


def _runner_env(dev_stack, approle_auth):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "STEPGUARD_"))}
    env.update(VAULT_ADDR=dev_stack.vault_addr, VAULT_ROLE_ID=approle_auth.role_id,
               VAULT_SECRET_ID=approle_auth.secret_id)
    return env


def _start_runner(tmp_path, dev_stack, approle_auth, heartbeat, ttl, mode="plain"):
    out = tmp_path / "runner.json"
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(out), str(heartbeat), str(ttl),
                             mode],
                            env=_runner_env(dev_stack, approle_auth), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not out.exists() or not out.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"runner did not start: {err.decode()[-2000:]}")
        time.sleep(0.1)
    return proc, json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["plain", "audit"])
def test_sigterm_of_runner_revokes(tmp_path, dev_stack, approle_auth, probes, mode):
    """Plain runner, and a runner whose audit flush handler was installed first (it would
    otherwise die by the default action after flushing, skipping revocation)."""
    proc, info = _start_runner(tmp_path, dev_stack, approle_auth, heartbeat=300, ttl=600,
                               mode=mode)
    assert probes.role_exists(info["user"]) and probes.lease_exists(info["lease"])
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=20)
    assert rc == 128 + signal.SIGTERM
    # Revoked by the runner itself before it exited: no waiting on a TTL.
    assert not probes.role_exists(info["user"])
    assert not probes.lease_exists(info["lease"])


def test_foreign_sigterm_handler_can_revoke_open_sessions(tmp_path, dev_stack, approle_auth,
                                                          probes):
    """A host handler that does not raise (Airflow's on_kill path) revokes via
    revoke_open_sessions(); the process itself keeps running."""
    proc, info = _start_runner(tmp_path, dev_stack, approle_auth, heartbeat=300, ttl=600,
                               mode="foreign")
    try:
        proc.send_signal(signal.SIGTERM)
        marker = tmp_path / "runner.json.killed"
        assert probes.wait_for(marker.exists, timeout=15)
        assert marker.read_text() == "1"
        assert proc.poll() is None
        assert not probes.role_exists(info["user"])
        assert not probes.lease_exists(info["lease"])
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_sigkill_of_runner_revoked_by_token_ttl(tmp_path, dev_stack, approle_auth, probes):
    """SIGKILL runs no cleanup: the child token's short TTL (4 s) is what revokes the lease."""
    proc, info = _start_runner(tmp_path, dev_stack, approle_auth, heartbeat=4, ttl=5)
    assert probes.role_exists(info["user"])
    proc.kill()
    proc.wait(timeout=10)
    # The database role itself grants 300 s; only the token's expiry can take it down now.
    assert probes.wait_for(lambda: not probes.role_exists(info["user"]), timeout=25)
    assert not probes.lease_exists(info["lease"])


def test_deadline_interrupt_still_revokes(vault_cfg, probes):
    """The lifecycle enforces deadlines by interrupting the body (StepTimeout); whatever
    exception ends the block, the session revokes."""
    from stepguard.errors import StepTimeout

    with pytest.raises(StepTimeout):
        with open_session([DB], settings=vault_cfg, context=RunContext(step="slow"),
                          ttl_s=5) as session:
            user = session.values["db"].reveal("username")
            lease = session._issued[0].lease_id
            raise StepTimeout("step body exceeded its deadline", subject="slow")
    assert not probes.role_exists(user)
    assert not probes.lease_exists(lease)


@pytest.mark.slow
def test_long_step_renews_token_and_stops_at_exit(dev_stack, approle_auth, vault_client):
    # Heartbeat 5 s, renewed at ~3.3 s: slack for a loaded 2-core machine.
    cfg = VaultConfig(addr=dev_stack.vault_addr, auth=approle_auth, token_heartbeat_s=5)
    with open_session([DB], settings=cfg, context=RunContext(step="long"), ttl_s=60) as s:
        assert s.token.ttl_s <= 5 and s.token.explicit_max_ttl_s == 60
        time.sleep(8.5)  # past the first heartbeat TTL: alive only if renewed
        body = s.step_api().request("GET", "auth/token/lookup-self", what="test lookup")
        assert body["data"]["ttl"] > 0
        assert s.token.renewals >= 2
        assert _RENEWALS.scheduled(s)
    assert s.token.revoked
    assert not _RENEWALS.scheduled(s)
    renewals = s.token.renewals
    time.sleep(4)  # past the next due time: nothing renews a revoked session
    assert s.token.renewals == renewals
    # One renewal thread serves the whole process, however many sessions ran.
    assert len([t for t in threading.enumerate() if t.name.startswith("stepguard-renew")]) <= 1
