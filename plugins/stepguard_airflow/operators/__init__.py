"""Secure operators: every one runs a stepguard step and pushes its receipt to XCom.

Importing this module is cheap (DAG parsing): it loads no boto3, hvac, kubernetes,
model_signing or kfp. :class:`SecureKubernetesPodOperator` lives in
:mod:`stepguard_airflow.operators.kubernetes` (it subclasses the cncf-kubernetes operator, which
imports the Kubernetes client) and is reachable from here lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stepguard_airflow.operators._data import (
    IngestDatasetOperator,
    SignAndPublishModelOperator,
    VerifyDatasetOperator,
    VerifyModelOperator,
)
from stepguard_airflow.operators._step import SecureStepOperator

if TYPE_CHECKING:
    from stepguard_airflow.operators.kubernetes import SecureKubernetesPodOperator

__all__ = [
    "IngestDatasetOperator",
    "SecureKubernetesPodOperator",
    "SecureStepOperator",
    "SignAndPublishModelOperator",
    "VerifyDatasetOperator",
    "VerifyModelOperator",
]


def __getattr__(name: str) -> Any:
    if name == "SecureKubernetesPodOperator":
        from stepguard_airflow.operators.kubernetes import SecureKubernetesPodOperator

        return SecureKubernetesPodOperator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
