"""The secured training pipeline as a template, instantiated for two models.

The platform team defines ``TRAINING`` once, in ``templates/training.yaml``: the training step
isolated in the bubblewrap sandbox with no network, a 15-minute deadline, models signed with the
Vault Transit key and verified by the gate under the ``release`` policy, and the organisation's
floor, which no instance may weaken. ML engineers add a model by adding an instance: a name,
a dataset, its own experiment-tracker credential. Every instance gets ``ingest ->
verify_dataset -> train -> sign_and_publish -> gate`` with its own credentials, receipts,
outputs and registry entry.

Two renderings of the same instances:

* ``training_churn_us`` and ``training_churn_eu``: one DAG per model (their ``params`` say which
  model, dataset and template they are);
* ``training_mapped``: one DAG whose stages are mapped over both models (each mapped task
  instance is labelled with its model).

Datasets are read from ``$STEPGUARD_DATA_LAKE/<model>`` (default: ``lake/<model>`` in the
working directory). Settings come from ``$STEPGUARD_CONFIG`` and the ``STEPGUARD_*`` /
``VAULT_*`` variables, as for ``secure_training``; the workers' settings carry the same
``floor:`` so the step runner enforces it at run time too.

The same template compiles to a Kubeflow pipeline: ``stepguard_kfp.template.build_pipeline``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from stepguard.template import PipelineTemplate
from stepguard.testing.examples import TRAIN_SCRIPT
from stepguard_airflow.template import build_dags, build_mapped_dag

#: The training body: the churn example's logistic regression, plus proof that the instance's
#: own tracking credential reached it (a digest, never the value).
TRAIN_CODE = TRAIN_SCRIPT + r"""
import hashlib
token = os.environ.get("TRACKING_TOKEN", "")
metrics = json.loads((out / "metrics.json").read_text())
metrics["tracking_token_sha256"] = hashlib.sha256(token.encode()).hexdigest() if token else None
(out / "metrics.json").write_text(json.dumps(metrics))
"""

#: What the platform team publishes: templates/training.yaml next to this file, or the
#: deployed copy named by ``$STEPGUARD_TRAINING_TEMPLATE``.
TRAINING = PipelineTemplate.from_file(
    os.environ.get("STEPGUARD_TRAINING_TEMPLATE")
    or Path(__file__).with_name("templates") / "training.yaml")

_LAKE = os.environ.get("STEPGUARD_DATA_LAKE", "lake")

#: What ML engineers add: one entry per model.
MODELS = TRAINING.instantiate_all([
    {"name": f"churn_{region}", "model_name": f"churn-{region}",
     "dataset": f"{_LAKE}/churn-{region}",
     "train_command": [sys.executable, "-c", TRAIN_CODE],
     "credentials": [{"name": "tracking", "kind": "kv",
                      "path": f"stepguard/tracking/churn-{region}"}],
     "params": {"region": region}}
    for region in ("us", "eu")
])

globals().update(build_dags(MODELS))
training_mapped = build_mapped_dag(MODELS, "training_mapped")
