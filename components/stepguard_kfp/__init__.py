"""stepguard for Kubeflow Pipelines 2: secured components, and ``harden`` for any task.

Components (each a thin call into the stepguard SDK, run from the digest-pinned image):

* :func:`verify_dataset` -- verify a dataset against its manifest; receipt out.
* :func:`secure_train` -- run the training command through the step runner (``stepguard exec``)
  with just-in-time credentials, the dataset pinned to the verified digest, the model hashed.
  :func:`secure_train_container` is the same step as a container component for clusters.
* :func:`sign_and_publish` -- verify the model against the training receipt, sign, publish.
* :func:`verify_model` -- the deployment gate: signature checked against an explicit policy.

:func:`harden` applies an :class:`~stepguard.spec.IsolationSpec` to a task and returns a
:class:`HardeningReport` of what KFP cannot express. :func:`use_settings` mounts the platform's
settings ConfigMap (Vault address and CA, login, policies, registry, OTLP and object-store
endpoints) on a task; every component also takes ``settings_path``. Compiled YAMLs of the
components ship in ``stepguard_kfp/yaml`` (:func:`component_yaml`).

kfp is imported only when a component or ``harden`` is first used, so the runtime modules the
components execute stay light.

>>> import stepguard_kfp
>>> stepguard_kfp.component_yaml("verify_dataset").name
'verify_dataset.yaml'
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

__all__ = [
    "COMPONENT_NAMES",
    "DEFAULT_IMAGE",
    "HardeningGap",
    "HardeningReport",
    "SETTINGS_CONFIG_MAP",
    "component_yaml",
    "harden",
    "secure_train",
    "secure_train_container",
    "sign_and_publish",
    "use_settings",
    "verify_dataset",
    "verify_model",
]

#: The components whose compiled YAML ships with the package.
COMPONENT_NAMES = (
    "verify_dataset",
    "secure_train",
    "secure_train_container",
    "sign_and_publish",
    "verify_model",
)

_LAZY = {
    "DEFAULT_IMAGE": "stepguard_kfp._image",
    "HardeningGap": "stepguard_kfp._harden",
    "HardeningReport": "stepguard_kfp._harden",
    "harden": "stepguard_kfp._harden",
    "SETTINGS_CONFIG_MAP": "stepguard_kfp._settings",
    "use_settings": "stepguard_kfp._settings",
    **{name: "stepguard_kfp._components" for name in COMPONENT_NAMES},
}

if TYPE_CHECKING:
    from stepguard_kfp._components import (
        secure_train,
        secure_train_container,
        sign_and_publish,
        verify_dataset,
        verify_model,
    )
    from stepguard_kfp._harden import HardeningGap, HardeningReport, harden
    from stepguard_kfp._image import DEFAULT_IMAGE
    from stepguard_kfp._settings import SETTINGS_CONFIG_MAP, use_settings


def component_yaml(name: str) -> Path:
    """Path of the compiled, checked-in YAML of component ``name`` (for
    ``kfp.components.load_component_from_file``)."""
    if name not in COMPONENT_NAMES:
        from stepguard.errors import ConfigurationError

        raise ConfigurationError("unknown component", subject=name,
                                 hint=f"known: {', '.join(COMPONENT_NAMES)}")
    return Path(__file__).parent / "yaml" / f"{name}.yaml"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stepguard_kfp' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
