"""Fixed overhead of a secured step's credential handling against the local OpenBao.

One "step" here is a trivial body. The baseline runs it bare; the secured run wraps it in
``open_session`` with one database credential: AppRole login, child token, one dynamic
PostgreSQL user, then lease and token revocation. The difference is the fixed cost stepguard adds
to every step that asks for credentials. The database engine's own user creation (Vault's
``database/creds`` round trip, which runs CREATE ROLE in PostgreSQL) is reported separately.

    .venv/bin/python benchmarks/bench_credentials.py            # 1000 runs
    .venv/bin/python benchmarks/bench_credentials.py --quick    # 20 runs
    STEPGUARD_TEST_DEV_DIR=~/.stepguard/dev .venv/bin/python benchmarks/bench_credentials.py

Starts its own dev stack (``stepguard.testing.devstack.up``) in a temporary directory unless
``STEPGUARD_TEST_DEV_DIR`` names a running one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def row(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (f"{name:<34} p50 {pct(ms, 50):8.2f} ms   p95 {pct(ms, 95):8.2f} ms   "
            f"mean {statistics.fmean(ms):8.2f} ms")


def body() -> int:
    # The step's own work is not what is measured: a fixed, tiny amount of it.
    return sum(range(1000))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 runs instead of 1000")
    parser.add_argument("--runs", type=int, default=None)
    args = parser.parse_args()
    runs = args.runs or (20 if args.quick else 1000)

    from stepguard.credentials import AppRoleAuth, VaultConfig, open_session
    from stepguard.spec import CredentialRequest, RunContext
    from stepguard.testing import devstack

    reuse = os.environ.get("STEPGUARD_TEST_DEV_DIR")
    tmp = None
    if reuse:
        info = devstack.status(Path(reuse))
        if info is None:
            print(f"no running dev stack in {reuse}", file=sys.stderr)
            return 2
        state_dir = None
    else:
        tmp = tempfile.mkdtemp(prefix="bench-credentials-")
        state_dir = Path(tmp) / "dev"
        info = devstack.up(state_dir)
    try:
        if info.postgres is None:
            print("PostgreSQL is not installed: the database lease cannot be measured",
                  file=sys.stderr)
            return 2
        assert info.approle_secret_id_file is not None
        auth = AppRoleAuth(role_id=info.approle_role_id,
                           secret_id=info.approle_secret_id_file.read_text().strip())
        cfg = VaultConfig(addr=info.vault_addr, auth=auth)
        req = CredentialRequest(name="db", kind="database", role="stepguard-step")

        def secured(i: int) -> dict[str, float]:
            ctx = RunContext(pipeline="bench", run_id=f"bench-{i}", step="step")
            t0 = time.perf_counter()
            with open_session([req], settings=cfg, context=ctx, ttl_s=600,
                              handle_sigterm=False) as s:
                body()
            total = time.perf_counter() - t0
            t = s.timings
            return {"total": total, "login": t["login_s"], "token": t["token_s"],
                    "db_issue": s.leases[0].issue_s, "revoke": t["revoke_s"]}

        import http.client
        import json
        from urllib.parse import urlsplit

        url = urlsplit(info.vault_addr)
        role_id = info.approle_role_id
        secret_id = info.approle_secret_id_file.read_text().strip()

        def bare(i: int) -> float:
            """The same five calls with nothing around them: bare http.client, one connection."""
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=5)

            def call(method: str, path: str, token: str | None, body: object = None) -> dict:
                headers = {"X-Vault-Token": token} if token else {}
                conn.request(method, f"/v1/{path}", headers=headers,
                             body=None if body is None else json.dumps(body))
                resp = conn.getresponse()
                data = resp.read()
                assert resp.status < 300, (path, resp.status)
                return json.loads(data) if data else {}

            t0 = time.perf_counter()
            login = call("POST", "auth/approle/login", None,
                         {"role_id": role_id, "secret_id": secret_id})["auth"]["client_token"]
            child = call("POST", "auth/token/create", login,
                         {"policies": ["stepguard-step"], "ttl": "300s",
                          "explicit_max_ttl": "600s", "meta": {"run_id": f"bare-{i}"}}
                         )["auth"]["client_token"]
            lease = call("GET", "database/creds/stepguard-step", child)["lease_id"]
            body()
            call("PUT", "sys/leases/revoke", child, {"lease_id": lease})
            call("POST", "auth/token/revoke-self", login)
            elapsed = time.perf_counter() - t0
            conn.close()
            return elapsed

        def via_hvac(i: int) -> float:
            """The same 5 calls through hvac, as VaultClient.hvac() builds it for Transit:
            why the session's critical path keeps its own http.client transport."""
            from stepguard.credentials import VaultClient

            t0 = time.perf_counter()
            vc = VaultClient(VaultConfig(addr=info.vault_addr, auth=None))
            h = vc.hvac()
            login = h.auth.approle.login(role_id=role_id, secret_id=secret_id)["auth"]
            h.token = login["client_token"]
            child = h.auth.token.create(policies=["stepguard-step"], ttl="300s",
                                        explicit_max_ttl="600s",
                                        meta={"run_id": f"hvac-{i}"})["auth"]["client_token"]
            login_token, h.token = h.token, child
            lease = h.secrets.database.generate_credentials("stepguard-step")["lease_id"]
            body()
            h.sys.revoke_lease(lease)
            h.token = login_token
            h.auth.token.revoke_self()
            elapsed = time.perf_counter() - t0
            vc.close()
            return elapsed

        for i in range(3):  # warm up connections and the database plugin
            secured(-i)
            bare(-i)
            via_hvac(-i)
        from stepguard.credentials._api import VaultApi

        # The floor: one round trip through the same client stack the session uses.
        floor_api = VaultApi(VaultConfig(addr=info.vault_addr, auth=None))
        floor_api.request("GET", "sys/health", what="health")
        base: list[float] = []
        floor: list[float] = []
        bare_runs: list[float] = []
        sec: list[dict[str, float]] = []
        hvac_runs: list[float] = []
        for i in range(runs):
            t0 = time.perf_counter()
            body()
            base.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            floor_api.request("GET", "sys/health", what="health")
            floor.append(time.perf_counter() - t0)
            sec.append(secured(i))
            bare_runs.append(bare(i))
            hvac_runs.append(via_hvac(i))
        overhead = [s["total"] - b for s, b in zip(sec, base, strict=True)]
        db_issue = [s["db_issue"] for s in sec]
        without_db = [o - d for o, d in zip(overhead, db_issue, strict=True)]

        print(f"credentials benchmark: {runs} runs, local OpenBao {info.vault_addr}, "
              f"PostgreSQL {info.postgres.port}; machine: {os.cpu_count()} cores, shared")
        print(row("baseline: step without credentials", base))
        print(row("secured: step with one DB lease", [s["total"] for s in sec]))
        print(row("overhead (secured - baseline)", overhead))
        print(row("  of which AppRole login", [s["login"] for s in sec]))
        print(row("  of which child token", [s["token"] for s in sec]))
        print(row("  of which DB engine user creation", db_issue))
        print(row("  of which revoke (lease + tokens)", [s["revoke"] for s in sec]))
        print(row("overhead excluding DB user creation", without_db))
        print(row("floor: one Vault round trip (health)", floor))
        print(row("floor: the 5 calls, bare http.client", bare_runs))
        print(row("the 5 calls through hvac (requests)", hvac_runs))
        print(f"hvac / our transport for the 5 calls, p50: "
              f"{pct(hvac_runs, 50) / max(pct(overhead, 50), 1e-9):.2f}x, p95: "
              f"{pct(hvac_runs, 95) / max(pct(overhead, 95), 1e-9):.2f}x")
        ours = [o - b for o, b in zip(overhead, bare_runs, strict=True)]
        print(f"stepguard's own code (overhead - bare calls): p50 {pct(ours, 50) * 1000:.2f} ms, "
              f"mean {statistics.fmean(ours) * 1000:.2f} ms")
        print(f"the secured path makes 5 Vault calls (login, child token, DB creds, lease revoke, "
              f"token-tree revoke); overhead p50 = {pct(overhead, 50) / pct(floor, 50):.1f} "
              f"round trips of this machine right now")
        ratio = pct(overhead, 95) / max(pct(base, 95), 1e-9)
        print(f"ratio secured/baseline p95: {pct([s['total'] for s in sec], 95) / max(pct(base, 95), 1e-9):,.0f}x "
              f"(baseline is a no-op body; the absolute overhead is the figure that matters)")
        target = 0.020
        verdict = "meets" if pct(overhead, 95) <= target else "misses"
        print(f"target: overhead p95 <= 20 ms -> {verdict} ({pct(overhead, 95) * 1000:.1f} ms); "
              f"overhead/baseline p95 {ratio:,.0f}x")
    finally:
        if state_dir is not None:
            devstack.down(state_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
