"""Pipeline templates: DAG-file import time of a template instantiated 50 times against 50
hand-written stock DAGs.

    .venv/bin/python benchmarks/bench_templates.py [--runs N] [--instances N] [--quick]

Four DAG files, each imported in a fresh interpreter after ``airflow.sdk`` is loaded (the cost
every variant shares), rounds interleaved so load from other work hits them alike; medians of
wall and CPU time:

* ``stock``: 50 hand-written DAGs of five stock tasks each (PythonOperator, BashOperator), the
  pipeline's shape, written out one after another as a team without templates would;
* ``template``: the template (Python form) instantiated 50 times, checked against its floor and
  rendered by ``build_dags`` into 50 DAGs of the five stepguard tasks;
* ``template_yaml``: the same from a YAML template file;
* ``mapped``: the same 50 instances as one DAG mapped over them (``build_mapped_dag``).

Prints each figure and the difference and ratio to ``stock`` (target: at most +50 ms per file).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

TEMPLATE = {
    "name": "training",
    "train": {"isolation": {"mode": "sandbox", "network": "none"}, "deadline_s": 900},
    "train_command": ["python3", "-m", "train"],
    "signing": {"signer": "transit", "key": "stepguard-signing"},
    "signature_policy": "release",
    "floor": {"isolated_steps": ["train"], "no_egress_steps": ["train"],
              "signature_policy": "release", "max_credential_ttl_s": 3600,
              "inputs_verified": True},
}

STOCK_ONE = '''
with DAG("stock_{i}", schedule=None, start_date=pendulum.datetime(2024, 1, 1),
         params={{"model": "m{i}"}}) as dag_{i}:
    ingest = PythonOperator(task_id="ingest", python_callable=noop, op_args=["/lake/m{i}"])
    verify = PythonOperator(task_id="verify_dataset", python_callable=noop)
    train = BashOperator(task_id="train", bash_command="python3 -m train --data /lake/m{i}")
    publish = PythonOperator(task_id="sign_and_publish", python_callable=noop,
                             op_args=["m{i}", "{{{{ ts_nodash }}}}"])
    gate = PythonOperator(task_id="gate", python_callable=noop, op_args=["release"])
    ingest >> verify >> train >> publish >> gate
'''

STOCK_HEAD = '''
import pendulum
from airflow.sdk import DAG
from airflow.providers.standard.operators.bash import BashOperator
from airflow.providers.standard.operators.python import PythonOperator

def noop(*a, **k):
    return None
'''

TEMPLATE_PY = '''
from stepguard.template import PipelineTemplate
from stepguard_airflow.template import build_dags

TRAINING = PipelineTemplate.from_dict({template})
MODELS = TRAINING.instantiate_all(
    {{"name": f"m{{i}}", "dataset": f"/lake/m{{i}}",
      "credentials": [{{"name": "tracking", "kind": "kv", "path": f"stepguard/tracking/m{{i}}"}}]}}
    for i in range({n}))
globals().update(build_dags(MODELS))
'''

TEMPLATE_YAML = '''
from stepguard.template import PipelineTemplate
from stepguard_airflow.template import build_dags

TRAINING = PipelineTemplate.from_file({path!r})
MODELS = TRAINING.instantiate_all(
    {{"name": f"m{{i}}", "dataset": f"/lake/m{{i}}",
      "credentials": [{{"name": "tracking", "kind": "kv", "path": f"stepguard/tracking/m{{i}}"}}]}}
    for i in range({n}))
globals().update(build_dags(MODELS))
'''

MAPPED = '''
from stepguard.template import PipelineTemplate
from stepguard_airflow.template import build_mapped_dag

TRAINING = PipelineTemplate.from_dict({template})
MODELS = TRAINING.instantiate_all(
    {{"name": f"m{{i}}", "dataset": f"/lake/m{{i}}",
      "credentials": [{{"name": "tracking", "kind": "kv", "path": f"stepguard/tracking/m{{i}}"}}]}}
    for i in range({n}))
training = build_mapped_dag(MODELS)
'''

TIMER = """
import sys, time, runpy
import airflow.sdk  # shared baseline: not part of the DAG file's own cost
import airflow.sdk.bases.operator
t, c = time.perf_counter(), time.process_time()
ns = runpy.run_path(sys.argv[1])
wall, cpu = time.perf_counter() - t, time.process_time() - c
dags = [v for v in ns.values() if type(v).__name__ == "DAG"]
print(wall, cpu, len(dags), sum(len(d.tasks) for d in dags))
"""


def _import_once(path: Path, env: dict[str, str]) -> tuple[float, float, int, int]:
    r = subprocess.run([sys.executable, "-c", TIMER, str(path)], capture_output=True,
                       text=True, env=env, timeout=300, check=False)
    if r.returncode != 0:
        raise SystemExit(f"importing {path.name} failed:\n{r.stderr[-2000:]}")
    wall, cpu, dags, tasks = r.stdout.strip().splitlines()[-1].split()
    return float(wall), float(cpu), int(dags), int(tasks)


def write_files(work: Path, n: int) -> dict[str, Path]:
    """The DAG files under test."""
    import yaml

    tmpl_file = work / "training.yaml"
    tmpl_file.write_text(yaml.safe_dump(TEMPLATE))
    sources = {
        "stock": textwrap.dedent(STOCK_HEAD) + "".join(
            textwrap.dedent(STOCK_ONE.format(i=i)) for i in range(n)),
        "template": textwrap.dedent(TEMPLATE_PY.format(template=TEMPLATE, n=n)),
        "template_yaml": textwrap.dedent(TEMPLATE_YAML.format(path=str(tmpl_file), n=n)),
        "mapped": textwrap.dedent(MAPPED.format(template=TEMPLATE, n=n)),
    }
    files = {}
    for name, text in sources.items():
        files[name] = work / f"{name}_dags.py"
        files[name].write_text(text)
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=9, help="fresh interpreters per file")
    p.add_argument("--instances", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="3 runs (smoke)")
    args = p.parse_args(argv)
    runs = 3 if args.quick else args.runs
    with tempfile.TemporaryDirectory(prefix="stepguard-bench-templates-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "AIRFLOW_HOME": str(work / "airflow"),
               "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
        files = write_files(work, args.instances)
        _import_once(files["stock"], env)  # warm the OS file cache and the bytecode cache
        samples: dict[str, list[tuple[float, float, int, int]]] = {n: [] for n in files}
        for _ in range(runs):
            for name, path in files.items():
                samples[name].append(_import_once(path, env))
    result = {}
    for name, v in samples.items():
        result[name] = {"wall_ms": round(statistics.median(s[0] for s in v) * 1000, 1),
                        "cpu_ms": round(statistics.median(s[1] for s in v) * 1000, 1),
                        "dags": v[0][2], "tasks": v[0][3]}
    base = result["stock"]
    print(f"{args.instances} instances, {runs} fresh interpreters per file, medians; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'DAG file':<16}{'DAGs':>6}{'tasks':>7}{'wall ms':>10}{'CPU ms':>9}"
          f"{'Δ wall':>10}{'Δ CPU':>9}{'ratio':>7}")
    for name, r in result.items():
        dw, dc = r["wall_ms"] - base["wall_ms"], r["cpu_ms"] - base["cpu_ms"]
        print(f"{name:<16}{r['dags']:>6}{r['tasks']:>7}{r['wall_ms']:>10.1f}{r['cpu_ms']:>9.1f}"
              f"{dw:>+10.1f}{dc:>+9.1f}{r['wall_ms'] / base['wall_ms']:>7.2f}")
    added = result["template"]["wall_ms"] - base["wall_ms"]
    print(f"template instantiated {args.instances}x vs {args.instances} stock DAGs: "
          f"{added:+.1f} ms per file (target <= +50 ms): {'met' if added <= 50 else 'MISSED'}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
