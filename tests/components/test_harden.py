"""harden(): what it refuses, and the report of what KFP cannot express (compile-time only)."""

from pathlib import Path

import pytest

pytest.importorskip("kfp")
pytestmark = [pytest.mark.usefixtures("pods_image")]


def _task_in_pipeline(apply):
    """Build a pipeline whose single task goes through ``apply``; returns what apply returned."""
    from kfp import dsl

    from stepguard_kfp import verify_dataset

    box = []

    @dsl.pipeline
    def p(data: str, manifest: str):
        box.append(apply(verify_dataset(dataset_path=data, manifest_path=manifest)))

    return box[0]


def test_minimal_spec_applies_identity_scratch_and_reports_platform_gaps() -> None:
    from stepguard.spec import IsolationSpec
    from stepguard_kfp import harden

    report = _task_in_pipeline(lambda t: harden(t, IsolationSpec(mode="pod")))
    assert report.task == "verify-dataset"
    assert any(a.startswith("securityContext.runAsUser=65534") for a in report.applied)
    assert "caching=off" in report.applied
    assert not any(a.startswith("activeDeadlineSeconds") for a in report.applied)
    assert set(report.gap_settings) == {"network", "service_account_token", "read_only_root",
                                        "pids_limit"}
    assert report.spec_digest.startswith("sha256:")
    assert "gap: network=none" in report.summary()


def test_step_spec_gives_the_deadline_plus_grace() -> None:
    from stepguard.spec import StepSpec
    from stepguard_kfp import harden

    spec = StepSpec.from_dict({"name": "train", "deadline_s": 120.5,
                               "isolation": {"mode": "pod", "network": ["db.internal:5432"],
                                             "service_account": "trainer",
                                             "namespace": "ml", "vault_kubernetes_auth": True}})
    report = _task_in_pipeline(lambda t: harden(t, spec, grace_s=30))
    assert "activeDeadlineSeconds=151" in report.applied
    gaps = {g.setting: g for g in report.gaps}
    assert gaps["network"].wanted == "db.internal:5432"
    assert "allowlist" in gaps["network"].remedy
    assert {"service_account", "namespace", "vault_kubernetes_auth"} <= set(gaps)


def test_raise_for_gaps_lists_each_open_gap() -> None:
    from stepguard.errors import PolicyViolation
    from stepguard.spec import IsolationSpec
    from stepguard_kfp import harden

    report = _task_in_pipeline(lambda t: harden(t, IsolationSpec(runtime_class="gvisor")))
    with pytest.raises(PolicyViolation) as info:
        report.raise_for_gaps(accepted={"network", "service_account_token", "read_only_root"})
    assert {d.split("=")[0] for d in info.value.details} == {"runtime_class", "pids_limit"}
    report.raise_for_gaps(accepted=report.gap_settings)


def test_unpinned_image_is_refused_unless_the_spec_allows_it() -> None:
    from stepguard.errors import ConfigurationError
    from stepguard.spec import IsolationSpec
    from stepguard_kfp import harden

    def retag(t):
        t.container_spec.image = "python:3.11"
        return t

    with pytest.raises(ConfigurationError, match="pinned by digest"):
        _task_in_pipeline(lambda t: harden(retag(t), IsolationSpec()))
    report = _task_in_pipeline(
        lambda t: harden(retag(t), IsolationSpec(allow_unpinned_image=True)))
    assert "image" in report.gap_settings


@pytest.mark.parametrize("allow_unpinned", [False, True])
def test_without_pods_image_the_placeholder_is_refused(
        allow_unpinned: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from stepguard.errors import ConfigurationError
    from stepguard.spec import IsolationSpec
    from stepguard_kfp import harden

    monkeypatch.delenv("STEPGUARD_PODS_IMAGE")
    monkeypatch.delenv("STEPGUARD_CONFIG", raising=False)
    from stepguard_kfp import DEFAULT_IMAGE

    def placeholder(t):  # as a task of components imported before any setting was in place
        t.container_spec.image = DEFAULT_IMAGE
        return t

    spec = IsolationSpec(mode="pod", allow_unpinned_image=allow_unpinned)
    with pytest.raises(ConfigurationError, match="all-zero placeholder") as info:
        _task_in_pipeline(lambda t: harden(placeholder(t), spec))
    assert "STEPGUARD_PODS_IMAGE" in info.value.diagnostics()


def test_unknown_toleration_field_is_refused() -> None:
    from stepguard.errors import ConfigurationError
    from stepguard.spec import IsolationSpec
    from stepguard_kfp import harden

    spec = IsolationSpec(tolerations=({"key": "gpu", "efect": "NoSchedule"},))
    with pytest.raises(ConfigurationError, match="toleration"):
        _task_in_pipeline(lambda t: harden(t, spec))


def test_component_yaml_rejects_unknown_names() -> None:
    import stepguard_kfp
    from stepguard.errors import ConfigurationError

    assert stepguard_kfp.component_yaml("verify_model").is_file()
    with pytest.raises(ConfigurationError):
        stepguard_kfp.component_yaml("../../etc/passwd")
    assert isinstance(stepguard_kfp.component_yaml("secure_train"), Path)


def test_package_and_runtime_import_without_kfp_loaded() -> None:
    """The runtime the components execute, and the package root, do not import kfp."""
    import subprocess
    import sys

    code = ("import sys, stepguard_kfp, stepguard_kfp._runtime, stepguard_kfp.train; "
            "bad = [m for m in ('kfp', 'kubernetes', 'boto3', 'model_signing') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
