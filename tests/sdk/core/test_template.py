"""Pipeline templates and the policy floor: typed instances, the YAML form, a weakening refused at
instantiation with the rule named, and the same floor refused at run time by the real step runner.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stepguard.errors import ConfigurationError, PolicyViolation
from stepguard.floor import Floor
from stepguard.settings import Settings
from stepguard.spec import StepSpec
from stepguard.step import run_step
from stepguard.template import Instance, PipelineTemplate

REPO = Path(__file__).resolve().parents[3]
TEMPLATE_FILE = REPO / "dags_examples" / "templates" / "training.yaml"

FLOOR = {"isolated_steps": ["train"], "no_egress_steps": ["train"],
         "signature_policy": "release", "max_credential_ttl_s": 3600, "inputs_verified": True}
PYTHON_FORM = {
    "name": "training",
    "description": "Secured training - ingest, verify, train isolated, sign and publish, gate.",
    "train": {"isolation": {"mode": "sandbox", "network": "none"}, "deadline_s": 900},
    "train_command": ["python3", "-m", "train"],
    "signing": {"signer": "transit", "key": "stepguard-signing"},
    "signature_policy": "release",
    "floor": FLOOR,
}


@pytest.fixture
def template() -> PipelineTemplate:
    return PipelineTemplate.from_dict(PYTHON_FORM)


def test_yaml_and_python_forms_are_the_same_template(template) -> None:
    assert PipelineTemplate.from_file(TEMPLATE_FILE) == template
    assert PipelineTemplate.from_dict(template.to_dict()) == template


def test_instances_are_typed_and_carry_their_own_settings(template) -> None:
    pi = template.instantiate(
        name="churn", dataset="/lake/churn", isolation={"gpus": 1, "memory": "8Gi"},
        credentials=[{"name": "tracking", "kind": "kv", "path": "stepguard/tracking/churn"}],
        params={"owner": "ml-team"})
    spec = pi.train_spec()
    assert (spec.name, spec.isolation.mode, spec.isolation.network) == ("train", "sandbox", "none")
    assert (spec.isolation.gpus, spec.isolation.memory) == (1, "8Gi")
    assert [c.path for c in spec.credentials] == ["stepguard/tracking/churn"]
    assert pi.dag_params() == {"model": "churn", "instance": "churn", "dataset": "/lake/churn",
                               "template": "training", "owner": "ml-team"}
    assert pi.pipeline_id == "training_churn" and pi.signature_policy == "release"
    with pytest.raises(ConfigurationError, match="unknown setting: instance.datset"):
        template.instantiate(name="x", datset="/d")
    with pytest.raises(ConfigurationError, match="duplicate instance name: a"):
        template.instantiate_all([{"name": "a", "dataset": "/1"}, {"name": "a", "dataset": "/2"}])


@pytest.mark.parametrize(("override", "rule", "field"), [
    ({"isolation": {"mode": "process"}}, "isolated", "fraud.train.isolation.mode"),
    ({"isolation": {"network": ["pypi.org:443"]}}, "no-egress", "fraud.train.isolation.network"),
    ({"isolation": {"unsafe_host_network": True}}, "no-egress",
     "fraud.train.isolation.network"),
    ({"signature_policy": "dev"}, "signed", "fraud.gate.signature_policy"),
    ({"deadline_s": 7200, "credentials": [{"name": "db", "kind": "database", "role": "r"}]},
     "credential-ttl", "fraud.train.deadline_s"),
    # the ingest step holds an S3 source's credential for its default deadline (3600 s + margin)
    ({"dataset_credential": {"name": "lake", "kind": "aws_sts", "role": "reader"}},
     "credential-ttl", "fraud.ingest.deadline_s"),
])
def test_a_weakening_instance_fails_with_the_rule_named(template, override, rule, field) -> None:
    with pytest.raises(PolicyViolation) as caught:
        template.instantiate(name="fraud", dataset="/lake/fraud", **override)
    text = str(caught.value)
    assert text.startswith(f"floor rule {rule!r} violated: ") and text.endswith(f": {field}")
    assert caught.value.exit_code == 3  # a security verdict: never retried


def test_a_template_that_breaks_its_own_floor_is_refused() -> None:
    weak = {**PYTHON_FORM, "train": {"isolation": {"mode": "process"}}}
    with pytest.raises(PolicyViolation, match="floor rule 'isolated' violated"):
        PipelineTemplate.from_dict(weak)


def test_instances_from_a_yaml_file(template, tmp_path: Path) -> None:
    f = tmp_path / "models.yaml"
    f.write_text("instances:\n  - {name: churn, dataset: /lake/churn}\n"
                 "  - {name: fraud, dataset: /lake/fraud, isolation: {mode: process}}\n")
    with pytest.raises(PolicyViolation, match="fraud.train.isolation.mode"):
        template.instances_from_file(f)
    f.write_text("instances:\n  - {name: churn, dataset: /lake/churn, version: '7'}\n")
    (churn,) = template.instances_from_file(f)
    assert churn.version("1") == "7" and isinstance(churn.instance, Instance)


# -- run time: the step runner and the settings' floor ---------------------------------------


def _settings(tmp_path: Path, **extra) -> Settings:
    return Settings.from_dict({"state_dir": str(tmp_path / "state"),
                               "audit": {"exporter": "none"}, "floor": FLOOR, **extra})


def test_the_step_runner_refuses_a_step_that_breaks_the_settings_floor(tmp_path: Path) -> None:
    marker = tmp_path / "body-ran"
    spec = StepSpec.from_dict({"name": "train", "isolation": {"mode": "process"},
                               "outputs": [{"name": "model", "path": str(tmp_path / "m")}]})
    with pytest.raises(PolicyViolation) as caught:
        run_step(spec, command=["touch", str(marker)], settings=_settings(tmp_path))
    assert str(caught.value).startswith("floor rule 'isolated' violated")
    assert not marker.exists()
    receipt = caught.value.receipt  # type: ignore[attr-defined]
    assert receipt.status == "failed" and receipt.error.type == "PolicyViolation"
    assert "floor rule 'isolated'" in receipt.error.message and receipt.outputs == ()
    # another step is not the floor's business: it runs
    other = StepSpec.from_dict({"name": "prepare", "isolation": {"mode": "process"}})
    assert run_step(other, command=["true"], settings=_settings(tmp_path)).status == "succeeded"


def test_the_runner_checks_the_signer_against_the_floors_policy(tmp_path: Path) -> None:
    policies = {"release": {"kind": "transit", "key": "stepguard-signing", "min_version": 1}}
    spec = StepSpec.from_dict({
        "name": "sign_and_publish", "isolation": {"mode": "process"},
        "signing": {"signer": "transit", "key": "team-key"},
        "outputs": [{"name": "model", "path": str(tmp_path / "m"),
                     "publish": {"name": "churn", "version": "1"}}]})
    with pytest.raises(PolicyViolation) as caught:
        run_step(spec, command=["true"], settings=_settings(tmp_path, policies=policies))
    assert str(caught.value) == ("floor rule 'signed' violated: output 'model' is signed by "
                                 "transit:team-key, which policy 'release' does not accept: "
                                 "sign_and_publish.signing")
    unsigned = StepSpec.from_dict({**spec.to_dict(), "signing": None})
    with pytest.raises(PolicyViolation, match="published unsigned"):
        run_step(unsigned, command=["true"], settings=_settings(tmp_path, policies=policies))


def test_the_floor_is_a_settings_section(tmp_path: Path) -> None:
    cfg = tmp_path / "stepguard.yaml"
    cfg.write_text(json.dumps({"floor": FLOOR}))
    settings = Settings.load(path=cfg, environ={})
    assert settings.floor == Floor.from_dict(FLOOR)
    with pytest.raises(ConfigurationError, match="unknown setting: floor.isolated"):
        Settings.from_dict({"floor": {"isolated": ["train"]}})


def test_instantiating_loads_no_orchestrator_or_client_library() -> None:
    code = (
        "import sys\n"
        "from stepguard.template import PipelineTemplate\n"
        f"t = PipelineTemplate.from_dict({PYTHON_FORM!r})\n"
        "[t.instantiate(name=f'm{i}', dataset='/d') for i in range(50)]\n"
        "heavy = {'airflow', 'kfp', 'hvac', 'boto3', 'kubernetes', 'model_signing'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "[]"
