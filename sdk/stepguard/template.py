"""Pipeline templates: a platform team defines a secured pipeline once, ML engineers instantiate it.

A :class:`PipelineTemplate` is an orchestrator-neutral description of the secured training
pipeline -- ingest, verify the dataset, train, sign and publish, verification gate -- with the
training step's isolation, credentials and deadline, the signer, the gate's policy and the
organisation's :class:`~stepguard.floor.Floor`. An :class:`Instance` holds one model's typed
parameters (name, dataset, version, its own credentials, tuning of the training step).
:meth:`PipelineTemplate.instantiate` checks the instance against the floor and returns a
:class:`PipelineInstance`, which the adapters render:

* Airflow: :func:`stepguard_airflow.template.build_dags` (one DAG per instance) or
  :func:`stepguard_airflow.template.build_mapped_dag` (one DAG, the stages mapped over the
  instances);
* Kubeflow Pipelines: :func:`stepguard_kfp.template.build_pipeline`.

An instance that weakens the floor fails here, at DAG-parse or compile time, with a
:class:`~stepguard.errors.PolicyViolation` naming the rule; the step runner refuses the same
breach at run time against the floor in the workers' settings. This module imports only the
base layer (no Airflow, no kfp), so instantiating templates while a DAG file is parsed is cheap.

>>> from stepguard.template import PipelineTemplate
>>> template = PipelineTemplate.from_dict({
...     "name": "training",
...     "train": {"isolation": {"mode": "sandbox", "network": "none"}, "deadline_s": 900},
...     "train_command": ["python3", "-m", "train"],
...     "signing": {"signer": "transit", "key": "stepguard-signing"},
...     "signature_policy": "release",
...     "floor": {"isolated_steps": ["train"], "no_egress_steps": ["train"],
...               "signature_policy": "release", "max_credential_ttl_s": 3600},
... })
>>> churn = template.instantiate(name="churn", dataset="/data/churn")
>>> churn.pipeline_id, churn.train_spec().isolation.mode
('training_churn', 'sandbox')
>>> template.instantiate(name="fraud", dataset="/data/fraud", isolation={"mode": "process"})
Traceback (most recent call last):
...
stepguard.errors.PolicyViolation: floor rule 'isolated' violated: step 'train' runs in isolation \
mode 'process' (the floor needs sandbox or pod): fraud.train.isolation.mode
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stepguard._private.schema import convert, from_mapping, load_yaml, to_plain
from stepguard.errors import ConfigurationError
from stepguard.floor import DEFAULT_TTL_MARGIN_S, Floor, FloorViolation, raise_violations
from stepguard.spec import CredentialRequest, IsolationSpec, SigningSpec, StepSpec

__all__ = ["STAGES", "Instance", "PipelineInstance", "PipelineTemplate"]

#: The stages of a templated pipeline, in order (their step and task names).
STAGES = ("ingest", "verify_dataset", "train", "sign_and_publish", "gate")

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class Instance:
    """One model's parameters: what an ML engineer sets when instantiating a template.

    ``name`` names the instance (DAG id suffix, mapped task label, default registry name);
    ``dataset`` is the source to ingest (a directory, ``file://`` or ``s3://`` URL) and
    ``manifest`` the manifest it is verified against where the orchestrator verifies the source
    itself (KFP); ``version`` the published version (default: Airflow ``{{ ts_nodash }}``, KFP
    ``1``). ``credentials`` are added to the training step's (per-instance Vault paths or
    roles); ``dataset_credential`` reads an ``s3://`` source. ``isolation`` (a partial mapping,
    e.g. ``{"gpus": 1}``), ``deadline_s``, ``env`` and ``signature_policy`` tune the template;
    a value that weakens the floor is refused. ``params`` are extra Airflow DAG params.

    >>> Instance.from_dict({"name": "churn", "dataset": "/d", "isolation": {"gpus": 1}}).isolation
    {'gpus': 1}
    """

    name: str
    dataset: str
    manifest: str | None = None
    model_name: str | None = None
    version: str | None = None
    train_command: tuple[str, ...] = ()
    credentials: tuple[CredentialRequest, ...] = ()
    dataset_credential: CredentialRequest | None = None
    isolation: Mapping[str, Any] = field(default_factory=dict)
    deadline_s: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    signature_policy: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _ID.match(self.name):
            raise ConfigurationError(
                "invalid instance name (letters, digits, '_', '.', '-'; at most 63)",
                subject=f"instance.{self.name}")
        if not self.dataset:
            raise ConfigurationError("an instance needs a dataset",
                                     subject=f"{self.name}.dataset")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Instance:
        """An instance from plain data (YAML), refusing unknown keys and wrong types."""
        return from_mapping(cls, data, "instance")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form: what crosses into a mapped task or a KFP parameter."""
        out: dict[str, Any] = to_plain(self)
        return out


@dataclass(frozen=True)
class PipelineTemplate:
    """The secured training pipeline as a platform team publishes it.

    ``train`` is the training step without inputs and outputs (the renderers add the dataset
    input, pinned to the verified digest, and the ``model`` output); its name is ``train``.
    ``signing`` signs the published model; ``signature_policy`` names the settings policy the
    gate verifies it under; ``registry`` overrides the settings' registry. ``floor`` is what no
    instance may weaken; the template itself must keep it.
    """

    name: str
    train_command: tuple[str, ...]
    signing: SigningSpec
    signature_policy: str
    train: StepSpec = field(default_factory=lambda: StepSpec(name="train"))
    registry: str | None = None
    floor: Floor = field(default_factory=Floor)
    description: str = ""

    def __post_init__(self) -> None:
        if not _ID.match(self.name):
            raise ConfigurationError("invalid template name", subject=f"template.{self.name}")
        if self.train.name != "train":
            raise ConfigurationError("the training step is called 'train'",
                                     subject=f"{self.name}.train.name")
        if self.train.inputs or self.train.outputs:
            raise ConfigurationError(
                "the training step's inputs and outputs are the template's (dataset, model)",
                subject=f"{self.name}.train")
        if not self.train_command:
            raise ConfigurationError("a template needs a training command",
                                     subject=f"{self.name}.train_command")
        if not self.signature_policy:
            raise ConfigurationError("the gate needs an explicit signature policy",
                                     subject=f"{self.name}.signature_policy")
        # The platform's own defaults keep the floor, or nothing instantiated from it could.
        raise_violations(_check(self.floor, self.train, self.signature_policy,
                                where=f"template {self.name}: "))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PipelineTemplate:
        """A template from plain data (YAML); ``train`` may leave out its name."""
        if not isinstance(data, Mapping):
            raise ConfigurationError("a template must be a mapping", subject="template")
        items = dict(data)
        if isinstance(items.get("train"), Mapping):
            items["train"] = {"name": "train", **items["train"]}
        return from_mapping(cls, items, "template")

    @classmethod
    def from_file(cls, path: str | Path) -> PipelineTemplate:
        """A template from a YAML or JSON file (its ``instances:`` key, if any, is ignored
        here: see :meth:`instances_from_file`)."""
        data = load_yaml(Path(path), "pipeline template")
        if isinstance(data, Mapping):
            data = {k: v for k, v in data.items() if k != "instances"}
        return cls.from_dict(data if data is not None else {})

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (round-trips through :meth:`from_dict`)."""
        out: dict[str, Any] = to_plain(self)
        return out

    # -- instantiation --------------------------------------------------------------------

    def instantiate(self, instance: Instance | Mapping[str, Any] | None = None,
                    **params: Any) -> PipelineInstance:
        """Check one instance against the floor and return it bound to this template.

        Give an :class:`Instance`, a mapping in its shape, or its fields as keywords. Raises
        :class:`~stepguard.errors.PolicyViolation` (naming the rule and the field) when the
        instance weakens the floor, :class:`~stepguard.errors.ConfigurationError` when it is
        malformed.
        """
        if instance is None:
            instance = Instance.from_dict(params)
        elif isinstance(instance, Mapping):
            instance = Instance.from_dict({**instance, **params})
        elif params:
            raise ConfigurationError("give an Instance or keywords, not both",
                                     subject=instance.name)
        bound = PipelineInstance(template=self, instance=instance)
        bound.check()
        return bound

    def instantiate_all(self, instances: Iterable[Instance | Mapping[str, Any]]
                        ) -> tuple[PipelineInstance, ...]:
        """:meth:`instantiate` each; instance names must be unique."""
        bound = tuple(self.instantiate(i) for i in instances)
        names = [b.instance.name for b in bound]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigurationError("duplicate instance name", subject=dup[0])
        return bound

    def instances_from_file(self, path: str | Path) -> tuple[PipelineInstance, ...]:
        """Instantiate every entry of a YAML file's ``instances:`` list."""
        data = load_yaml(Path(path), "template instances")
        items = data.get("instances") if isinstance(data, Mapping) else None
        if not isinstance(items, list):
            raise ConfigurationError("expected an 'instances:' list", subject=str(path))
        return self.instantiate_all(items)


@dataclass(frozen=True)
class PipelineInstance:
    """A template bound to one instance's parameters, checked against the floor.

    The renderers read it: :meth:`train_spec`, :attr:`model_name`, :meth:`version`,
    :attr:`signature_policy`, :meth:`dag_params`.
    """

    template: PipelineTemplate
    instance: Instance

    @property
    def pipeline_id(self) -> str:
        """``<template>_<instance>``: the Airflow DAG id / KFP pipeline name."""
        return f"{self.template.name}_{self.instance.name}"

    @property
    def model_name(self) -> str:
        """The registry name of this instance's model."""
        return self.instance.model_name or self.instance.name

    @property
    def signature_policy(self) -> str:
        """The policy the gate verifies under."""
        return self.instance.signature_policy or self.template.signature_policy

    @property
    def train_command(self) -> tuple[str, ...]:
        """The instance's training command, else the template's."""
        return self.instance.train_command or self.template.train_command

    def version(self, default: str) -> str:
        """The version to publish (``default`` is the orchestrator's: a template or ``1``)."""
        return self.instance.version or default

    def train_spec(self) -> StepSpec:
        """The training step of this instance (without the dataset input and model output)."""
        base, inst = self.template.train, self.instance
        isolation = base.isolation
        if inst.isolation:
            merged = {**base.isolation.to_dict(), **inst.isolation}
            isolation = convert(IsolationSpec, merged, f"{inst.name}.isolation")
        return replace(
            base,
            credentials=(*base.credentials, *inst.credentials),
            isolation=isolation,
            deadline_s=inst.deadline_s or base.deadline_s,
            env={**base.env, **inst.env},
        )

    def dag_params(self) -> dict[str, Any]:
        """The DAG's ``params``: the instance's identity plus its own ``params``."""
        return {"model": self.model_name, "instance": self.instance.name,
                "dataset": self.instance.dataset, "template": self.template.name,
                **dict(self.instance.params)}

    def check(self, *, ttl_margin_s: float = DEFAULT_TTL_MARGIN_S) -> None:
        """Raise :class:`~stepguard.errors.PolicyViolation` when this instance weakens the
        template's floor (the TTL rule with ``ttl_margin_s``, the settings' default)."""
        where = f"{self.instance.name}."
        found = _check(self.template.floor, self.train_spec(), self.signature_policy,
                       where=where, ttl_margin_s=ttl_margin_s)
        if self.instance.dataset_credential is not None:
            # The ingest step holds the dataset credential for its default deadline.
            ingest = StepSpec(name="ingest", credentials=(self.instance.dataset_credential,),
                              isolation=IsolationSpec(mode="process"))
            found += self.template.floor.violations(ingest, ttl_margin_s=ttl_margin_s,
                                                    where=where)
        raise_violations(found)


def _check(floor: Floor, train: StepSpec, policy: str, *, where: str,
           ttl_margin_s: float = DEFAULT_TTL_MARGIN_S) -> list[FloorViolation]:
    found = floor.violations(train, ttl_margin_s=ttl_margin_s, where=where)
    found += floor.gate_violations(policy, f"{where}gate.signature_policy")
    return found
