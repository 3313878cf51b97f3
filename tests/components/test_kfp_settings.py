"""Components on a cluster take the platform's settings from a ConfigMap (or settings_path).

The compiled IR is KFP's own compiler output; the in-pod behaviour runs the real component
runtime in a subprocess whose environment is a KFP pod's (the variables the KFP driver sets).
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("kfp")

POD_ENV = {"KFP_POD_NAME": "p-1", "KFP_POD_UID": "u-1", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
DEFAULT_FILE = "/etc/stepguard/stepguard.yaml"


def _compiled(tmp_path: Path, **kw: Any) -> dict[str, Any]:
    from kfp import compiler, dsl

    from stepguard_kfp import use_settings, verify_dataset

    @dsl.pipeline(name="settings")
    def pipeline(data: str, manifest: str) -> None:
        use_settings(verify_dataset(dataset_path=data, manifest_path=manifest), **kw)

    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(pipeline, str(out))
    docs = list(yaml.safe_load_all(out.read_text()))
    platform: dict[str, Any] = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]
    return platform["executors"]["exec-verify-dataset"]


def test_settings_configmap_is_mounted_read_only_in_the_compiled_ir(tmp_path: Path) -> None:
    ex = _compiled(tmp_path, vault_auth="jwt")
    (vol,) = ex["configMapAsVolume"]
    assert vol["configMapName"] == "stepguard-settings"
    assert vol["mountPath"] == "/etc/stepguard" and vol["optional"] is False
    (env,) = ex["configMapAsEnv"]
    assert env["optional"] is True
    mapped = {e["configMapKey"]: e["envVar"] for e in env["keyToEnv"]}
    assert mapped["OTEL_EXPORTER_OTLP_ENDPOINT"] == "OTEL_EXPORTER_OTLP_ENDPOINT"
    assert mapped["AWS_ENDPOINT_URL"] == "AWS_ENDPOINT_URL"
    assert ex["podMetadata"]["labels"]["stepguard.dev/vault-auth"] == "jwt"
    other = _compiled(tmp_path, config_map="team-a-settings", mount_path="/etc/sg")
    assert other["configMapAsVolume"][0]["configMapName"] == "team-a-settings"


def _in_pod(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("STEPGUARD_", "OTEL_", "VAULT_", "KFP_"))}
    full.update(POD_ENV)
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full, cwd=tmp_path, timeout=120, check=False)


@pytest.mark.skipif(os.path.exists(DEFAULT_FILE), reason=f"{DEFAULT_FILE} exists here")
@pytest.mark.parametrize("step", ["verify_dataset", "verify_model", "secure_train"])
def test_a_pod_without_settings_is_refused_before_any_work(step: str, tmp_path: Path) -> None:
    calls = {
        "verify_dataset": "verify_dataset_step(dataset_path='d', manifest_path='m', "
                          "manifest_out='o')",
        "verify_model": "verify_model_step(publish_receipt='{}', model_name='m', "
                        "model_version='1', signature_policy='release', out_dir='o')",
        "secure_train": "secure_train_step(step_spec='{}', command=['true'], dataset_path='d', "
                        "dataset_manifest='m', dataset_receipt='{}', model_dir='o', "
                        "manifest_out='mo')",
    }
    proc = _in_pod(f"from stepguard_kfp._runtime import *; {calls[step]}", tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "no stepguard settings in this pod" in proc.stderr
    assert DEFAULT_FILE in proc.stderr and "use_settings" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def _settings_file(tmp_path: Path, **extra: Any) -> Path:
    data = {"vault": {"addr": "https://vault.vault.svc:8200", "auth": "jwt", "role": "kfp",
                      "jwt_path": "/var/run/secrets/stepguard/vault/token"},
            "policies": {"release": {"kind": "transit", "key": "release", "min_version": 1}},
            **extra}
    path = tmp_path / "cm" / "stepguard.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_pod_settings_come_from_the_mounted_file(tmp_path: Path) -> None:
    from stepguard_kfp._settings import load_settings

    path = _settings_file(tmp_path)
    s = load_settings(str(path), environ=POD_ENV)
    assert s.vault.addr == "https://vault.vault.svc:8200" and s.vault.auth == "jwt"
    assert s.policy("release").key == "release"
    assert s.state_dir == "/tmp/stepguard"  # the root filesystem is read-only in the pod
    s = load_settings("", environ={**POD_ENV, "STEPGUARD_CONFIG": str(path),
                                   "STEPGUARD_STATE_DIR": "/scratch/sg"})
    assert s.state_dir == "/scratch/sg"


def test_the_gate_finds_its_policy_in_the_settings_file(tmp_path: Path) -> None:
    path = _settings_file(tmp_path)
    code = ("from stepguard_kfp._runtime import verify_model_step; verify_model_step("
            "publish_receipt='{}', model_name='m', model_version='1', "
            f"signature_policy='staging', out_dir='o', settings_path={str(path)!r})")
    proc = _in_pod(code, tmp_path)
    assert proc.returncode == 2, proc.stderr
    # The policy was looked up in the mounted settings (not "defined: none").
    assert "no such verification policy: policies.staging" in proc.stderr
    assert "defined: release" in proc.stderr


def test_an_otlp_exporter_without_endpoint_is_refused_in_a_pod(tmp_path: Path) -> None:
    from stepguard.errors import ConfigurationError
    from stepguard_kfp._settings import load_settings

    path = _settings_file(tmp_path, audit={"exporter": "otlp"})
    with pytest.raises(ConfigurationError, match="no OTLP endpoint") as info:
        load_settings(str(path), environ=POD_ENV)
    assert info.value.subject == "OTEL_EXPORTER_OTLP_ENDPOINT"
    ok = load_settings(str(path), environ={
        **POD_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.obs.svc:4318"})
    assert ok.audit.exporter == "otlp"
    # The endpoint may also be the settings' own pods.otlp_endpoint.
    path = _settings_file(tmp_path, audit={"exporter": "otlp"},
                          pods={"otlp_endpoint": "http://otel-collector.obs.svc:4318"})
    assert load_settings(str(path), environ=POD_ENV).audit.exporter == "otlp"


def test_outside_a_pod_the_usual_search_applies(tmp_path: Path) -> None:
    from stepguard_kfp._settings import load_settings

    s = load_settings("", environ={"VAULT_ADDR": "http://127.0.0.1:8200"}, in_pod=False)
    assert s.vault.addr == "http://127.0.0.1:8200"


def test_component_yamls_take_settings_path() -> None:
    import stepguard_kfp

    for name in stepguard_kfp.COMPONENT_NAMES:
        doc = yaml.safe_load(stepguard_kfp.component_yaml(name).read_text())
        params = doc["root"]["inputDefinitions"]["parameters"]
        assert params["settings_path"]["defaultValue"] == "", name
    doc = yaml.safe_load(stepguard_kfp.component_yaml("secure_train").read_text())
    assert "wrapped_credentials" in doc["root"]["inputDefinitions"]["parameters"]
    assert json.dumps(doc).count("wrapped_credentials") >= 2


# -- the runtime image: the one image setting, never the placeholder in a compiled pipeline ----

ROOT = Path(__file__).resolve().parents[2]
REAL = "registry.example/stepguard-runtime@sha256:" + "ab" * 32


def _compile_example(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("STEPGUARD_")}
    full.update(env)
    return subprocess.run(
        [sys.executable, str(ROOT / "dags_examples" / "kfp_secure_training.py"),
         "--compile", str(tmp_path / "ir.yaml")],
        capture_output=True, text=True, env=full, cwd=tmp_path, timeout=300, check=False)


def test_compiled_example_carries_the_configured_image(tmp_path: Path) -> None:
    proc = _compile_example(tmp_path, STEPGUARD_PODS_IMAGE=REAL)
    assert proc.returncode == 0, proc.stderr
    docs = list(yaml.safe_load_all((tmp_path / "ir.yaml").read_text()))
    images = {ex["container"]["image"]
              for ex in docs[0]["deploymentSpec"]["executors"].values()}
    assert images == {REAL}
    assert "0" * 64 not in (tmp_path / "ir.yaml").read_text()
    k8s = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert all(ex["configMapAsVolume"][0]["configMapName"] == "stepguard-settings"
               for ex in k8s.values())


def test_compiling_the_example_without_an_image_is_refused(tmp_path: Path) -> None:
    proc = _compile_example(tmp_path)
    assert proc.returncode == 2
    assert "all-zero placeholder" in proc.stderr and "STEPGUARD_PODS_IMAGE" in proc.stderr
    assert not (tmp_path / "ir.yaml").exists()


def test_harden_gives_a_task_the_configured_image(monkeypatch: pytest.MonkeyPatch) -> None:
    from kfp import dsl

    from stepguard.errors import ConfigurationError
    from stepguard.spec import IsolationSpec
    from stepguard_kfp import harden, verify_dataset

    monkeypatch.setenv("STEPGUARD_PODS_IMAGE", REAL)
    seen = []

    @dsl.pipeline(name="p")
    def pipeline(data: str, manifest: str) -> None:
        task = verify_dataset(dataset_path=data, manifest_path=manifest)
        harden(task, IsolationSpec(mode="pod"), deadline_s=60)
        seen.append(task.container_spec.image)

    assert seen == [REAL]
    monkeypatch.setenv("STEPGUARD_PODS_IMAGE", "registry.example/x@sha256:" + "0" * 64)
    with pytest.raises(ConfigurationError, match="placeholder"):
        @dsl.pipeline(name="q")
        def refused(data: str, manifest: str) -> None:
            harden(verify_dataset(dataset_path=data, manifest_path=manifest),
                   IsolationSpec(mode="pod"), deadline_s=60)
