"""Isolation: run a step body in a bubblewrap sandbox, a plain process, or a restricted pod.

The lifecycle calls :func:`run_isolated` for a command and :func:`call_in_process` for a Python
callable; the pod builder (:func:`build_pod`, :func:`build_network_policy`, :func:`merge_volumes`
for a caller's own volumes), the GPU check every runner makes (:func:`require_gpus`,
:func:`probe_gpus`) and the validator (:func:`check_pod`, :func:`assert_pod_ok`) also serve
``stepguard pod render`` / ``stepguard pod check`` and the Airflow/KFP adapters.

Nothing heavy is imported here: ``kubernetes`` and ``kubernetes_validate`` load only when a pod
is run or a manifest is checked against the schema.
"""

from __future__ import annotations

from stepguard.isolation._check import (
    Violation,
    assert_pod_ok,
    check_pod,
    check_schema,
    violations_summary,
)
from stepguard.isolation._gpu import GpuProbe, probe_gpus, require_gpus
from stepguard.isolation._inprocess import call_in_process
from stepguard.isolation._kube import KubeApi, default_pod_name
from stepguard.isolation._pod import CONFIG_DIR, build_config_map, build_network_policy, build_pod
from stepguard.isolation._podres import merge_volumes
from stepguard.isolation._result import RunResult
from stepguard.isolation._run import run_isolated
from stepguard.isolation._sandbox import find_bwrap

__all__ = [
    "CONFIG_DIR",
    "GpuProbe",
    "KubeApi",
    "RunResult",
    "Violation",
    "assert_pod_ok",
    "build_config_map",
    "build_network_policy",
    "build_pod",
    "call_in_process",
    "check_pod",
    "check_schema",
    "default_pod_name",
    "find_bwrap",
    "merge_volumes",
    "probe_gpus",
    "require_gpus",
    "run_isolated",
    "violations_summary",
]
