"""``stepguard pod render`` and ``stepguard pod check``, through the real CLI entry point."""

from __future__ import annotations

import json
import os
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
    # Only what the command line and the settings file say: a dev stack started earlier in the
    # session exports VAULT_ADDR and friends, which settings rightly take over the file.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VAULT_", "BAO_", "STEPGUARD_", "OTEL_", "AWS_"))}
    return subprocess.run([sys.executable, "-m", "stepguard.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False, env=env)


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


def test_render_runner_shows_the_step_runner_pod_its_config_map_and_egress(tmp_path: Path) -> None:
    (tmp_path / "step.yaml").write_text(
        "name: train\n"
        "isolation: {mode: pod, network: []}\n"
        "credentials: [{name: api, kind: kv, path: stepguard/x}]\n"
        "outputs: [{name: model, path: 's3://b/runs/{run_id}/model'}]\n"
        "storage: {endpoint_url: 'http://10.0.0.7:9000'}\n")
    image = "localhost/stepguard-runtime@sha256:" + "1" * 64
    (tmp_path / "s.yaml").write_text(
        f'vault: {{addr: "https://10.0.0.5:8200"}}\npods: {{image: "{image}", '
        "vault_login: jwt, jwt_role: step}\n")
    r = cli("pod", "render", "--spec", str(tmp_path / "step.yaml"), "--settings",
            str(tmp_path / "s.yaml"), "--runner", "--name", "sg-train", "--", "python3", "t.py")
    assert r.returncode == 0, r.stderr
    pod, policy, cm = yaml.safe_load_all(r.stdout)
    box = pod["spec"]["containers"][0]
    assert box["image"] == image  # the one image setting
    assert box["command"][:2] == ["stepguard", "exec"] and box["command"][-2:] == ["python3",
                                                                                   "t.py"]
    assert cm["kind"] == "ConfigMap" and set(cm["data"]) == {"step.json", "settings.json"}
    assert json.loads(cm["data"]["settings.json"])["vault"]["auth"] == "jwt"
    cidrs = [r["to"][0].get("ipBlock", {}).get("cidr") for r in policy["spec"]["egress"][1:]]
    assert cidrs == ["10.0.0.5/32", "10.0.0.7/32"]  # Vault and the object store, nothing else
    (proj,) = [v["projected"] for v in pod["spec"]["volumes"] if "projected" in v]
    assert proj["sources"][0]["serviceAccountToken"]["audience"] == "vault"
