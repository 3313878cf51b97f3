"""CLI start-up: what every secured step and pod pays before ``stepguard exec`` does any work.

    .venv/bin/python benchmarks/bench_cli.py [--runs 40] [--baseline-tree DIR]

Runs ``python -c pass`` and a set of ``stepguard`` commands (the console script next to the
interpreter) that stop right after argument
parsing (``--version``, ``exec --help``, ...), interleaved round-robin so that load from other
work falls on all of them alike, each in a fresh process, and prints the median wall time of each
and its difference to ``python -c pass``. ``--baseline-tree`` adds the same commands run from
another source tree (e.g. ``git archive main | tar -x -C DIR``: its ``sdk``, ``plugins`` and
``components`` first on ``PYTHONPATH``), in the same rounds. Bytecode caches are written and
used, as in an installed package.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# (label, program next to the interpreter, arguments)
COMMANDS = (
    ("python -c pass", "python", ["-c", "pass"]),
    ("stepguard --version", "stepguard", ["--version"]),
    ("stepguard exec --help", "stepguard", ["exec", "--help"]),
    ("stepguard manifest verify --help", "stepguard", ["manifest", "verify", "--help"]),
    ("stepguard --help", "stepguard", ["--help"]),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--baseline-tree", help="another stepguard source tree to compare with")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # start-up as installed: bytecode caches in use
    envs = {"this": env}
    if args.baseline_tree:
        tree = Path(args.baseline_tree).resolve()
        path = os.pathsep.join(str(tree / d) for d in ("sdk", "plugins", "components"))
        envs["baseline"] = dict(env, PYTHONPATH=path)
    python = sys.executable
    def argv(python: str, program: str, rest: list[str]) -> list[str]:
        return [python if program == "python" else str(Path(python).parent / program), *rest]

    for who_env in envs.values():  # warm the page cache, write the bytecode caches
        for _label, program, rest in COMMANDS:
            subprocess.run(argv(python, program, rest), capture_output=True, env=who_env,
                           check=False)
    samples: dict[tuple[str, str], list[float]] = {
        (who, label): [] for who in envs for label, _, _ in COMMANDS}
    for _ in range(args.runs):
        for who, who_env in envs.items():
            for label, program, rest in COMMANDS:
                start = time.perf_counter()
                subprocess.run(argv(python, program, rest), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=who_env, check=False)
                samples[(who, label)].append((time.perf_counter() - start) * 1000)

    load = os.getloadavg()[0]
    print(f"{args.runs} interleaved runs each, load average {load:.2f} at the end")
    out = []
    for who in envs:
        bare = statistics.median(samples[(who, "python -c pass")])
        for label, _, _ in COMMANDS:
            med = statistics.median(samples[(who, label)])
            out.append({"install": who, "command": label, "median_ms": round(med, 1),
                        "over_bare_ms": round(med - bare, 1)})
            print(f"{who:9s} {label:36s} median {med:6.1f} ms   +{med - bare:5.1f} ms")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
