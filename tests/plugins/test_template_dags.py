"""The templated example (dags_examples/templated_training.py) through ``dag.test()`` on the real
dev stack: two instances as two DAGs and as one mapped DAG, each with its own credential,
receipts and registry entry; a weakening instance fails at parse time, and a weakened task is
refused by the step runner at run time.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.airflow, pytest.mark.services, pytest.mark.sandbox, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "dags_examples" / "templated_training.py"
TEMPLATE = REPO / "dags_examples" / "templates" / "training.yaml"
STAGES = ["ingest", "verify_dataset", "train", "sign_and_publish", "gate"]
FLOOR = {"isolated_steps": ["train"], "no_egress_steps": ["train"],
         "signature_policy": "release", "max_credential_ttl_s": 3600, "inputs_verified": True}


def _canary(region: str) -> str:
    return f"tracking-canary-{region}-7c41"


@pytest.fixture
def template_env(airflow_run, stepguard_env, dev_stack, monkeypatch):
    """Settings with the platform's floor, a data lake with one dataset per model, and one
    tracking token per model in Vault."""
    import hvac

    from stepguard.testing.examples import customer_rows, write_csv

    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed")
    root = stepguard_env
    client = hvac.Client(url=dev_stack.vault_addr, token=dev_stack.vault_root_token)
    for offset, region in enumerate(("us", "eu")):
        client.secrets.kv.v2.create_or_update_secret(
            path=f"stepguard/tracking/churn-{region}", secret={"token": _canary(region)},
            mount_point="secret")
        data = root / "lake" / f"churn-{region}"
        data.mkdir(parents=True)
        write_csv(data, customer_rows(80 + 40 * offset))
    cfg = root / "stepguard.yaml"
    cfg.write_text(json.dumps({
        "vault": {"addr": dev_stack.vault_addr, "auth": "approle"},
        "registry": {"url": f"file://{root / 'registry'}"},
        "policies": {"release": {"kind": "transit", "key": "stepguard-signing",
                                 "min_version": 1}},
        "floor": FLOOR,
    }))
    monkeypatch.setenv("STEPGUARD_CONFIG", str(cfg))
    monkeypatch.setenv("STEPGUARD_DATA_LAKE", str(root / "lake"))
    # the DAG files are copied into the dags folder; the template stays where it is deployed
    monkeypatch.setenv("STEPGUARD_TRAINING_TEMPLATE", str(TEMPLATE))
    monkeypatch.setenv("VAULT_ADDR", dev_stack.vault_addr)
    monkeypatch.setenv("VAULT_ROLE_ID", dev_stack.approle_role_id)
    monkeypatch.setenv("VAULT_SECRET_ID_FILE", str(dev_stack.approle_secret_id_file))
    return root


def _xcoms(dag_run, task_id: str, key: str = "return_value") -> dict[int, object]:
    """map index -> XCom value of every instance of a (mapped) task."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(select(XComModel).where(
            XComModel.dag_id == dag_run.dag_id, XComModel.run_id == dag_run.run_id,
            XComModel.task_id == task_id, XComModel.key == key)).all()
        return {row.map_index: XComModel.deserialize_value(row) for row in rows}


def _labels(dag_run) -> dict[tuple[str, int], str | None]:
    from airflow.utils.session import create_session

    with create_session() as session:
        return {(ti.task_id, ti.map_index): ti.rendered_map_index
                for ti in dag_run.get_task_instances(session=session)}


def _check_instance(receipts: dict[str, dict], region: str) -> None:
    ingest, verify, train, publish, gate = (receipts[s] for s in STAGES)
    dataset = ingest["outputs"][0]["digest"]
    assert verify["inputs"][0]["digest"] == dataset and verify["inputs"][0]["verified"]
    assert train["inputs"][0]["digest"] == dataset
    assert train["isolation"]["mode"] == "sandbox"
    # this instance's own credential, minted under the train step's token and nothing left
    [lease] = train["credentials"]
    assert lease["name"] == "tracking" and lease["kind"] == "kv"
    assert not (lease["revocable"] and not lease["revoked"])
    for other in (ingest, verify, publish, gate):
        assert other["credentials"] == []
    metrics = json.loads((Path(train["outputs"][0]["path"]) / "metrics.json").read_text())
    assert metrics["tracking_token_sha256"] == hashlib.sha256(
        _canary(region).encode()).hexdigest()
    published = publish["outputs"][0]["published"]
    assert published["name"] == f"churn-{region}"
    assert published["signer"].startswith("transit:")
    assert publish["outputs"][0]["digest"] == train["outputs"][0]["digest"]
    assert gate["outputs"][0]["digest"] == publish["outputs"][0]["digest"]


def test_factory_dags_one_per_instance(airflow_run, template_env, capfd):
    module = airflow_run.load(EXAMPLE, "templated_training_factory")
    dags = {name: getattr(module, f"training_churn_{name}") for name in ("us", "eu")}
    digests = {}
    for region, dag in dags.items():
        # params are injected: each DAG says which instance it is
        assert dag.params["model"] == f"churn-{region}"
        assert dag.params["region"] == region and dag.params["template"] == "training"
        dr = dag.test()
        assert airflow_run.states(dr) == dict.fromkeys(STAGES, "success"), \
            capfd.readouterr().out[-4000:]
        receipts = {s: airflow_run.xcom_of(dr, s) for s in STAGES}
        _check_instance(receipts, region)
        digests[region] = receipts["ingest"]["outputs"][0]["digest"]
    assert digests["us"] != digests["eu"]
    out, err = capfd.readouterr()
    for region in ("us", "eu"):
        assert _canary(region) not in out + err


def test_mapped_dag_one_instance_per_map_index(airflow_run, template_env, capfd):
    module = airflow_run.load(EXAMPLE, "templated_training_mapped")
    dag = module.training_mapped
    assert dag.params["instances"] == ["churn_us", "churn_eu"]
    dr = dag.test()
    labels = _labels(dr)
    assert set(airflow_run.states(dr).values()) == {"success"}, capfd.readouterr().out[-4000:]
    by_stage = {s: _xcoms(dr, s) for s in STAGES}
    for index, region in enumerate(("us", "eu")):
        _check_instance({s: by_stage[s][index] for s in STAGES}, region)
        for stage in STAGES:
            assert labels[(stage, index)] == f"churn_{region}"
        # separate run directories per instance
        assert by_stage["train"][index]["context"]["step"] == f"train.{index}"
    runs = {by_stage["train"][i]["outputs"][0]["path"] for i in (0, 1)}
    assert len(runs) == 2


def test_weakening_instance_fails_at_parse_time(airflow_run, template_env):
    from stepguard.errors import PolicyViolation

    source = EXAMPLE.read_text().replace(
        '"params": {"region": region}}',
        '"params": {"region": region}, "isolation": {"network": ["pypi.org:443"]}}')
    assert source != EXAMPLE.read_text()
    path = template_env / "weakened.py"
    path.write_text(source)
    with pytest.raises(PolicyViolation) as caught:
        airflow_run.load(path, "templated_training_weakened")
    assert str(caught.value).startswith("floor rule 'no-egress' violated")
    assert "churn_us.train.isolation.network" in str(caught.value)


def test_weakened_task_is_refused_by_the_step_runner(airflow_run, template_env, capfd):
    module = airflow_run.load(EXAMPLE, "templated_training_runtime")
    dag = module.training_churn_us
    # A DAG edited after the template checked it: the train task now runs unisolated.
    dag.task_dict["train"].isolation = "process"
    dr = dag.test()
    out = capfd.readouterr().out
    states = airflow_run.states(dr)
    assert states["train"] == "failed", out[-4000:]
    assert states["sign_and_publish"] == states["gate"] == "upstream_failed"
    assert ("stepguard step 'train' failed: PolicyViolation [policy]: "
            "floor rule 'isolated' violated" in out)
    failed = airflow_run.xcom_of(dr, "train", "stepguard_failed_receipt")
    assert failed["error"]["type"] == "PolicyViolation"
    assert failed["credentials"] == []  # refused before any credential was minted


MAPPED_WITH_FETCH = '''
import shutil, sys
from pathlib import Path
from stepguard.template import PipelineTemplate
from stepguard_airflow.template import build_mapped_dag

def fetch(step_env, dest, instance):
    # the instance arrives as an argument: no get_current_context(), no ti.map_index
    Path(SEEN, instance.name).write_text(instance.dataset)
    shutil.copytree(instance.dataset, dest, dirs_exist_ok=True)

TRAIN = "import os, pathlib; (pathlib.Path(os.environ['STEPGUARD_OUTPUT_MODEL']) / 'w').write_text('1')"
MODELS = PipelineTemplate.from_file(TEMPLATE).instantiate_all(
    {"name": f"m_{r}", "model_name": f"fetched-{r}", "dataset": f"{LAKE}/churn-{r}",
     "train_command": [sys.executable, "-c", TRAIN]} for r in ("us", "eu"))
dag = build_mapped_dag(MODELS, "{dag_id}", fetch=fetch)
'''


def test_a_fetch_function_receives_its_instance(airflow_run, template_env, capfd):
    seen = template_env / "seen"
    seen.mkdir()
    source = (f"SEEN = {str(seen)!r}\nTEMPLATE = {str(TEMPLATE)!r}\n"
              f"LAKE = {str(template_env / 'lake')!r}\n") + MAPPED_WITH_FETCH
    dag, _ = airflow_run.write(source)
    dr = dag.test()
    assert set(airflow_run.states(dr).values()) == {"success"}, capfd.readouterr().out[-4000:]
    assert {p.name: p.read_text() for p in seen.iterdir()} == {
        "m_us": str(template_env / "lake" / "churn-us"),
        "m_eu": str(template_env / "lake" / "churn-eu")}
    ingest, publish = _xcoms(dr, "ingest"), _xcoms(dr, "sign_and_publish")
    assert ingest[0]["outputs"][0]["digest"] != ingest[1]["outputs"][0]["digest"]
    assert [publish[i]["outputs"][0]["published"]["name"] for i in (0, 1)] == \
        ["fetched-us", "fetched-eu"]
