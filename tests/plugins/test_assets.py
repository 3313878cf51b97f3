"""Chain of custody across DAGs: the example producer announces its output as an Airflow Asset,
the example consumer verifies its input against the asset event that triggered it.

Both DAGs of ``dags_examples/asset_custody.py`` run for real through ``dag.test()``. The
producer's run records a real asset event (the task SDK's outlet events, registered by the
execution API). ``dag.test()`` always makes a manual run, so the consumer's run is given the
events to consume exactly as the scheduler gives them to an asset-triggered run
(``dag_run.consumed_asset_events``); the task then reads them through
``context["triggering_asset_events"]`` from the execution API like any triggered run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.airflow]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "dags_examples" / "asset_custody.py"


@pytest.fixture
def triggered_by(monkeypatch):
    """``triggered_by[dag_id] = [event ids]``: the next ``dag.test()`` run of that DAG consumes
    those asset events, as an asset-triggered run does."""
    from airflow.models import dagrun as dagrun_module
    from airflow.models.asset import AssetEvent
    from sqlalchemy import select

    original = dagrun_module.get_or_create_dagrun
    chosen: dict[str, list[int]] = {}

    def get_or_create_dagrun(*, dag, session, **kwargs):
        dr = original(dag=dag, session=session, **kwargs)
        ids = chosen.pop(dag.dag_id, None)
        if ids:
            events = session.scalars(select(AssetEvent).where(AssetEvent.id.in_(ids))).all()
            dr.consumed_asset_events.extend(events)
            session.commit()
        return dr

    monkeypatch.setattr(dagrun_module, "get_or_create_dagrun", get_or_create_dagrun)
    return chosen


def _events_of(dag_run) -> list:
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(select(AssetEvent).where(
            AssetEvent.source_dag_id == dag_run.dag_id,
            AssetEvent.source_run_id == dag_run.run_id)).all()
        return [(e.id, e.asset.name, dict(e.extra)) for e in rows]


def _produce(airflow_run):
    module = airflow_run.load(EXAMPLE, "asset_custody")
    dr = module.producer.test()
    assert airflow_run.states(dr) == {"build_features": "success"}
    receipt = airflow_run.xcom_of(dr, "build_features")
    events = _events_of(dr)
    assert [(name, list(extra)) for _, name, extra in events] == [
        ("churn_features", ["stepguard"])]
    return module, receipt, events[0]


def test_consumer_verifies_the_producers_data_against_the_triggering_event(
        airflow_run, stepguard_env, triggered_by):
    module, receipt, (event_id, _, extra) = _produce(airflow_run)
    record = extra["stepguard"]
    out = receipt["outputs"][0]
    assert (record["digest"], record["manifest"], record["path"]) == (
        out["digest"], out["manifest"], out["path"])
    assert record["receipt"] == receipt and record["receipt_uri"].endswith("receipt.json")
    assert Path(record["receipt_uri"]).is_file()

    triggered_by["churn_features_consumer"] = [event_id]
    dr = module.consumer.test()
    assert airflow_run.states(dr) == {"verify_features": "success", "summarize": "success"}
    for task in ("verify_features", "summarize"):
        (inp,) = airflow_run.xcom_of(dr, task)["inputs"]
        assert inp["verified"] is True and inp["digest"] == out["digest"]
        assert inp["path"] == out["path"]
    assert airflow_run.xcom_of(dr, "summarize", "result") == 200


def test_data_changed_between_the_dags_stops_the_consumer(airflow_run, stepguard_env,
                                                          triggered_by, capfd):
    module, receipt, (event_id, _, _) = _produce(airflow_run)
    csv = Path(receipt["outputs"][0]["path"]) / "churn.csv"
    csv.write_text(csv.read_text().replace("\n5,", "\n5,9", 1))  # one row changed

    triggered_by["churn_features_consumer"] = [event_id]
    capfd.readouterr()
    dr = module.consumer.test()
    out = capfd.readouterr().out
    assert airflow_run.states(dr) == {"verify_features": "failed",
                                      "summarize": "upstream_failed"}
    assert "stepguard step 'verify_features' failed: IntegrityError" in out
    assert "churn.csv" in out


def test_an_event_without_stepguard_metadata_is_refused(airflow_run, stepguard_env,
                                                        triggered_by, capfd):
    """An event posted by hand (REST API, another tool) names the asset but no receipt."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    module = airflow_run.load(EXAMPLE, "asset_custody")
    module.producer.test()  # registers the asset
    with create_session() as session:
        asset = session.scalars(select(AssetModel).where(
            AssetModel.name == "churn_features")).one()
        event = AssetEvent(asset_id=asset.id, extra={"note": "posted by hand"})
        session.add(event)
        session.flush()
        event_id = event.id

    triggered_by["churn_features_consumer"] = [event_id]
    capfd.readouterr()
    dr = module.consumer.test()
    out = capfd.readouterr().out
    assert airflow_run.states(dr) == {"verify_features": "failed",
                                      "summarize": "upstream_failed"}
    assert "failed: VerificationError [integrity]: the triggering asset event carries no " \
           "stepguard record" in out


def test_a_run_without_an_asset_event_is_refused(airflow_run, stepguard_env, capfd):
    module = airflow_run.load(EXAMPLE, "asset_custody")
    capfd.readouterr()
    dr = module.consumer.test()  # a manual run: nothing triggered it
    out = capfd.readouterr().out
    assert airflow_run.states(dr)["verify_features"] == "failed"
    assert "this run was not triggered by an event of the asset" in out


def test_with_signed_receipts_an_edited_event_is_refused(airflow_run, stepguard_env,
                                                         triggered_by, monkeypatch, capfd):
    """``receipts.signer`` on the producer, ``receipts.policy`` on the consumer: an event whose
    receipt was edited -- even consistently with its summary -- fails the signature check."""
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    from stepguard.receipt import Receipt

    root = stepguard_env
    key = ec.generate_private_key(ec.SECP256R1())
    (root / "r.pem").write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                                   ser.NoEncryption()))
    (root / "r.pub").write_bytes(key.public_key().public_bytes(
        ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    (root / "stepguard.yaml").write_text(
        f"policies:\n  steps: {{kind: key, public_keys: [{root / 'r.pub'}]}}\n"
        f"receipts: {{signer: key, key: {root / 'r.pem'}, policy: steps}}\n")
    monkeypatch.setenv("STEPGUARD_CONFIG", str(root / "stepguard.yaml"))

    module, receipt, (event_id, _, extra) = _produce(airflow_run)
    assert receipt.get("signature")
    # The forger: another digest in the receipt and, consistently, in the event's summary.
    forged = dict(extra["stepguard"])
    data = dict(forged["receipt"])
    data["outputs"] = [{**data["outputs"][0], "digest": "sha256:" + "0" * 64}]
    forged.update(receipt=data, digest=data["outputs"][0]["digest"],
                  receipt_digest=Receipt.from_dict(data).digest)
    with create_session() as session:
        session.get(AssetEvent, event_id).extra = {"stepguard": forged}

    triggered_by["churn_features_consumer"] = [event_id]
    capfd.readouterr()
    dr = module.consumer.test()
    out = capfd.readouterr().out
    assert airflow_run.states(dr) == {"verify_features": "failed",
                                      "summarize": "upstream_failed"}
    assert "failed: SignatureError [signing]: receipt was changed after it was signed" in out
