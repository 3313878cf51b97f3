"""The CLI's shape: lazy start-up, no adapter in the core, adapters on the public API only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
ADAPTERS = ("stepguard_airflow", "stepguard_kfp")


def _loaded_after(argv: list[str], watch: tuple[str, ...]) -> list[str]:
    code = (
        "import sys\n"
        "from stepguard.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print('loaded:' + ','.join(m for m in {watch!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("loaded:"), proc.stdout
    return [m for m in last.removeprefix("loaded:").split(",") if m]


@pytest.mark.parametrize("argv", [["--version"], ["exec", "--help"], ["config", "show", "--help"]])
def test_the_step_runner_loads_only_its_own_command(argv):
    # Every secured step and pod starts `stepguard exec`: nothing but its own module loads.
    watch = ("importlib.metadata", "stepguard.cli._manifest", "stepguard.cli._signing",
             "stepguard.cli._demo_command", "stepguard.integrity", "stepguard.testing", *ADAPTERS)
    assert _loaded_after(argv, watch) == []


def test_help_lists_every_group_without_heavy_imports():
    proc = subprocess.run([sys.executable, "-m", "stepguard.cli", "--help"], capture_output=True,
                          text=True, timeout=60, check=True)
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("    ")}
    assert {"exec", "demo", "manifest", "credentials", "sign", "pod", "audit", "lint",
            "dev"} <= listed
    assert _loaded_after(["--help"], ("stepguard.integrity", "stepguard.testing.devstack._stack",
                                      "airflow", "hvac", "boto3")) == []


def test_demo_engines_come_from_entry_points():
    from stepguard.cli import _parser

    args = _parser(["demo"]).parse_args(["demo"])
    assert args.engine == "airflow"  # the first adapter's engine is the default
    assert set(args.engines) == {"airflow", "sdk"}
    assert args.engines["airflow"][1].__module__ == "stepguard_airflow.example"
    assert _parser(["demo"]).parse_args(["demo", "--engine", "sdk"]).engine == "sdk"


def test_demo_cluster_mode_only_where_the_engine_has_one(capsys):
    """``--cluster`` reaches the Airflow engine as ``cluster=True``; the SDK engine, which has no
    orchestrator to deploy, refuses it before starting anything."""
    import inspect

    from stepguard.cli import _parser, main

    args = _parser(["demo"]).parse_args(["demo", "--cluster"])
    assert args.cluster is True
    assert "cluster" in inspect.signature(args.engines["airflow"][1]).parameters
    assert main(["demo", "--engine", "sdk", "--cluster"]) != 0
    err = capsys.readouterr().err
    assert "no cluster mode" in err and "demo --engine sdk --cluster" in err


def _imports(path: Path) -> list[str]:
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]
    return out


def test_the_core_imports_no_adapter():
    offenders = [f"{p.relative_to(REPO)}: {m}"
                 for p in sorted((REPO / "sdk" / "stepguard").rglob("*.py"))
                 for m in _imports(p) if m.split(".")[0] in ADAPTERS]
    assert offenders == []


def test_adapters_import_only_public_core_modules():
    offenders = []
    for root in ("plugins/stepguard_airflow", "components/stepguard_kfp", "dags_examples"):
        for p in sorted((REPO / root).rglob("*.py")):
            for m in _imports(p):
                parts = m.split(".")
                private = [x for x in parts[1:] if x.startswith("_") and not x.startswith("__")]
                if parts[0] == "stepguard" and private:
                    offenders.append(f"{p.relative_to(REPO)}: {m}")
    assert offenders == []
