"""Sandbox cost: start-and-stop overhead, and a CPU-bound body's throughput inside vs outside.

    .venv/bin/python benchmarks/bench_isolation.py [--quick] [--n N]

1. Start+stop: ``/bin/true`` run through ``run_isolated`` in the bubblewrap sandbox (all
   namespaces, binds, synthetic /etc files, cgroup for limits, deadline watch, tree kill) against
   a plain ``subprocess.run(["/bin/true"])``. Median of N runs each, interleaved; the figure is
   the added milliseconds (target <= 50 ms). ``process`` mode is shown too.
2. Throughput: the same CPU-bound Python body (SHA-256 over 64 KiB blocks) run in the sandbox and
   as a plain subprocess; the body times its own work, so interpreter start-up is excluded.
   Median of the per-run rates, interleaved; ratio inside/outside (target >= 0.97x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stepguard.isolation import run_isolated
from stepguard.isolation._sandbox import build_bwrap
from stepguard.spec import IsolationSpec

SANDBOX = IsolationSpec(mode="sandbox")
PROCESS = IsolationSpec(mode="process")

BODY = """
import hashlib, time, sys
block = b'x' * 65536
n = int(sys.argv[1])
t0, c0 = time.perf_counter(), time.process_time()
for _ in range(n):
    hashlib.sha256(block).digest()
t1, c1 = time.perf_counter(), time.process_time()
print(n * len(block) / (t1 - t0), n * len(block) / (c1 - c0))
"""


def bare_bwrap() -> None:
    """The same bwrap sandbox without stepguard's bookkeeping (cgroup, handshake, sweeps)."""
    plan = build_bwrap(["/bin/true"], uid=65534, ro_binds={}, rw_binds={}, extra_ro=(),
                       secret_files={}, cwd=None, gpus=0, share_net=False, bind_python=True,
                       tmp_size=1 << 30, drop_privileges=False)
    try:
        subprocess.run(plan.argv, pass_fds=plan.pass_fds, check=True)
    finally:
        for fd in plan.pass_fds:
            os.close(fd)


def start_stop(n: int) -> dict[str, float]:
    times: dict[str, list[float]] = {"plain": [], "process": [], "bwrap": [], "sandbox": []}
    for _ in range(3):  # warm caches
        subprocess.run(["/bin/true"], check=True)
        run_isolated(["/bin/true"], SANDBOX, deadline_s=30)
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(["/bin/true"], check=True)
        times["plain"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_isolated(["/bin/true"], PROCESS, deadline_s=30)
        times["process"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        bare_bwrap()
        times["bwrap"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r = run_isolated(["/bin/true"], SANDBOX, deadline_s=30)
        times["sandbox"].append(time.perf_counter() - t0)
        assert r.exit_code == 0
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def throughput(reps: int, blocks: int) -> dict[str, float]:
    """Median rates: per wall-clock second and per CPU second, inside and outside."""
    rates: dict[str, list[float]] = {"in_wall": [], "in_cpu": [], "out_wall": [], "out_cpu": []}
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rate"
        for _ in range(reps):
            r = subprocess.run([sys.executable, "-c", BODY, str(blocks)], capture_output=True,
                               text=True, check=True)
            wall, cpu = map(float, r.stdout.split())
            rates["out_wall"].append(wall)
            rates["out_cpu"].append(cpu)
            run_isolated([sys.executable, "-c", BODY, str(blocks)], SANDBOX, deadline_s=300,
                         stdout=out)
            wall, cpu = map(float, out.read_text().split())
            rates["in_wall"].append(wall)
            rates["in_cpu"].append(cpu)
    return {k: statistics.median(v) for k, v in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--n", type=int, default=None, help="start+stop runs (default 200, quick 20)")
    args = ap.parse_args()
    n = args.n or (20 if args.quick else 200)
    reps, blocks = (3, 2000) if args.quick else (9, 30000)

    ms = start_stop(n)
    added = ms["sandbox"] - ms["plain"]
    print(f"start+stop /bin/true, median of {n}:")
    print(f"  plain subprocess.run      {ms['plain']:7.2f} ms   (baseline)")
    print(f"  run_isolated(process)     {ms['process']:7.2f} ms   (+{ms['process'] - ms['plain']:.2f} ms)")
    print(f"  bare bwrap, same sandbox  {ms['bwrap']:7.2f} ms   (+{ms['bwrap'] - ms['plain']:.2f} ms: "
          "the kernel's namespace and mount work)")
    print(f"  run_isolated(sandbox)     {ms['sandbox']:7.2f} ms   (+{added:.2f} ms added; "
          f"ratio {ms['sandbox'] / ms['plain']:.2f}x; target <= +50 ms: "
          f"{'met' if added <= 50 else 'NOT met'})")

    t = throughput(reps, blocks)
    print(f"CPU-bound body (SHA-256, {blocks} x 64 KiB), median of {reps}, interleaved:")
    for unit, key in (("per wall-clock second", "wall"), ("per CPU second", "cpu")):
        ratio = t[f"in_{key}"] / t[f"out_{key}"]
        print(f"  {unit}: outside {t[f'out_{key}'] / 1e6:7.1f} MB/s (baseline), inside "
              f"{t[f'in_{key}'] / 1e6:7.1f} MB/s, ratio {ratio:.3f}x (target >= 0.97x: "
              f"{'met' if ratio >= 0.97 else 'NOT met'})")


if __name__ == "__main__":
    main()
