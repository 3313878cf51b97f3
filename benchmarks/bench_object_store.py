"""Benchmark: steps that share no disk -- object-store inputs against plain boto3, same run.

Prints our figure, the baseline's and the ratio (baseline time / ours, so > 1.0 means we are
faster):

1. verified download of a mixed-size prefix into step scratch
   (:func:`stepguard.integrity.s3.download_and_verify`: hashed while written, never re-read)
   vs boto3 ``download_file`` of the same objects at the same concurrency (no verification);
2. verify-in-place from stored checksums (:func:`stepguard.integrity.s3.verify_s3`, no
   download) on many small objects vs a plain ``list_objects_v2`` + ``head_object`` loop, both
   sequential and at the same concurrency;
3. cross-worker consumer start: a secured step whose input is another step's object-store
   output, from its receipt to the verified input being ready (ms), next to the same step
   reading a local path.

    .venv/bin/python benchmarks/bench_object_store.py               # 256 MiB prefix, 10,000 objects
    .venv/bin/python benchmarks/bench_object_store.py --size-mib 1024   # the issue's 1 GiB
    .venv/bin/python benchmarks/bench_object_store.py --quick       # smoke run

Runs against a moto server this script starts on loopback (or ``AWS_ENDPOINT_URL`` if set,
with that environment's credentials). moto runs on the same cores as the client.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_mixed(root: Path, total_mib: int) -> Path:
    """Mixed sizes: half the bytes in 32 MiB files, a quarter in 1 MiB, a quarter in 64 KiB."""
    root.mkdir(parents=True)
    block = os.urandom(2**20)
    quarter = total_mib * 2**20 // 4
    big = max(1, (2 * quarter) // (32 * 2**20))
    for i in range(big):
        with open(root / f"shard-{i:04d}.bin", "wb") as fh:
            for _ in range(32):
                fh.write(block)
    (root / "mid").mkdir()
    for i in range(max(1, quarter // 2**20)):
        (root / "mid" / f"part-{i:05d}.bin").write_bytes(os.urandom(2**20))
    (root / "small").mkdir()
    for i in range(max(1, quarter // 2**16)):
        (root / "small" / f"row-{i:06d}.json").write_bytes(os.urandom(2**16))
    return root


def best(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def line(label: str, ours: float, base: float, unit: str, note: str) -> None:
    print(f"{label:36}{ours:>10.3f} {unit}{'':2}{base:>10.3f} {unit}{'':3}{base / ours:>6.2f}x"
          f"   {note}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--objects", type=int, default=10_000)
    ap.add_argument("--jobs", type=int, default=8, help="concurrency, ours and the baseline's")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.size_mib, a.objects, a.repeat = 32, 500, 1

    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    moto = None
    if not endpoint:
        port = free_port()
        moto = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
    work = Path(tempfile.mkdtemp(prefix="sg-bench-store-"))
    try:
        from stepguard.integrity.s3 import S3Location, download_and_verify, upload, verify_s3

        s3 = boto3.client("s3", endpoint_url=endpoint, config=Config(max_pool_connections=32))
        bucket = f"bench-{int(time.time())}"
        s3.create_bucket(Bucket=bucket)
        print(f"endpoint {endpoint}, concurrency {a.jobs}, load average "
              f"{os.getloadavg()[0]:.2f} at start")
        print(f"{'':36}{'stepguard':>13}{'baseline':>15}{'ratio':>10}")

        # -- 1. verified download into scratch vs download_file -----------------------------
        data = make_mixed(work / "mixed", a.size_mib)
        loc = S3Location(bucket, "mixed/")
        manifest = upload(data, loc, client=s3)
        keys = [(loc.key(e.path), e.path) for e in manifest.entries]
        n = 0

        def ours_download() -> None:
            nonlocal n
            n += 1
            download_and_verify(loc, manifest, work / f"ours-{n}", client=s3, jobs=a.jobs)

        def plain_download() -> None:
            nonlocal n
            n += 1
            dest = work / f"plain-{n}"

            def one(item: tuple[str, str]) -> None:
                target = dest / item[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, item[0], str(target))

            with ThreadPoolExecutor(max_workers=a.jobs) as pool:
                list(pool.map(one, keys))

        t_ours = t_plain = float("inf")
        for _ in range(a.repeat):
            t_plain = min(t_plain, best(plain_download, 1))
            t_ours = min(t_ours, best(ours_download, 1))
            for p in work.glob("ours-*"):
                for d, _, _ in os.walk(p):
                    os.chmod(d, 0o700)
                shutil.rmtree(p)
            for p in work.glob("plain-*"):
                shutil.rmtree(p)
        mib = manifest.total_size / 2**20
        line("verified download into scratch", t_ours, t_plain, "s ",
             f"({mib / t_ours:,.0f} vs {mib / t_plain:,.0f} MiB/s; {len(keys)} objects, "
             f"{mib:,.0f} MiB; baseline: download_file, unverified)")

        # -- 2. verify in place from stored checksums vs list + head ------------------------
        many = work / "many"
        many.mkdir()
        for i in range(a.objects):
            (many / f"o-{i:06d}.txt").write_bytes(f"object {i}\n".encode())
        mloc = S3Location(bucket, "many/")
        mmanifest = upload(many, mloc, client=s3, jobs=a.jobs)

        def ours_verify() -> None:
            verify_s3(mloc, mmanifest, client=s3, jobs=a.jobs)

        def listed() -> list[str]:
            out: list[str] = []
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                     Prefix=mloc.prefix):
                out += [o["Key"] for o in page.get("Contents", ())]
            return out

        def plain_loop() -> None:
            for key in listed():
                s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")

        def plain_parallel() -> None:
            with ThreadPoolExecutor(max_workers=a.jobs) as pool:
                list(pool.map(lambda k: s3.head_object(Bucket=bucket, Key=k,
                                                       ChecksumMode="ENABLED"), listed()))

        t_v = best(ours_verify, a.repeat)
        t_loop = best(plain_loop, 1)
        t_par = best(plain_parallel, a.repeat)
        line("verify in place (stored checksums)", t_v, t_loop, "s ",
             f"({a.objects / t_v:,.0f} vs {a.objects / t_loop:,.0f} objects/s; "
             f"baseline: list_objects_v2 + head_object loop)")
        line("  (same, baseline at same concurrency)", t_v, t_par, "s ",
             f"({a.objects / t_v:,.0f} vs {a.objects / t_par:,.0f} objects/s)")

        # -- 3. cross-worker consumer start vs local path ------------------------------------
        t_remote, t_local = consumer_start(work, bucket, repeat=max(3, a.repeat * 3))
        line("consumer start: receipt -> input ready", t_remote, t_local, "ms",
             "(object-store input vs the same 4 MiB input on a local path; verify_inputs)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=10)
    return 0


def consumer_start(work: Path, bucket: str, *, repeat: int) -> tuple[float, float]:
    """Median ``verify_inputs`` time (ms) of a consumer reading a producer's output through
    the object store (in another working and state dir) vs from a local path."""
    import statistics

    from stepguard.settings import Settings
    from stepguard.spec import RunContext, StepSpec
    from stepguard.step import run_step

    def body(env: Any) -> None:
        for i in range(16):
            (env.outputs["d"] / f"part-{i}.bin").write_bytes(os.urandom(2**18))

    times: dict[str, list[float]] = {"remote": [], "local": []}
    for i in range(repeat):
        for kind in ("remote", "local"):
            where = f"s3://{bucket}/runs/{{run_id}}/d" if kind == "remote" else \
                str(work / "local" / "{run_id}")
            prod = Settings.from_dict({"state_dir": str(work / f"p-{kind}-{i}"),
                                       "audit": {"exporter": "none"}})
            receipt = run_step(
                StepSpec.from_dict({"name": "produce", "isolation": {"mode": "process"},
                                    "outputs": [{"name": "d", "path": where}]}),
                body=body, settings=prod, context=RunContext(run_id=f"{kind}-{i}"))
            cons = Settings.from_dict({"state_dir": str(work / f"c-{kind}-{i}"),
                                       "audit": {"exporter": "none"}})
            spec = StepSpec.from_dict({
                "name": "consume", "isolation": {"mode": "process"},
                "inputs": [{"name": "d", "path": receipt.output("d").path,
                            "receipt": receipt.to_json()}]})
            r = run_step(spec, body=lambda env: None, settings=cons)
            times[kind].append(r.timings_ms["verify_inputs"])
    return statistics.median(times["remote"]), statistics.median(times["local"])


if __name__ == "__main__":
    raise SystemExit(main())
