"""Airflow renderings of a :class:`stepguard.template.PipelineTemplate`.

Two shapes, the same five secured tasks (``ingest`` -> ``verify_dataset`` -> ``train`` ->
``sign_and_publish`` -> ``gate``), the same controls:

* :func:`build_dags` -- one DAG per instance (a factory). Each DAG's id is
  ``<template>_<instance>`` and its ``params`` carry the instance (``{{ params.model }}``
  works in any templated field), so the DAGs deploy as they are::

      from stepguard.template import PipelineTemplate
      from stepguard_airflow.template import build_dags

      TEMPLATE = PipelineTemplate.from_file("/opt/platform/training.yaml")
      globals().update(build_dags(TEMPLATE.instantiate_all([
          {"name": "churn", "dataset": "s3://lake/churn/"},
          {"name": "fraud", "dataset": "s3://lake/fraud/"},
      ])))

* :func:`build_mapped_dag` -- one DAG, every stage mapped (``.expand``) over the instances.
  Each mapped task instance is labelled with its instance name, takes its own parameters,
  mints its own credentials and writes its own receipt, outputs and run directory
  (``train.0``, ``train.1``, ...). Downstream stages are expanded over the upstream receipts one
  to one, so no ``.map(...)`` at receipt hops and no ``ti.map_index`` in Jinja; a fetch function
  receives its :class:`~stepguard.template.Instance` as an argument. In this shape a failed
  instance stops the stage after it for every instance (Airflow's rule for mapped tasks).

The floor was checked when the instances were created
(:meth:`~stepguard.template.PipelineTemplate.instantiate`); the step runner checks the settings'
floor again when each task runs. Importing this module imports the operators (cheap: no boto3,
hvac, kubernetes or kfp).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepguard_airflow.operators import (
    IngestDatasetOperator,
    SecureStepOperator,
    SignAndPublishModelOperator,
    VerifyDatasetOperator,
    VerifyModelOperator,
)

if TYPE_CHECKING:
    from airflow.sdk import DAG, Context

    from stepguard.template import Instance, PipelineInstance

__all__ = ["DEFAULT_VERSION", "Fetch", "build_dag", "build_dags", "build_mapped_dag"]

#: Version of a published model when the instance gives none: the run's logical timestamp.
DEFAULT_VERSION = "{{ ts_nodash }}"

#: ``fetch(step_env, dest, instance)``: writes one instance's dataset into ``dest``.
Fetch = Callable[[Any, Path, "Instance"], object]

_LABEL = "{{ stepguard_instance }}"


def _dag_kwargs(tags: Iterable[str], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    import pendulum

    out: dict[str, Any] = {"schedule": None, "catchup": False,
                           "start_date": pendulum.datetime(2024, 1, 1, tz="UTC")}
    out.update(kwargs)
    out["tags"] = sorted({*tags, *out.get("tags", ())})
    return out


def _train_spec(pi: PipelineInstance) -> dict[str, Any]:
    data = pi.train_spec().to_dict()
    data["inputs"] = [{"name": "dataset"}]
    data["outputs"] = [{"name": "model", "path": "model"}]
    return data


class _BoundFetch:
    """``fetch(step_env, dest)`` as the ingest operator calls it, with the instance bound."""

    def __init__(self, fetch: Fetch, instance: Instance) -> None:
        self.fetch, self.instance = fetch, instance

    def __call__(self, step_env: Any, dest: Path) -> object:
        return self.fetch(step_env, dest, self.instance)


def build_dag(pi: PipelineInstance, *, fetch: Fetch | None = None, dag_id: str | None = None,
              **dag_kwargs: Any) -> DAG:
    """One DAG for one template instance (``dag_kwargs`` go to ``DAG``; ``params`` are merged
    over the instance's).

    ``fetch`` replaces reading ``instance.dataset`` as a path or URL: it is called as
    ``fetch(step_env, dest, instance)`` with the ingest step's credentials in ``step_env``.
    """
    from airflow.sdk import DAG

    inst, template = pi.instance, pi.template
    kwargs = _dag_kwargs(("stepguard", template.name), dag_kwargs)
    kwargs["params"] = {**pi.dag_params(), **dict(kwargs.get("params") or {})}
    kwargs.setdefault("doc_md", template.description or None)
    with DAG(dag_id or pi.pipeline_id, **kwargs) as dag:
        ingest = IngestDatasetOperator(
            task_id="ingest", dataset=pi.model_name, version=pi.version(DEFAULT_VERSION),
            source=None if fetch else inst.dataset,
            fetch=_BoundFetch(fetch, inst) if fetch else None,
            credential=inst.dataset_credential)
        verify = VerifyDatasetOperator(task_id="verify_dataset", dataset=ingest.output)
        train = SecureStepOperator(task_id="train", spec=_train_spec(pi),
                                   receipts={"dataset": ingest.output},
                                   command=list(pi.train_command))
        verify >> train
        publish = SignAndPublishModelOperator(
            task_id="sign_and_publish", model=train.output, name=pi.model_name,
            version=pi.version(DEFAULT_VERSION), signing=template.signing,
            registry=template.registry)
        VerifyModelOperator(task_id="gate", model=publish.output, policy=pi.signature_policy)
    return dag


def build_dags(instances: Iterable[PipelineInstance], *, fetch: Fetch | None = None,
               **dag_kwargs: Any) -> dict[str, DAG]:
    """:func:`build_dag` for each instance: DAG id -> DAG (``globals().update(...)`` it)."""
    dags: dict[str, DAG] = {}
    for pi in instances:
        dag = build_dag(pi, fetch=fetch, **dag_kwargs)
        dags[dag.dag_id] = dag
    return dags


# -- one DAG mapped over the instances ------------------------------------------------------


class _ByIndex:
    """Mixin of the mapped stages: the instance of this mapped task instance.

    Every stage after ``ingest`` is expanded over the upstream receipts, which are in instance
    order, so map index ``i`` is instance ``i`` in every stage.
    """

    instances: Sequence[Mapping[str, Any]]

    def _index(self, context: Context) -> int:
        index = context["ti"].map_index
        if index is None or index < 0:
            from stepguard.errors import ConfigurationError

            raise ConfigurationError("a template stage of a mapped DAG runs mapped only",
                                     subject=context["ti"].task_id)
        return index

    def _instance(self, context: Context) -> Instance:
        from stepguard.template import Instance

        inst = Instance.from_dict(self.instances[self._index(context)])
        context["stepguard_instance"] = inst.name  # type: ignore[typeddict-unknown-key]
        return inst


class _MappedIngest(IngestDatasetOperator):
    """``ingest`` of one instance: built from the instance it is expanded over."""

    def __init__(self, *, instance: Mapping[str, Any], fetch: Fetch | None = None,
                 **kwargs: Any) -> None:
        from stepguard.template import Instance

        inst = Instance.from_dict(instance)
        self.instance_name = inst.name
        super().__init__(dataset=inst.model_name or inst.name,
                         version=inst.version or DEFAULT_VERSION,
                         source=None if fetch else inst.dataset,
                         fetch=_BoundFetch(fetch, inst) if fetch else None,
                         credential=inst.dataset_credential, **kwargs)

    def execute(self, context: Context) -> Any:
        context["stepguard_instance"] = self.instance_name  # type: ignore[typeddict-unknown-key]
        return super().execute(context)


class _MappedVerify(_ByIndex, VerifyDatasetOperator):
    def __init__(self, *, instances: Sequence[Mapping[str, Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.instances = list(instances)

    def execute(self, context: Context) -> Any:
        self._instance(context)
        return super().execute(context)


class _MappedTrain(_ByIndex, SecureStepOperator):
    def __init__(self, *, instances: Sequence[Mapping[str, Any]], specs: Sequence[Any],
                 commands: Sequence[Sequence[str]], dataset: Any, **kwargs: Any) -> None:
        super().__init__(spec=specs[0], command=list(commands[0]),
                         receipts={"dataset": dataset}, **kwargs)
        self.instances, self.specs, self.commands = list(instances), list(specs), list(commands)

    def execute(self, context: Context) -> Any:
        self._instance(context)
        index = self._index(context)
        self.spec = self.render_template(self.specs[index], context)
        self.command = [str(self.render_template(c, context)) for c in self.commands[index]]
        return super().execute(context)


class _MappedPublish(_ByIndex, SignAndPublishModelOperator):
    def __init__(self, *, instances: Sequence[Mapping[str, Any]], **kwargs: Any) -> None:
        super().__init__(name="(per instance)", version=DEFAULT_VERSION, **kwargs)
        self.instances = list(instances)

    def execute(self, context: Context) -> Any:
        inst = self._instance(context)
        self.name = str(self.render_template(inst.model_name or inst.name, context))
        self.version = str(self.render_template(inst.version or DEFAULT_VERSION, context))
        return super().execute(context)


class _MappedGate(_ByIndex, VerifyModelOperator):
    def __init__(self, *, instances: Sequence[Mapping[str, Any]], policies: Sequence[str],
                 **kwargs: Any) -> None:
        super().__init__(policy=policies[0], **kwargs)
        self.instances, self.policies = list(instances), list(policies)

    def execute(self, context: Context) -> Any:
        self._instance(context)
        self.policy = self.policies[self._index(context)]
        return super().execute(context)


def build_mapped_dag(instances: Sequence[PipelineInstance], dag_id: str | None = None, *,
                     fetch: Fetch | None = None, **dag_kwargs: Any) -> DAG:
    """One DAG whose stages are mapped over ``instances`` (all of one template).

    ``dag_id`` defaults to the template's name; ``params`` lists the instances.
    """
    from airflow.sdk import DAG

    from stepguard.errors import ConfigurationError

    items = list(instances)
    if not items:
        raise ConfigurationError("no instances to map over", subject=dag_id or "template")
    template = items[0].template
    if any(pi.template is not template and pi.template != template for pi in items):
        raise ConfigurationError("a mapped DAG renders instances of one template",
                                 subject=dag_id or template.name)
    plain = [pi.instance.to_dict() for pi in items]
    kwargs = _dag_kwargs(("stepguard", template.name), dag_kwargs)
    kwargs["params"] = {"template": template.name,
                        "instances": [pi.instance.name for pi in items],
                        **dict(kwargs.get("params") or {})}
    kwargs.setdefault("doc_md", template.description or None)
    label = {"map_index_template": _LABEL}
    with DAG(dag_id or template.name, **kwargs) as dag:
        ingest = _MappedIngest.partial(task_id="ingest", fetch=fetch, **label).expand(
            instance=plain)
        verify = _MappedVerify.partial(task_id="verify_dataset", instances=plain,
                                       **label).expand(dataset=ingest.output)
        train = _MappedTrain.partial(
            task_id="train", instances=plain, specs=[_train_spec(pi) for pi in items],
            commands=[list(pi.train_command) for pi in items], **label,
        ).expand(dataset=ingest.output)
        verify >> train
        publish = _MappedPublish.partial(
            task_id="sign_and_publish", instances=plain, signing=template.signing,
            registry=template.registry, **label).expand(model=train.output)
        _MappedGate.partial(task_id="gate", instances=plain,
                            policies=[pi.signature_policy for pi in items],
                            **label).expand(model=publish.output)
    return dag
