"""stepguard: every ML pipeline stage as a secured step.

The top-level package is deliberately light: importing it loads no heavy dependency (boto3,
hvac, kubernetes, model_signing, kfp, airflow). Public names are resolved lazily.

>>> import stepguard
>>> stepguard.__version__
'0.1.0'
>>> issubclass(stepguard.IntegrityError, stepguard.StepguardError)
True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from stepguard._private.version import VERSION as __version__
from stepguard.errors import (
    ConfigurationError,
    CredentialDenied,
    CredentialError,
    IntegrityError,
    IsolationError,
    ManifestError,
    OperationalError,
    PolicyViolation,
    SignatureError,
    StepguardError,
    StepTimeout,
    VerificationError,
)

_LAZY = {
    "Step": "stepguard.step",
    "StepSpec": "stepguard.step",
    "run_step": "stepguard.step",
    "Receipt": "stepguard.receipt",
    "Settings": "stepguard.settings",
    "Floor": "stepguard.floor",
    "PipelineTemplate": "stepguard.template",
}

if TYPE_CHECKING:
    from stepguard.floor import Floor
    from stepguard.receipt import Receipt
    from stepguard.settings import Settings
    from stepguard.step import Step, StepSpec, run_step
    from stepguard.template import PipelineTemplate

__all__ = [
    "ConfigurationError",
    "CredentialDenied",
    "CredentialError",
    "Floor",
    "IntegrityError",
    "IsolationError",
    "ManifestError",
    "OperationalError",
    "PipelineTemplate",
    "PolicyViolation",
    "Receipt",
    "Settings",
    "SignatureError",
    "Step",
    "StepSpec",
    "StepTimeout",
    "StepguardError",
    "VerificationError",
    "__version__",
    "run_step",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stepguard' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
