"""Pods that train: sizes that fit, ``/dev/shm``, writable caches, the caller's volumes merged.

:func:`~stepguard.isolation.build_pod` builds the restricted pod; :func:`finish_pod` then fits it
to the work. Defaults apply only to what the spec leaves unset (``N`` = ``gpus``):

=====================  ==========================  =====================================
setting                CPU pod (``gpus: 0``)        GPU pod
=====================  ==========================  =====================================
cpu                    1                           4 x N
memory                 2Gi                         32Gi x N
scratch (``/tmp``)     ``scratch_size`` (1Gi)      50Gi x N while ``scratch_size`` is 1Gi
ephemeral-storage      = scratch                   = scratch
``/dev/shm``           runtime default (64 MiB)    memory-backed, 4Gi x N (at most half
                                                   the memory limit)
deadline               3600 s                      43200 s (``StepSpec.deadline_s`` unset)
=====================  ==========================  =====================================

``shm_size`` set in the spec always mounts a memory-backed ``/dev/shm`` of that size; it counts
against the memory limit, so it may not exceed it. Every pod keeps a read-only root: ``HOME`` is
a small emptyDir, and the caches frameworks write (``XDG_CACHE_HOME``, ``TORCH_HOME``,
``HF_HOME``, ``TRITON_CACHE_DIR``, ``CUDA_CACHE_PATH``, ``MPLCONFIGDIR``) point into the sized
scratch emptyDir unless the step's env sets them. GPU limits, the ``nvidia.com/gpu`` toleration
and node selector come from :func:`~stepguard.isolation.build_pod` itself.

The caller's ``volumes``/``volume_mounts`` (plain Kubernetes dicts) are added to ours: a volume
named like one of ours, or a mount on a path we own (scratch, home, ``/dev/shm``, the Vault token
directory) is a :class:`~stepguard.errors.ConfigurationError` naming it -- never a silent
replacement of the scratch space.

>>> from stepguard.isolation import build_pod
>>> from stepguard.spec import IsolationSpec, RunContext
>>> pod = build_pod(IsolationSpec(mode="pod", image="r/i@sha256:" + "a" * 64, gpus=2),
...                 name="t", command=["python", "train.py"], env={}, context=RunContext())
>>> c = pod["spec"]["containers"][0]
>>> c["resources"]["limits"]["cpu"], c["resources"]["limits"]["memory"]
('8', '64Gi')
>>> [v["emptyDir"] for v in pod["spec"]["volumes"] if v["name"] == "shm"]
[{'medium': 'Memory', 'sizeLimit': '8Gi'}]
>>> pod["spec"]["activeDeadlineSeconds"]
43200
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from stepguard.errors import ConfigurationError
from stepguard.isolation._limits import parse_bytes
from stepguard.spec import DEFAULT_DEADLINE_S, GPU_DEADLINE_S, IsolationSpec

__all__ = [
    "CACHE_SUBDIRS",
    "GPU_CPU_PER_GPU",
    "GPU_MEMORY_PER_GPU_GI",
    "GPU_SCRATCH_PER_GPU_GI",
    "GPU_SHM_PER_GPU_GI",
    "SHM_DIR",
    "default_deadline_s",
    "finish_pod",
    "merge_volumes",
]

SHM_DIR = "/dev/shm"  # noqa: S108 -- a memory-backed emptyDir private to the pod
SHM_VOLUME = "shm"
GPU_CPU_PER_GPU = 4
GPU_MEMORY_PER_GPU_GI = 32
GPU_SCRATCH_PER_GPU_GI = 50
GPU_SHM_PER_GPU_GI = 4
#: Cache variables and where they point, relative to the scratch directory.
CACHE_SUBDIRS: Mapping[str, str] = {
    "XDG_CACHE_HOME": ".cache",
    "TORCH_HOME": ".cache/torch",
    "HF_HOME": ".cache/huggingface",
    "TRITON_CACHE_DIR": ".cache/triton",
    "CUDA_CACHE_PATH": ".cache/nv",
    "MPLCONFIGDIR": ".cache/matplotlib",
}
_DEFAULT_SCRATCH = "1Gi"
_GI = 1024**3


def default_deadline_s(spec: IsolationSpec) -> float:
    """The pod deadline when the caller gives none: longer for GPU pods.

    >>> default_deadline_s(IsolationSpec(gpus=1)) > default_deadline_s(IsolationSpec())
    True
    """
    return GPU_DEADLINE_S if spec.gpus else DEFAULT_DEADLINE_S


def _gi(n: float) -> str:
    return f"{n:g}Gi"


def _shm_size(spec: IsolationSpec, memory: str) -> str | None:
    mem = parse_bytes(memory, subject="isolation.memory")
    if spec.shm_size:
        if parse_bytes(spec.shm_size, subject="isolation.shm_size") > mem:
            raise ConfigurationError(
                "shm_size exceeds the memory limit (a memory-backed /dev/shm counts against it)",
                subject="isolation.shm_size", hint=f"memory limit is {memory}")
        return spec.shm_size
    if not spec.gpus:
        return None
    wanted = GPU_SHM_PER_GPU_GI * spec.gpus * _GI
    return _gi(min(wanted, mem // 2) / _GI)


def merge_volumes(pod: dict[str, Any], volumes: Sequence[Mapping[str, Any]] = (),
                  volume_mounts: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Add the caller's ``volumes`` and (first container's) ``volume_mounts`` to ``pod``.

    Ours stay: a clashing volume name or mount path is refused, naming it.

    >>> pod = {"spec": {"volumes": [{"name": "scratch", "emptyDir": {}}],
    ...        "containers": [{"volumeMounts": [{"name": "scratch", "mountPath": "/tmp"}]}]}}
    >>> _ = merge_volumes(pod, [{"name": "data", "persistentVolumeClaim": {"claimName": "d"}}],
    ...                   [{"name": "data", "mountPath": "/data", "readOnly": True}])
    >>> [m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]]
    ['/tmp', '/data']
    >>> merge_volumes(pod, [{"name": "tmp", "emptyDir": {}}],
    ...               [{"name": "tmp", "mountPath": "/tmp"}])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    stepguard.errors.ConfigurationError: mount path is stepguard's own (...): /tmp
    """
    spec = pod["spec"]
    ours = spec.setdefault("volumes", [])
    mounts = spec["containers"][0].setdefault("volumeMounts", [])
    own_names = {str(v["name"]) for v in ours}
    own_paths = {str(m["mountPath"]).rstrip("/") for m in mounts}
    new_names: set[str] = set()
    for vol in volumes:
        name = str(vol.get("name") or "")
        if not name:
            raise ConfigurationError("a volume needs a name", subject="volumes")
        if name in own_names:
            raise ConfigurationError("volume name is stepguard's own", subject=name,
                                     hint=f"stepguard's volumes: {', '.join(sorted(own_names))}")
        if name in new_names:
            raise ConfigurationError("volume given twice", subject=name)
        new_names.add(name)
    seen_paths: set[str] = set()
    for mount in volume_mounts:
        path = str(mount.get("mountPath") or "").rstrip("/") or "/"
        if path in own_paths:
            raise ConfigurationError(
                "mount path is stepguard's own (scratch, home, /dev/shm, Vault token)",
                subject=path, hint="mount the volume elsewhere, e.g. under /data")
        if path in seen_paths:
            raise ConfigurationError("mount path given twice", subject=path)
        seen_paths.add(path)
        if str(mount.get("name")) not in new_names | own_names:
            raise ConfigurationError("volume mount names no volume", subject=str(mount.get("name")))
    ours.extend(dict(v) for v in volumes)
    mounts.extend(dict(m) for m in volume_mounts)
    return pod


def finish_pod(pod: dict[str, Any], spec: IsolationSpec, *, env: Mapping[str, str],
               deadline_s: float | None, volumes: Sequence[Mapping[str, Any]] = (),
               volume_mounts: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Fit the pod :func:`~stepguard.isolation.build_pod` made to the work (see module docs)."""
    pod_spec = pod["spec"]
    container = pod_spec["containers"][0]
    resources = container["resources"]
    limits: dict[str, str] = resources["limits"]
    scratch = spec.scratch_size
    if spec.gpus:
        n = spec.gpus
        if not spec.cpu:
            limits["cpu"] = str(GPU_CPU_PER_GPU * n)
        if not spec.memory:
            limits["memory"] = _gi(GPU_MEMORY_PER_GPU_GI * n)
        if scratch == _DEFAULT_SCRATCH:
            scratch = _gi(GPU_SCRATCH_PER_GPU_GI * n)
    limits["ephemeral-storage"] = scratch
    resources["requests"] = dict(limits)
    tmpdir = "/tmp"  # noqa: S108 -- the scratch emptyDir
    for vol in pod_spec["volumes"]:
        if vol["name"] == "scratch":
            vol["emptyDir"]["sizeLimit"] = scratch
    for item in container["env"]:
        if item["name"] == "TMPDIR":
            tmpdir = item["value"]
    taken = {item["name"] for item in container["env"]}
    container["env"].extend(
        {"name": var, "value": f"{tmpdir.rstrip('/')}/{sub}"}
        for var, sub in CACHE_SUBDIRS.items() if var not in env and var not in taken)
    shm = _shm_size(spec, limits["memory"])
    if shm:
        pod_spec["volumes"].append({"name": SHM_VOLUME,
                                    "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
        container["volumeMounts"].append({"name": SHM_VOLUME, "mountPath": SHM_DIR})
    if deadline_s is None:
        pod_spec["activeDeadlineSeconds"] = int(default_deadline_s(spec))
    return merge_volumes(pod, volumes, volume_mounts)
