"""The checked-in component YAMLs are current, pinned by digest and never install at run time;
a hardened pipeline's compiled IR carries the isolation settings in its Kubernetes platform spec.
"""

import doctest
import importlib
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("kfp")

ROOT = Path(__file__).resolve().parents[2]
YAML_DIR = ROOT / "components" / "stepguard_kfp" / "yaml"


def _compile_script():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module("compile_components")
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_checked_in_yamls_are_not_stale() -> None:
    diffs = _compile_script().stale(YAML_DIR)
    assert not diffs, "stale component YAMLs; run scripts/compile_components.py\n" + "".join(diffs)


def test_stale_check_detects_an_edited_yaml(tmp_path: Path) -> None:
    script = _compile_script()
    script.compile_all(tmp_path)
    assert script.stale(tmp_path) == []
    target = tmp_path / "verify_dataset.yaml"
    target.write_text(target.read_text().replace("verify_dataset_step", "other_step"))
    (diff,) = script.stale(tmp_path)
    assert "verify_dataset.yaml" in diff


def test_image_override_must_be_a_digest(tmp_path: Path) -> None:
    from stepguard.errors import ConfigurationError

    script = _compile_script()
    pinned = "registry.example/stepguard-runtime@sha256:" + "ab" * 32
    script.compile_all(tmp_path, image=pinned)
    assert pinned in (tmp_path / "secure_train.yaml").read_text()
    with pytest.raises(ConfigurationError, match="pinned by digest"):
        script.compile_all(tmp_path / "t", image="registry.example/stepguard-runtime:1.0")


@pytest.mark.parametrize("name", ["verify_dataset", "secure_train", "secure_train_container",
                                  "sign_and_publish", "verify_model"])
def test_component_yaml_is_pinned_and_installs_nothing(name: str) -> None:
    import stepguard_kfp

    text = stepguard_kfp.component_yaml(name).read_text()
    doc = yaml.safe_load(text)
    (executor,) = doc["deploymentSpec"]["executors"].values()
    container = executor["container"]
    assert "@sha256:" in container["image"]
    assert container["image"] == stepguard_kfp.DEFAULT_IMAGE
    flat = " ".join(container.get("command", []) + container.get("args", []))
    assert "pip install" not in flat and "pip3 install" not in flat
    # Lightweight components delegate to the image's stepguard_kfp runtime, nothing else.
    if name != "secure_train_container":
        assert f"stepguard_kfp._runtime import {name}_step" in flat


def test_loaded_component_yaml_is_usable_in_a_pipeline(tmp_path: Path) -> None:
    from kfp import compiler, components, dsl

    import stepguard_kfp

    op = components.load_component_from_file(str(stepguard_kfp.component_yaml("verify_dataset")))

    @dsl.pipeline
    def p(data: str, manifest: str):
        op(dataset_path=data, manifest_path=manifest)

    compiler.Compiler().compile(p, str(tmp_path / "p.yaml"))
    doc = yaml.safe_load(next(iter([(tmp_path / "p.yaml").read_text()])))
    assert list(doc["root"]["dag"]["tasks"]) == ["verify-dataset"]
    (executor,) = doc["deploymentSpec"]["executors"].values()
    assert executor["container"]["image"] == stepguard_kfp.DEFAULT_IMAGE


def _platform(spec_path: Path) -> dict:
    docs = list(yaml.safe_load_all(spec_path.read_text()))
    return docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.mark.usefixtures("pods_image")
def test_hardened_pipeline_ir_carries_the_isolation_settings(tmp_path: Path) -> None:
    from kfp import compiler, dsl

    from stepguard.spec import IsolationSpec, RunContext
    from stepguard_kfp import harden, verify_dataset

    spec = IsolationSpec(
        mode="pod", gpus=2, cpu="4", memory="16Gi", uid=1234,
        node_selector={"pool": "gpu-a100"},
        tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
        runtime_class="gvisor", scratch_size="20Gi",
    )
    reports = []

    @dsl.pipeline(name="hardened")
    def hardened(data: str, manifest: str):
        t = verify_dataset(dataset_path=data, manifest_path=manifest)
        reports.append(harden(t, spec, deadline_s=900,
                              context=RunContext(pipeline="hardened", run_id="r1",
                                                 step="verify")))

    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(hardened, str(out))
    (executor,) = _platform(out).values()
    assert executor["securityContext"] == {"runAsUser": "1234", "runAsGroup": "1234",
                                           "runAsNonRoot": True}
    assert executor["activeDeadlineSeconds"] == "960"
    assert executor["nodeSelector"]["labels"] == {"pool": "gpu-a100"}
    assert executor["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                        "effect": "NoSchedule"}]
    labels = executor["podMetadata"]["labels"]
    assert labels["stepguard.dev/network"] == "none"
    assert labels["stepguard.dev/step"] == "verify"
    assert labels["stepguard.dev/pipeline"] == "hardened"
    assert "gvisor" in executor["podMetadata"]["annotations"]["stepguard.dev/isolation"]
    mounts = {m["mountPath"]: m.get("sizeLimit") for m in executor["emptyDirMounts"]}
    assert mounts == {"/scratch": "20Gi", "/tmp": "256Mi"}

    doc = next(yaml.safe_load_all(out.read_text()))
    (container,) = [e["container"] for e in doc["deploymentSpec"]["executors"].values()]
    res = container["resources"]
    assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert res["accelerator"]["resourceCount"] == "2"
    assert res["resourceCpuLimit"] == "4" and res["resourceMemoryLimit"] == "16Gi"
    (task,) = doc["root"]["dag"]["tasks"].values()
    assert task["cachingOptions"].get("enableCache", False) is False

    (report,) = reports
    assert set(report.gap_settings) == {"network", "service_account_token", "runtime_class",
                                        "read_only_root", "pids_limit"}
    assert all(g.remedy for g in report.gaps)


def test_doctests_of_the_package() -> None:
    failures = 0
    for mod in ("stepguard_kfp", "stepguard_kfp._image", "stepguard_kfp._harden",
                "stepguard_kfp._runtime"):
        failures += doctest.testmod(importlib.import_module(mod)).failed
    assert failures == 0


@pytest.mark.usefixtures("pods_image")
def test_example_pipeline_ir_is_hardened_on_every_task(tmp_path: Path) -> None:
    import importlib.util

    from kfp import compiler

    spec = importlib.util.spec_from_file_location(
        "kfp_secure_training", ROOT / "dags_examples" / "kfp_secure_training.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "example.yaml"
    compiler.Compiler().compile(mod.secure_training, str(out))
    executors = _platform(out)
    assert set(executors) == {"exec-verify-dataset", "exec-secure-train", "exec-sign-and-publish",
                              "exec-verify-model"}
    for name, ex in executors.items():
        assert ex["securityContext"]["runAsNonRoot"] is True, name
        assert ex["podMetadata"]["labels"]["stepguard.dev/pipeline"] == mod.PIPELINE_NAME
        assert {m["mountPath"] for m in ex["emptyDirMounts"]} == {"/scratch", "/tmp"}
    train = executors["exec-secure-train"]
    assert train["activeDeadlineSeconds"] == str(int(mod.TRAIN_STEP.deadline_s) + 60)
    assert train["podMetadata"]["labels"]["stepguard.dev/network"] == "none"
    assert executors["exec-verify-model"]["podMetadata"]["labels"]["stepguard.dev/network"] \
        == "allowlist"
    doc = next(yaml.safe_load_all(out.read_text()))
    assert all(not t["cachingOptions"].get("enableCache", False)
               for t in doc["root"]["dag"]["tasks"].values())
    res = doc["deploymentSpec"]["executors"]["exec-secure-train"]["container"]["resources"]
    assert res["resourceCpuLimit"] == "2" and res["resourceMemoryLimit"] == "4Gi"
    text = out.read_text()
    assert "pip install" not in text and "@sha256:" in text
