"""Pods that train: what build_pod emits for GPU steps, and the GPU check every runner makes.

Manifests are the real builder's output, validated strictly (schema + restricted + our rules).
The refusal runs for real on a machine without a GPU (this one); on a machine with one, the
visible-GPU tests in test_gpu.py apply instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from stepguard.errors import ConfigurationError, GpuUnavailable
from stepguard.isolation import build_pod, check_pod, run_isolated
from stepguard.isolation._gpu import GpuProbe, probe_gpus, require_gpus
from stepguard.spec import IsolationSpec, RunContext, StepSpec

DIGEST = "ghcr.io/acme/train@sha256:" + "ab" * 32
CTX = RunContext(pipeline="fraud", run_id="r-1", step="train")
NO_GPU = not os.path.exists("/dev/nvidia0")


def _pod(spec: IsolationSpec, **kw: Any) -> dict[str, Any]:
    return build_pod(spec, name="sg-train", command=["python", "train.py"],
                     env=kw.pop("env", {}), context=CTX, **kw)


def _c(pod: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = pod["spec"]["containers"][0]
    return container


def _vol(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in pod["spec"]["volumes"] if v["name"] == name)


def _env(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in _c(pod)["env"]}


def test_gpu_pod_gets_gpus_shm_caches_and_training_sizes() -> None:
    pod = _pod(IsolationSpec(mode="pod", image=DIGEST, gpus=2))
    limits = _c(pod)["resources"]["limits"]
    assert limits == {"cpu": "8", "memory": "64Gi", "ephemeral-storage": "100Gi",
                      "nvidia.com/gpu": "2"}
    assert _c(pod)["resources"]["requests"] == limits
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} \
        in pod["spec"]["tolerations"]
    assert _vol(pod, "shm")["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert {"name": "shm", "mountPath": "/dev/shm"} in _c(pod)["volumeMounts"]
    assert _vol(pod, "scratch")["emptyDir"] == {"sizeLimit": "100Gi"}
    env = _env(pod)
    assert env["HOME"] == "/home/stepguard"
    assert {env[k] for k in ("XDG_CACHE_HOME", "TORCH_HOME", "HF_HOME")} == {
        "/tmp/.cache", "/tmp/.cache/torch", "/tmp/.cache/huggingface"}
    assert _c(pod)["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["activeDeadlineSeconds"] == 43200
    assert check_pod(pod) == []


def test_cpu_pod_keeps_its_defaults_and_has_no_shm_volume() -> None:
    pod = _pod(IsolationSpec(mode="pod", image=DIGEST))
    assert _c(pod)["resources"]["limits"] == {"cpu": "1", "memory": "2Gi",
                                              "ephemeral-storage": "1Gi"}
    assert "shm" not in {v["name"] for v in pod["spec"]["volumes"]}
    assert pod["spec"]["activeDeadlineSeconds"] == 3600
    assert check_pod(pod) == []


def test_what_the_spec_sets_wins_and_shm_fits_in_memory() -> None:
    pod = _pod(IsolationSpec(mode="pod", image=DIGEST, gpus=1, cpu="2", memory="6Gi",
                             scratch_size="5Gi"), deadline_s=900,
               env={"HF_HOME": "/data/hf"})
    assert _c(pod)["resources"]["limits"]["cpu"] == "2"
    assert _c(pod)["resources"]["limits"]["ephemeral-storage"] == "5Gi"
    assert _vol(pod, "shm")["emptyDir"]["sizeLimit"] == "3Gi"  # half of the memory limit
    assert pod["spec"]["activeDeadlineSeconds"] == 900
    assert _env(pod)["HF_HOME"] == "/data/hf"
    assert [e["name"] for e in _c(pod)["env"]].count("HF_HOME") == 1
    cpu = _pod(IsolationSpec(mode="pod", image=DIGEST, shm_size="256Mi"))
    assert _vol(cpu, "shm")["emptyDir"] == {"medium": "Memory", "sizeLimit": "256Mi"}
    with pytest.raises(ConfigurationError, match="shm_size exceeds") as info:
        _pod(IsolationSpec(mode="pod", image=DIGEST, memory="1Gi", shm_size="2Gi"))
    assert info.value.subject == "isolation.shm_size"


def test_user_volumes_are_merged_and_ours_cannot_be_replaced() -> None:
    data = {"name": "data", "persistentVolumeClaim": {"claimName": "lake", "readOnly": True}}
    pod = _pod(IsolationSpec(mode="pod", image=DIGEST, gpus=1), user_volumes=[data],
               user_volume_mounts=[{"name": "data", "mountPath": "/data", "readOnly": True}])
    mounts = {m["mountPath"]: m["name"] for m in _c(pod)["volumeMounts"]}
    assert mounts["/tmp"] == "scratch" and mounts["/data"] == "data"
    assert mounts["/dev/shm"] == "shm"
    assert check_pod(pod) == []
    for path in ("/tmp", "/dev/shm", "/home/stepguard/"):
        with pytest.raises(ConfigurationError, match="stepguard's own") as info:
            _pod(IsolationSpec(mode="pod", image=DIGEST, gpus=1), user_volumes=[data],
                 user_volume_mounts=[{"name": "data", "mountPath": path}])
        assert info.value.subject == path.rstrip("/")
    with pytest.raises(ConfigurationError, match="volume name is stepguard's own") as info:
        _pod(IsolationSpec(mode="pod", image=DIGEST),
             user_volumes=[{"name": "scratch", "emptyDir": {}}])
    assert info.value.subject == "scratch"
    with pytest.raises(ConfigurationError, match="names no volume"):
        _pod(IsolationSpec(mode="pod", image=DIGEST),
             user_volume_mounts=[{"name": "nope", "mountPath": "/x"}])


def test_gpu_steps_get_a_longer_default_deadline() -> None:
    assert StepSpec(name="s").deadline_s == 3600
    train = StepSpec.from_dict({"name": "t", "isolation": {"mode": "pod", "gpus": 1}})
    assert train.deadline_s == 12 * 3600
    assert StepSpec.from_dict(train.to_dict()) == train
    assert StepSpec(name="t", isolation=IsolationSpec(gpus=1), deadline_s=60).deadline_s == 60


def test_probe_reads_device_nodes_and_cuda_visible_devices(tmp_path: Path) -> None:
    for n in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (tmp_path / n).touch()
    assert probe_gpus(environ={}, dev=str(tmp_path), smi=None).visible == 2
    assert probe_gpus(environ={"CUDA_VISIBLE_DEVICES": "1"}, dev=str(tmp_path),
                      smi=None).visible == 1
    assert probe_gpus(environ={"CUDA_VISIBLE_DEVICES": ""}, dev=str(tmp_path),
                      smi=None).visible == 0
    # A driver whose tool cannot list the GPUs makes them unusable.
    failing = probe_gpus(environ={}, dev=str(tmp_path), smi="/bin/false")
    assert failing.visible == 0 and failing.smi_error == "exit 1"
    with pytest.raises(GpuUnavailable) as info:
        require_gpus(1, probe=failing)
    assert "nvidia-smi -L: exit 1" in info.value.details


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU: see test_gpu.py")
@pytest.mark.parametrize("mode", ["sandbox", "process"])
def test_gpu_request_without_a_gpu_is_refused(mode: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(GpuUnavailable, match="asks for 1 GPU") as info:
        run_isolated(["touch", str(marker)], IsolationSpec(mode=mode, gpus=1),  # type: ignore[arg-type]
                     deadline_s=30, rw_binds={str(tmp_path): str(tmp_path)})
    assert not marker.exists()
    assert info.value.subject == "isolation.gpus"
    assert "/dev/nvidia[0-9]*: 0 device node(s)" in info.value.details
    assert probe_gpus().visible == 0
    with pytest.warns(UserWarning, match="gpus_optional"):
        assert require_gpus(1, optional=True, probe=GpuProbe(device_nodes=0)) == 0


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU: see test_gpu.py")
def test_step_runner_refuses_a_gpu_step_without_a_gpu(tmp_path: Path) -> None:
    spec = tmp_path / "step.yaml"
    # The input does not exist: the GPU refusal comes first, before credentials or inputs.
    spec.write_text(yaml.safe_dump({"name": "train", "deadline_s": 60,
                                    "inputs": [{"name": "data", "path": str(tmp_path / "no"),
                                                "manifest": str(tmp_path / "no.json")}],
                                    "isolation": {"mode": "process", "gpus": 1}}))
    env = {**os.environ, "STEPGUARD_AUDIT_EXPORTER": "none",
           "STEPGUARD_STATE_DIR": str(tmp_path / "state")}
    argv = [sys.executable, "-m", "stepguard.cli", "exec", "--spec", str(spec), "--",
            "touch", str(tmp_path / "ran")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120, check=False)
    assert proc.returncode == 5, proc.stderr
    assert "asks for 1 GPU(s), 0 visible" in proc.stderr and "isolation.gpus" in proc.stderr
    assert not (tmp_path / "ran").exists()
    spec.write_text(yaml.safe_dump({"name": "train", "deadline_s": 60, "isolation": {
        "mode": "process", "gpus": 1, "gpus_optional": True}}))
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ran").exists()
