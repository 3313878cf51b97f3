"""Overhead of a secured pod step over the same pod without stepguard, in real podman pods.

Both runs go through the same path: our Pod manifest, ``podman kube play`` (via
:class:`stepguard.testing.kubeplay.PodmanKube`), wait, logs, delete, from the same image.

* **baseline** -- the body alone as the pod's command (``python3 -c ...``): no step runner,
  no ConfigMap, no credentials.
* **secured** -- ``isolation.mode: pod``: the step runner as the entrypoint with its ConfigMap,
  one kv credential and one object-store credential minted by the orchestrator and handed over
  wrapped (unwrapped in the pod), one small object-store input (one 4 KiB file) verified against
  its producer's receipt while it downloads, the body, the receipt printed and read back.

The difference is what stepguard adds to a pod step (runner start, login, verification,
receipt); the target is at most 1 s. The stages inside the pod come from the receipt's
``timings_ms``. The image size is printed too.

    .venv/bin/python benchmarks/bench_pod.py            # 10 runs of each
    .venv/bin/python benchmarks/bench_pod.py --runs 3   # smoke run

Starts its own dev stack in a temporary directory unless ``STEPGUARD_TEST_DEV_DIR`` names a
running one; builds (or reuses) the image with ``stepguard.testing.podman.build_image``.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

BODY = "print('trained')"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))]


def row(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (f"{name:<28} p50 {pct(ms, 50):8.1f} ms   p95 {pct(ms, 95):8.1f} ms   "
            f"mean {statistics.fmean(ms):8.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()

    from stepguard.testing import devstack
    from stepguard.testing.kubeplay import PodmanKube
    from stepguard.testing.podman import Podman, build_image, unavailable

    podman = Podman.default()
    reason = unavailable(podman)
    if reason:
        print(f"skipped: {reason}")
        return 0
    t0 = time.perf_counter()
    image = build_image(podman)
    size = int(podman.run("image", "inspect", "--format", "{{.Size}}", image).stdout or 0)
    print(f"image     {image}")
    print(f"          {size / 2**20:.0f} MiB (build or reuse took {time.perf_counter() - t0:.1f} s)")

    reuse = os.environ.get("STEPGUARD_TEST_DEV_DIR")
    tmp = None
    if reuse:
        info = devstack.status(Path(reuse))
        if info is None:
            print(f"no dev stack in {reuse}", file=sys.stderr)
            return 2
    else:
        tmp = tempfile.TemporaryDirectory(prefix="sg-bench-pod-")
        info = devstack.up(Path(tmp.name) / "dev", owner_pid=os.getpid())
    try:
        return _bench(info, image, podman, PodmanKube, args.runs)
    finally:
        if tmp is not None:
            devstack.down(Path(tmp.name) / "dev")
            tmp.cleanup()


def _bench(info: Any, image: str, podman: Any, kube_cls: Any, runs: int) -> int:
    import hvac

    from stepguard._podstep import run_in_pod
    from stepguard.isolation import run_isolated
    from stepguard.settings import Settings
    from stepguard.spec import IsolationSpec, RunContext, StepSpec
    from stepguard.step import Step, run_step

    os.environ.update({"VAULT_ROLE_ID": info.approle_role_id,
                       "VAULT_SECRET_ID_FILE": str(info.approle_secret_id_file),
                       "AWS_ENDPOINT_URL": info.moto_endpoint, "AWS_REGION": info.aws_region,
                       "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                       "AWS_CONFIG_FILE": "/nonexistent"})
    for name in ("VAULT_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.pop(name, None)
    root = hvac.Client(url=info.vault_addr, token=info.vault_root_token)
    root.secrets.kv.v2.create_or_update_secret(path="stepguard/bench", secret={"token": "x"},
                                               mount_point="secret")
    work = Path(tempfile.mkdtemp(prefix="sg-bench-pod-"))
    settings = Settings.from_dict({
        "vault": {"addr": info.vault_addr, "auth": "approle"}, "audit": {"exporter": "none"},
        "state_dir": str(work / "state"), "pods": {"image": image}})
    lake = {"name": "lake", "kind": "aws_web_identity", "role": info.web_identity_role_arn}
    storage = {"credential": "lake", "endpoint_url": info.moto_endpoint}
    prefix = f"s3://stepguard-data/bench-pod-{uuid.uuid4().hex[:8]}"
    seed = StepSpec.from_dict({"name": "ingest", "isolation": {"mode": "process"},
                               "credentials": [lake], "storage": storage,
                               "outputs": [{"name": "data", "path": f"{prefix}/data"}]})

    def write(env: Any) -> None:
        (env.outputs["data"] / "rows.bin").write_bytes(os.urandom(4096))

    produced = run_step(seed, body=write, settings=settings,
                        context=RunContext(run_id="seed", step="ingest"))
    spec = StepSpec.from_dict({
        "name": "train", "isolation": {"mode": "pod", "network": []},
        "env": {"AWS_REGION": info.aws_region},
        "credentials": [{"name": "api", "kind": "kv", "path": "stepguard/bench"}, lake],
        "storage": storage,
        "inputs": [{"name": "data", "path": produced.output("data").path,
                    "receipt": produced.to_json()}]})
    kube = kube_cls(podman)
    iso = IsolationSpec(mode="pod", image=image)
    base: list[float] = []
    secured: list[float] = []
    stages: dict[str, list[float]] = {}
    command = ["python3", "-c", BODY]
    for i in range(runs + 1):  # the first of each is a warm-up
        t = time.perf_counter()
        r = run_isolated(command, iso, env={}, deadline_s=120, kube_api=kube.api(),
                         context=RunContext(run_id=f"b{i}", step="base"),
                         stdout=io.BytesIO(), pod_options={"poll_s": 0.05})
        if r.exit_code != 0:
            raise SystemExit(f"baseline pod exited {r.exit_code}")
        if i:
            base.append(time.perf_counter() - t)
        t = time.perf_counter()
        step = Step(spec, settings=settings, context=RunContext(run_id=f"s{i}", step="train"))
        receipt = run_in_pod(step, command, kube_api=kube.api(), stdout=io.BytesIO(),
                             poll_s=0.05)
        if i:
            secured.append(time.perf_counter() - t)
            for stage, ms in receipt.timings_ms.items():
                stages.setdefault(stage, []).append(ms / 1000)
    print(f"pods      {runs} runs each (after one warm-up), same image, same PodmanKube path")
    print(row("baseline pod (body only)", base))
    print(row("secured pod step", secured))
    over = [s - b for s, b in zip(sorted(secured), sorted(base), strict=True)]
    print(row("overhead (secured - baseline)", over))
    for stage, values in sorted(stages.items()):
        print(row(f"  in the pod: {stage}", values))
    verdict = "within" if pct([o * 1000 for o in over], 50) <= 1000 else "OVER"
    print(f"target    p50 overhead <= 1000 ms: {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
