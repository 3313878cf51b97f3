"""Cost of a secured KFP task against the stock lightweight component doing the same reads.

    .venv/bin/python benchmarks/bench_kfp.py [--quick]

1. Task wall time under ``kfp.local.SubprocessRunner``: ``verify_dataset`` (the stepguard
   lifecycle: settings, manifest verification re-hashing every byte, receipt, hash-chained audit
   log) against a stock ``@dsl.component`` that reads the same files and returns their count
   (no verification). Both pay kfp.local's own per-task cost (a fresh Python process, executor
   input/output files), which dominates for small datasets.
2. Secured training step under kfp.local: ``secure_train`` (runner subprocess, re-verification,
   bubblewrap sandbox, output manifest) against a stock component running the same command
   unsandboxed in-process.
3. Compile time of a 4-task pipeline with ``harden`` on every task against the same pipeline
   without it.

Figures are medians of N runs on the shared development machine (2 cores, other work running).
"""

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from kfp import compiler, dsl, local

from stepguard.integrity import create_manifest
from stepguard.spec import IsolationSpec
from stepguard_kfp import harden, secure_train, verify_dataset

warnings.filterwarnings("ignore", category=RuntimeWarning)

TRAIN = ("import os, pathlib; d = pathlib.Path(os.environ['STEPGUARD_INPUT_DATASET']); "
         "n = sum(len(p.read_bytes()) for p in d.rglob('*') if p.is_file()); "
         "pathlib.Path(os.environ['STEPGUARD_OUTPUT_MODEL'], 'model.txt').write_text(str(n))")


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def stock_read(dataset_path: str) -> str:
    import pathlib

    n = sum(len(p.read_bytes()) for p in pathlib.Path(dataset_path).rglob("*") if p.is_file())
    return str(n)


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def stock_train(dataset_path: str, command: list, model: dsl.Output[dsl.Model]) -> str:
    import os
    import subprocess

    os.makedirs(model.path, exist_ok=True)
    env = dict(os.environ, STEPGUARD_INPUT_DATASET=dataset_path, STEPGUARD_OUTPUT_MODEL=model.path)
    subprocess.run(command, check=True, env=env)
    return "ok"


def make_dataset(root: Path, files: int, size: int) -> tuple[Path, Path]:
    data = root / "data"
    data.mkdir()
    block = os.urandom(size)
    for i in range(files):
        (data / f"part-{i:04d}.bin").write_bytes(block[i % 7:] + block[: i % 7])
    manifest = root / "data.manifest.json"
    manifest.write_text(create_manifest(data).to_json())
    return data, manifest


def timed(fn, runs: int) -> float:
    fn()  # warm-up (imports, page cache)
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    runs = 2 if args.quick else 5
    files, size = (20, 256 * 1024) if args.quick else (64, 4 * 1024 * 1024)
    tmp = Path(tempfile.mkdtemp(prefix="bench-kfp-"))
    try:
        os.environ["STEPGUARD_STATE_DIR"] = str(tmp / "state")
        os.environ.pop("STEPGUARD_CONFIG", None)
        os.chdir(tmp)
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp / "root"),
                   raise_on_error=True)
        data, manifest = make_dataset(tmp, files, size)
        total_mb = files * size / 2**20

        @dsl.pipeline
        def ours_verify(d: str, m: str):
            verify_dataset(dataset_path=d, manifest_path=m)

        @dsl.pipeline
        def stock_verify(d: str):
            stock_read(dataset_path=d)

        spec = json.dumps({"name": "train", "deadline_s": 300, "isolation": {"mode": "pod"}})
        cmd = [sys.executable, "-c", TRAIN]

        @dsl.pipeline
        def ours_train(d: str, m: str):
            v = verify_dataset(dataset_path=d, manifest_path=m)
            secure_train(step_spec=spec, command=cmd, dataset_path=d,
                         dataset_manifest=v.outputs["dataset_manifest"],
                         dataset_receipt=v.outputs["Output"])

        @dsl.pipeline
        def stock_train_p(d: str):
            stock_read(dataset_path=d)
            stock_train(dataset_path=d, command=cmd)

        def quiet(fn):
            def run():
                with contextlib.redirect_stdout(io.StringIO()), \
                        contextlib.redirect_stderr(io.StringIO()):
                    fn()
            return run

        t_ours = timed(quiet(lambda: ours_verify(d=str(data), m=str(manifest))), runs)
        t_stock = timed(quiet(lambda: stock_verify(d=str(data))), runs)
        print(f"verify task, {files} files / {total_mb:.0f} MiB, median of {runs}:")
        print(f"  stepguard verify_dataset  {t_ours:7.3f} s")
        print(f"  stock component (reads)   {t_stock:7.3f} s")
        print(f"  ratio                     {t_ours / t_stock:7.2f}x  (+{t_ours - t_stock:.3f} s)")

        t_ours = timed(quiet(lambda: ours_train(d=str(data), m=str(manifest))), runs)
        t_stock = timed(quiet(lambda: stock_train_p(d=str(data))), runs)
        print(f"verify + train pipeline (2 tasks), median of {runs}:")
        print(f"  stepguard (sandboxed)     {t_ours:7.3f} s")
        print(f"  stock (unsandboxed)       {t_stock:7.3f} s")
        print(f"  ratio                     {t_ours / t_stock:7.2f}x  (+{t_ours - t_stock:.3f} s)")

        iso = IsolationSpec(mode="pod", gpus=1, cpu="4", memory="8Gi",
                            node_selector={"pool": "gpu"})
        # harden takes the image from pods.image and refuses the placeholder: any pinned digest
        # serves a compile-only measurement.
        os.environ.setdefault("STEPGUARD_PODS_IMAGE",
                              "registry.example/stepguard-runtime@sha256:" + "5" * 64)

        def build(hardened: bool):
            @dsl.pipeline
            def four(d: str, m: str):
                for _ in range(4):
                    t = verify_dataset(dataset_path=d, manifest_path=m)
                    if hardened:
                        harden(t, iso, deadline_s=600)
            compiler.Compiler().compile(four, str(tmp / "four.yaml"))

        n = 5 if args.quick else 20
        t_h = timed(lambda: build(True), n)
        t_p = timed(lambda: build(False), n)
        print(f"compile a 4-task pipeline, median of {n}:")
        print(f"  with harden on each task  {t_h * 1000:7.1f} ms")
        print(f"  without                   {t_p * 1000:7.1f} ms")
        print(f"  ratio                     {t_h / t_p:7.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
