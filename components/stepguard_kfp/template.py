"""Kubeflow Pipelines rendering of a :class:`stepguard.template.PipelineTemplate`.

:func:`build_pipeline` turns one checked :class:`~stepguard.template.PipelineInstance` into a
KFP pipeline with the controls the Airflow rendering has: verify the dataset against its
manifest -> train through the step runner (the instance's credentials minted in the pod, the
dataset pinned to the verified digest, no network) -> verify the model against the training
receipt, sign and publish -> the gate verifies it under the template's policy. Every task is
hardened with :func:`stepguard_kfp.harden` (restricted pod, deadline, no caching).

On KFP the training step's boundary is its own pod: a template's ``sandbox`` or ``pod`` mode
both render as ``mode: pod`` (under ``kfp.local``, which starts no pod, the body runs in the
bubblewrap sandbox with the same spec). The instance needs a ``manifest`` for its dataset.
The step runner in each pod checks the floor in the pod's stepguard settings again.

Every task runs the one runtime image, taken from the ``pods.image`` setting (the all-zero
placeholder digest is refused):

>>> import os
>>> os.environ["STEPGUARD_PODS_IMAGE"] = "registry.example/sg@sha256:" + "5" * 64
>>> from stepguard.template import PipelineTemplate
>>> from stepguard_kfp.template import build_pipeline
>>> t = PipelineTemplate.from_dict({"name": "training", "train_command": ["python3", "-m", "t"],
...     "signing": {"signer": "transit", "key": "k"}, "signature_policy": "release"})
>>> p = build_pipeline(t.instantiate(name="churn", dataset="/d", manifest="/d.json"))
>>> p.name
'training-churn'
>>> del os.environ["STEPGUARD_PODS_IMAGE"]
"""

# No "from __future__ import annotations": KFP reads the pipeline function's real annotations.

import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stepguard.spec import IsolationSpec
    from stepguard.template import PipelineInstance

__all__ = ["DEFAULT_VERSION", "build_pipeline", "pipeline_name"]

#: Version of a published model when the instance gives none.
DEFAULT_VERSION = "1"


def pipeline_name(pi: "PipelineInstance") -> str:
    """The KFP pipeline name of an instance: ``<template>-<instance>``, DNS-label style.

    >>> from stepguard.template import PipelineTemplate
    >>> t = PipelineTemplate.from_dict({"name": "training", "train_command": ["x"],
    ...     "signing": {"signer": "key", "key": "k.pem"}, "signature_policy": "p"})
    >>> pipeline_name(t.instantiate(name="churn_eu", dataset="/d"))
    'training-churn-eu'
    """
    return f"{pi.template.name}-{pi.instance.name}".lower().replace("_", "-").replace(".", "-")


def build_pipeline(pi: "PipelineInstance", *, short_isolation: "IsolationSpec | None" = None,
                   short_deadline_s: float = 600,
                   settings_config_map: "str | None" = "stepguard-settings",
                   vault_auth: str = "jwt") -> Any:
    """A KFP pipeline (no parameters; returns the gate's receipt) for one template instance.

    ``short_isolation`` is the pod of the verification and publishing tasks (default: a
    restricted pod with network ``none``; on a cluster give the Vault and registry hosts it may
    reach). Compile it with ``kfp.compiler.Compiler().compile(p, "p.yaml")`` or run it with
    ``kfp.local``. Every task mounts the platform's settings ConfigMap
    ``settings_config_map`` (:func:`stepguard_kfp.use_settings`; ``None``: none) and is labelled
    for the Vault login ``vault_auth`` (``jwt`` or ``wrapped``).
    """
    from kfp import dsl

    from stepguard.errors import ConfigurationError
    from stepguard.spec import IsolationSpec
    from stepguard_kfp import (
        harden,
        secure_train,
        sign_and_publish,
        use_settings,
        verify_dataset,
        verify_model,
    )

    def settings(task: Any, auth: Any = vault_auth) -> None:
        if settings_config_map:
            use_settings(task, settings_config_map, vault_auth=auth)

    inst, template = pi.instance, pi.template
    if not inst.manifest:
        raise ConfigurationError("a KFP rendering verifies the dataset against its manifest",
                                 subject=f"{inst.name}.manifest")
    name = pipeline_name(pi)
    train = pi.train_spec()
    train = replace(train, isolation=replace(train.isolation, mode="pod"))
    step_spec = json.dumps(train.to_dict())
    command = list(pi.train_command)
    short = short_isolation or IsolationSpec(mode="pod", cpu="1", memory="1Gi")
    signing = template.signing
    version = pi.version(DEFAULT_VERSION)
    dataset, manifest = inst.dataset, inst.manifest

    @dsl.pipeline(name=name, description=template.description.split("\n")[0] or None)  # type: ignore[untyped-decorator]
    def pipeline() -> str:
        run = {"pipeline": dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
               "run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}
        verified = verify_dataset(dataset_path=dataset, manifest_path=manifest, **run)
        verified.set_display_name(f"verify dataset ({inst.name})")
        harden(verified, short, deadline_s=short_deadline_s, pipeline=name)
        settings(verified, None)

        trained = secure_train(step_spec=step_spec, command=command, dataset_path=dataset,
                               dataset_manifest=verified.outputs["dataset_manifest"],
                               dataset_receipt=verified.outputs["Output"], **run)
        trained.set_display_name(f"secure train ({inst.name})")
        harden(trained, train, pipeline=name)
        settings(trained)

        published = sign_and_publish(
            model=trained.outputs["model"], model_manifest=trained.outputs["model_manifest"],
            train_receipt=trained.outputs["Output"], model_name=pi.model_name,
            model_version=version, registry=template.registry or "",
            signer=signing.signer, signing_key=signing.key or "", **run)
        published.set_display_name(f"sign and publish ({inst.name})")
        harden(published, short, deadline_s=short_deadline_s, pipeline=name)
        settings(published)

        gate = verify_model(publish_receipt=published.outputs["Output"],
                            model_name=pi.model_name, model_version=version,
                            signature_policy=pi.signature_policy,
                            registry=template.registry or "", **run)
        gate.set_display_name(f"verify gate ({inst.name})")
        harden(gate, short, deadline_s=short_deadline_s, pipeline=name)
        settings(gate)
        return gate.outputs["Output"]  # type: ignore[no-any-return]

    return pipeline
