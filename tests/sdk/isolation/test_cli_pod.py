"""``stepguard pod render`` and ``stepguard pod check``, through the real CLI entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

STEP = """
name: train
isolation:
  mode: pod
  image: ghcr.io/acme/train@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
  gpus: 1
  network: ["10.0.0.7:8200"]
deadline_s: 900
"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stepguard.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pod")
    (d / "step.yaml").write_text(STEP)
    r = cli("pod", "render", "--spec", str(d / "step.yaml"), "--name", "sg-train",
            "--run-id", "r1", "--", "python", "train.py")
    assert r.returncode == 0, r.stderr
    (d / "rendered.yaml").write_text(r.stdout)
    return d


def test_render_prints_pod_and_network_policy(rendered: Path) -> None:
    docs = list(yaml.safe_load_all((rendered / "rendered.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["Pod", "NetworkPolicy"]
    pod = docs[0]
    assert pod["spec"]["containers"][0]["command"] == ["python", "train.py"]
    assert pod["spec"]["activeDeadlineSeconds"] == 900
    assert pod["metadata"]["labels"]["stepguard.dev/run"] == "r1"


def test_check_passes_rendered_manifests(rendered: Path) -> None:
    r = cli("pod", "check", str(rendered / "rendered.yaml"))
    assert r.returncode == 0, r.stderr
    assert "ok: 2 documents" in r.stdout


def test_check_names_each_violation(rendered: Path) -> None:
    bad = (rendered / "rendered.yaml").read_text()
    bad = bad.replace("capabilities:", "capabilites:", 1)
    bad = bad.replace("readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false")
    bad = bad.replace("automountServiceAccountToken: false", "automountServiceAccountToken: true")
    path = rendered / "bad.yaml"
    path.write_text(bad)
    r = cli("pod", "check", str(path))
    assert r.returncode == 3
    assert r.stderr.startswith("stepguard: error: 4 violations")
    for needle in ("'capabilites' was unexpected", "restricted.capabilities",
                   "stepguard.read-only-root", "stepguard.sa-token"):
        assert needle in r.stderr
    assert "Traceback" not in r.stderr
    j = cli("pod", "check", "--json", str(path))
    report = json.loads(j.stdout)
    assert report["ok"] is False and len(report["violations"]) == 4


def test_render_refuses_a_tag_image(tmp_path: Path) -> None:
    (tmp_path / "step.yaml").write_text(STEP.replace(
        "train@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "train:latest"))
    r = cli("pod", "render", "--spec", str(tmp_path / "step.yaml"), "--", "python", "x.py")
    assert r.returncode == 3 and "not pinned by digest" in r.stderr


def test_check_reports_unreadable_input(tmp_path: Path) -> None:
    r = cli("pod", "check", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "cannot read manifest" in r.stderr
