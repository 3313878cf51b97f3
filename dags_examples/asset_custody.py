"""Chain of custody across DAGs: a feature set produced in one DAG, verified in another.

* ``churn_features_producer`` builds the churn feature set as a secured step and announces
  it as the Airflow Asset ``churn_features``: the asset event carries the output's manifest
  digest and location, the receipt's digest and location, and the receipt itself
  (``extra["stepguard"]``).
* ``churn_features_consumer`` is scheduled on that asset. ``verify_features`` checks the data
  it is about to use against the event that triggered the run -- every file against the
  producer's manifest -- and ``summarize`` reads it only after that, verified again against
  the same event. Data changed between the two DAGs stops the run at ``verify_features`` with
  an ``IntegrityError`` naming the file; a run without a stepguard asset event (triggered by
  hand, or by an event posted through the REST API) is refused.

With the Airflow OpenLineage provider configured, both DAGs' task events carry stepguard's
facets (``stepguard_manifest``, ``stepguard_verdicts``), so a lineage backend links the
consumer's input to the producer's output by digest.

``STEPGUARD_EXAMPLE_STORE`` (an object-store prefix) works as for ``secure_training``: set it,
and the features are written there, so the consumer may run on another worker.
"""

from __future__ import annotations

import os
from typing import Any

import pendulum
from airflow.sdk import DAG, Asset

from stepguard.testing.examples import customer_rows, write_csv
from stepguard_airflow.operators import SecureStepOperator, VerifyDatasetOperator

STORE = os.environ.get("STEPGUARD_EXAMPLE_STORE", "").rstrip("/")
#: The asset's URI names the feature set; each event says where that run's bytes are.
FEATURES = Asset(name="churn_features",
                 uri=f"{STORE}/churn/features" if STORE else "file:///stepguard/churn/features")
LAKE = {"name": "lake", "kind": "aws_web_identity",
        "role": os.environ.get("STEPGUARD_WEB_IDENTITY_ROLE_ARN", ""), "delivery": "none"}
STORAGE: dict[str, Any] = ({"credentials": [LAKE], "storage": {"credential": LAKE["name"]}}
                           if STORE else {})


def build_features(step_env: Any) -> None:
    """Producer body: the feature set, written into the step's output directory."""
    write_csv(step_env.outputs["features"], customer_rows(200))


def summarize(step_env: Any) -> int:
    """Consumer body: runs only on verified input."""
    text = (step_env.inputs["features"] / "churn.csv").read_text()
    return len(text.splitlines()) - 1


with DAG("churn_features_producer", schedule=None, catchup=False,
         start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
         tags=["stepguard", "example", "assets"], doc_md=__doc__) as producer:
    SecureStepOperator(
        task_id="build_features",
        python_callable=build_features,
        spec={"outputs": [{"name": "features",
                           "path": f"{STORE}/{{run_id}}/features" if STORE else "features"}],
              **STORAGE},
        asset=FEATURES,
    )

with DAG("churn_features_consumer", schedule=[FEATURES], catchup=False,
         start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
         tags=["stepguard", "example", "assets"], doc_md=__doc__) as consumer:
    verify = VerifyDatasetOperator(task_id="verify_features", dataset=FEATURES,
                                   credential=LAKE if STORE else None)
    use = SecureStepOperator(
        task_id="summarize",
        python_callable=summarize,
        spec={"inputs": [{"name": "features"}], **STORAGE},
        receipts={"features": FEATURES},
    )
    verify >> use  # type: ignore[operator]
