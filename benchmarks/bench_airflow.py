"""Airflow: DAG-parse cost of our operators, and the wall time a secured step adds.

    .venv/bin/python benchmarks/bench_airflow.py [--quick]

1. DAG file import time (what the DAG processor pays on every parse): the example pipeline's
   shape written with stepguard operators against the same DAG written with stock operators
   (PythonOperator, BashOperator), and the pod variant of both (SecureKubernetesPodOperator against KubernetesPodOperator). Each figure is the median
   over fresh interpreters; ``airflow.sdk`` is imported before the clock starts in both cases, so
   the figure is the DAG file's own import.
2. Wall time of the example pipeline's steps through ``dag.test()``: ingest, verify, train (in
   the bubblewrap sandbox), sign + publish (key signer, local registry), gate (signature
   verified under a key policy), deploy -- against an unsecured twin DAG whose tasks do the same
   work with stock operators (copy, no check, plain subprocess, copy, copy, copy). The per-task
   durations come from the task instances; the overhead per step is the difference of medians.
   No Vault here: the ingest step uses no JIT credential (bench_credentials.py measures those).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

DIGEST = "registry.example/train@sha256:" + "ab" * 32

STOCK_DAG = '''
import pendulum
from airflow.sdk import DAG
from airflow.providers.standard.operators.python import PythonOperator
from airflow.providers.standard.operators.bash import BashOperator

def noop(*a, **k):
    return None

with DAG("stock", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
    ingest = PythonOperator(task_id="ingest", python_callable=noop)
    verify = PythonOperator(task_id="verify_dataset", python_callable=noop)
    train = BashOperator(task_id="train", bash_command="python -m train")
    publish = PythonOperator(task_id="sign_and_publish", python_callable=noop)
    gate = PythonOperator(task_id="gate", python_callable=noop)
    deploy = PythonOperator(task_id="deploy", python_callable=noop)
    ingest >> verify >> train >> publish >> gate >> deploy
'''

OURS_DAG = '''
import pendulum
from airflow.sdk import DAG
from stepguard_airflow.operators import (IngestDatasetOperator, SecureStepOperator,
    SignAndPublishModelOperator, VerifyDatasetOperator, VerifyModelOperator)

def noop(*a, **k):
    return None

with DAG("ours", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
    ingest = IngestDatasetOperator(task_id="ingest", dataset="d", version="1", source="/data")
    verify = VerifyDatasetOperator(task_id="verify_dataset", dataset=ingest.output)
    train = SecureStepOperator(task_id="train", command=["python", "-m", "train"],
        spec={"inputs": [{"name": "dataset"}], "outputs": [{"name": "model", "path": "model"}]},
        receipts={"dataset": ingest.output})
    publish = SignAndPublishModelOperator(task_id="sign_and_publish", model=train.output,
        name="m", version="1", signing={"signer": "transit", "key": "k"})
    gate = VerifyModelOperator(task_id="gate", model=publish.output, policy="release")
    deploy = SecureStepOperator(task_id="deploy", python_callable=noop,
        spec={"inputs": [{"name": "model"}]}, receipts={"model": gate.output})
    verify >> train
'''

POD_STOCK = f'''
import pendulum
from airflow.sdk import DAG
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
with DAG("pod_stock", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
    KubernetesPodOperator(task_id="train", image="{DIGEST}", cmds=["python", "-m", "train"],
                          namespace="ml")
'''

POD_OURS = f'''
import pendulum
from airflow.sdk import DAG
from stepguard_airflow.operators.kubernetes import SecureKubernetesPodOperator
with DAG("pod_ours", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
    SecureKubernetesPodOperator(task_id="train", image="{DIGEST}", cmds=["python", "-m", "train"],
                                namespace="ml")
'''

TIMER = """
import sys, time, runpy
import airflow.sdk  # shared baseline: not part of the DAG file's own cost
import airflow.sdk.bases.operator
t, c = time.perf_counter(), time.process_time()
runpy.run_path(sys.argv[1])
print(time.perf_counter() - t, time.process_time() - c)
"""


def _import_once(path: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds to import the DAG file in a fresh interpreter."""
    r = subprocess.run([sys.executable, "-c", TIMER, str(path)], capture_output=True,
                       text=True, env=env, timeout=300, check=False)
    if r.returncode != 0:
        raise SystemExit(f"importing {path.name} failed:\n{r.stderr[-2000:]}")
    wall, cpu = r.stdout.strip().splitlines()[-1].split()
    return float(wall), float(cpu)


def bench_imports(runs: int, work: Path) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) per DAG file; the files are interleaved round by round so that load
    from other work on the machine hits all of them alike."""
    env = {**os.environ, "AIRFLOW_HOME": str(work / "airflow-import"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    files = {}
    for name, text in (("stock", STOCK_DAG), ("ours", OURS_DAG), ("pod_stock", POD_STOCK),
                       ("pod_ours", POD_OURS)):
        files[name] = work / f"{name}_dag.py"
        files[name].write_text(textwrap.dedent(text))
    _import_once(files["stock"], env)  # warm the OS file cache
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in files}
    for _ in range(runs):
        for name, path in files.items():
            samples[name].append(_import_once(path, env))
    return {name: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
            for name, v in samples.items()}


# -- wall time --------------------------------------------------------------------------------

TRAIN = r"""
import hashlib, os, pathlib
src = pathlib.Path(os.environ.get("STEPGUARD_INPUT_DATASET") or os.environ["SRC"])
out = pathlib.Path(os.environ.get("STEPGUARD_OUTPUT_MODEL") or os.environ["OUT"])
h = hashlib.sha256()
for p in sorted(src.iterdir()):
    h.update(p.read_bytes())
seed = h.digest()
(out / "weights.onnx").write_bytes(seed * (int(os.environ["MODEL_BYTES"]) // 32))
(out / "meta.json").write_text('{"arch": "bench"}')
"""

SECURED_WALL = '''
import os, shutil, sys
import pendulum
from pathlib import Path
from airflow.sdk import DAG
from stepguard_airflow.operators import (IngestDatasetOperator, SecureStepOperator,
    SignAndPublishModelOperator, VerifyDatasetOperator, VerifyModelOperator)

B = Path(os.environ["BENCH_DIR"])

def promote(step_env):
    for p in step_env.inputs["model"].iterdir():
        shutil.copy2(p, step_env.outputs["serving"] / p.name)

with DAG("wall_secured", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
    ingest = IngestDatasetOperator(task_id="ingest", dataset="bench", version="{{ ts_nodash }}",
                                   source=str(B / "source"))
    verify = VerifyDatasetOperator(task_id="verify_dataset", dataset=ingest.output)
    train = SecureStepOperator(task_id="train", command=[sys.executable, "-c", os.environ["TRAIN"]],
        spec={"inputs": [{"name": "dataset"}], "outputs": [{"name": "model", "path": "model"}],
              "isolation": {"mode": "sandbox"}, "env": {"MODEL_BYTES": os.environ["MODEL_BYTES"]}},
        receipts={"dataset": ingest.output})
    publish = SignAndPublishModelOperator(task_id="sign_and_publish", model=train.output,
        name="bench-model", version="{{ ts_nodash }}",
        signing={"signer": "key", "key": str(B / "key.pem")})
    gate = VerifyModelOperator(task_id="gate", model=publish.output, policy="release")
    deploy = SecureStepOperator(task_id="deploy", python_callable=promote,
        spec={"inputs": [{"name": "model"}], "outputs": [{"name": "serving", "path": "serving"}]},
        receipts={"model": gate.output})
    verify >> train
'''

UNSECURED_WALL = '''
import os, shutil, subprocess, sys
import pendulum
from pathlib import Path
from airflow.sdk import DAG
from airflow.providers.standard.operators.python import PythonOperator

B = Path(os.environ["BENCH_DIR"])

def _dir(name, run_id):
    d = B / "plain" / run_id.replace(":", "_").replace("+", "_") / name
    d.mkdir(parents=True, exist_ok=True)
    return d

def ingest(run_id):
    dst = _dir("dataset", run_id)
    for p in (B / "source").iterdir():
        shutil.copy2(p, dst / p.name)

def verify(run_id):
    return None  # nothing is checked

def train(run_id):
    env = {**os.environ, "SRC": str(_dir("dataset", run_id)), "OUT": str(_dir("model", run_id))}
    subprocess.run([sys.executable, "-c", os.environ["TRAIN"]], env=env, check=True)

def publish(run_id):
    shutil.copytree(_dir("model", run_id), _dir("registry", run_id), dirs_exist_ok=True)

def gate(run_id):
    shutil.copytree(_dir("registry", run_id), _dir("fetched", run_id), dirs_exist_ok=True)

def deploy(run_id):
    shutil.copytree(_dir("fetched", run_id), _dir("serving", run_id), dirs_exist_ok=True)

with DAG("wall_plain", schedule=None, start_date=pendulum.datetime(2024, 1, 1)) as dag:
    prev = None
    for name, fn in (("ingest", ingest), ("verify_dataset", verify), ("train", train),
                     ("sign_and_publish", publish), ("gate", gate), ("deploy", deploy)):
        t = PythonOperator(task_id=name, python_callable=fn, op_kwargs={"run_id": "{{ run_id }}"})
        if prev is not None:
            prev >> t
        prev = t
'''

STEPS = ["ingest", "verify_dataset", "train", "sign_and_publish", "gate", "deploy"]


def _keypair(d: Path) -> None:
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    (d / "key.pem").write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8,
                                                  s.NoEncryption()))
    (d / "pub.pem").write_bytes(key.public_key().public_bytes(
        s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))


def bench_wall(runs: int, work: Path, files: int, file_bytes: int, model_bytes: int
               ) -> dict[str, dict[str, float]]:
    home = work / "airflow-wall"
    (home / "dags").mkdir(parents=True)
    os.environ.update({
        "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "BENCH_DIR": str(work), "TRAIN": TRAIN, "MODEL_BYTES": str(model_bytes),
        "STEPGUARD_STATE_DIR": str(work / "state"), "STEPGUARD_AUDIT_EXPORTER": "jsonl",
        "STEPGUARD_AUDIT_PATH": str(work / "audit.jsonl"),
        "STEPGUARD_CONFIG": str(work / "stepguard.yaml"),
    })
    for var in ("VAULT_ADDR", "VAULT_TOKEN"):
        os.environ.pop(var, None)
    src = work / "source"
    src.mkdir()
    for i in range(files):
        (src / f"part-{i:03d}.bin").write_bytes(os.urandom(file_bytes))
    _keypair(work)
    (work / "stepguard.yaml").write_text(json.dumps({
        "registry": {"url": f"file://{work / 'registry'}"},
        "policies": {"release": {"kind": "key", "public_keys": [str(work / "pub.pem")]}},
    }))
    (home / "dags" / "wall_secured.py").write_text(SECURED_WALL)
    (home / "dags" / "wall_plain.py").write_text(UNSECURED_WALL)

    import logging
    import runpy

    from airflow.utils import db

    logging.disable(logging.WARNING)
    db.initdb()
    dags = {
        "secured": runpy.run_path(str(home / "dags" / "wall_secured.py"))["dag"],
        "plain": runpy.run_path(str(home / "dags" / "wall_plain.py"))["dag"],
    }
    from airflow.utils.session import create_session

    samples: dict[str, dict[str, list[float]]] = {k: {s: [] for s in STEPS} for k in dags}
    for _ in range(runs + 1):  # the first round warms Airflow's in-process API and imports
        for kind, dag in dags.items():
            dr = dag.test()
            with create_session() as session:
                tis = {ti.task_id: ti for ti in dr.get_task_instances(session=session)}
                bad = {t: str(ti.state) for t, ti in tis.items() if str(ti.state) != "success"}
                if bad:
                    raise SystemExit(f"{kind} run failed: {bad}")
                for step in STEPS:
                    ti = tis[step]
                    samples[kind][step].append((ti.end_date - ti.start_date).total_seconds())
    return {kind: {s: statistics.median(v[1:]) for s, v in per.items()}
            for kind, per in samples.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--skip-wall", action="store_true", help="DAG import time only")
    args = ap.parse_args(argv)
    runs = 3 if args.quick else 9
    wall_runs = 1 if args.quick else 3
    files, file_bytes, model_bytes = (4, 256 * 1024, 1 << 20) if args.quick else \
        (16, 1 << 20, 8 << 20)
    print(f"machine: {os.cpu_count()} cores, shared with other work (figures are indicative)")
    work = Path(tempfile.mkdtemp(prefix="bench-airflow-"))
    # Registered first, so it runs last: after the audit exporter's own atexit flush.
    atexit.register(shutil.rmtree, work, True)
    if True:
        imp = bench_imports(runs, work)
        print(f"\n1. DAG file import time (median of {runs} fresh interpreters, interleaved;"
              " wall / CPU)")

        def row(label: str, key: str) -> None:
            print(f"   {label:38s}: {imp[key][0] * 1000:8.1f} ms / {imp[key][1] * 1000:7.1f} ms")

        def added(label: str, ours: str, stock: str) -> None:
            dw = (imp[ours][0] - imp[stock][0]) * 1000
            dc = (imp[ours][1] - imp[stock][1]) * 1000
            print(f"   {label:38s}: {dw:+8.1f} ms / {dc:+7.1f} ms  (CPU ratio "
                  f"{imp[ours][1] / imp[stock][1]:.2f}; target <= +50 ms)")

        row("example pipeline, stepguard operators", "ours")
        row("same DAG, stock operators", "stock")
        added("added by stepguard", "ours", "stock")
        row("SecureKubernetesPodOperator DAG", "pod_ours")
        row("KubernetesPodOperator DAG", "pod_stock")
        added("added by stepguard (pod DAG)", "pod_ours", "pod_stock")
        if args.skip_wall:
            return 0
        wall = bench_wall(wall_runs, work, files, file_bytes, model_bytes)
        print(f"\n2. Step wall time through dag.test() (median of {wall_runs}; dataset "
              f"{files} x {file_bytes // 1024} KiB, model {model_bytes >> 20} MiB)")
        print(f"   {'step':18s} {'secured':>10s} {'unsecured':>10s} {'overhead':>10s}")
        total_s = total_p = 0.0
        for step in STEPS:
            s, p = wall["secured"][step], wall["plain"][step]
            total_s += s
            total_p += p
            print(f"   {step:18s} {s * 1000:8.0f}ms {p * 1000:8.0f}ms {(s - p) * 1000:+8.0f}ms")
        print(f"   {'total':18s} {total_s * 1000:8.0f}ms {total_p * 1000:8.0f}ms "
              f"{(total_s - total_p) * 1000:+8.0f}ms  (ratio {total_s / total_p:.2f}; "
              f"{(total_s - total_p) / len(STEPS) * 1000:.0f} ms per step)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
