"""Which GPUs are visible here, and the one check every runner makes before a GPU step.

The local sandbox (bubblewrap, plain process) and the step runner inside a pod ask the same
question before the body starts: does this place show the GPUs the spec asks for? Without the
check, ``gpus: 1`` on a node without a driver, or in a pod whose runtime did not inject the
devices, silently trains on the CPU for hours (or fails deep inside the body).

What counts as visible, in order:

1. the numbered device nodes ``/dev/nvidia0``, ``/dev/nvidia1``, ... (none: no GPU, whatever else
   says so);
2. ``nvidia-smi -L`` when it is installed: the ``GPU n:`` lines it lists (a tool that fails means
   the driver cannot use the devices: none visible);
3. ``CUDA_VISIBLE_DEVICES`` when set: empty, ``-1`` or ``NoDevFiles`` hides every GPU; a list
   narrows the count to its length (MIG instance ids count one each).

>>> GpuProbe(device_nodes=2, listed=2, cuda_visible_devices="0").visible
1
>>> GpuProbe(device_nodes=1, listed=None, cuda_visible_devices="-1").visible
0
>>> require_gpus(0) == 0
True
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from stepguard.errors import GpuUnavailable

__all__ = ["GpuProbe", "probe_gpus", "require_gpus"]

log = logging.getLogger("stepguard.isolation")

_SEARCH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_HIDDEN = {"", "-1", "nodevfiles", "void", "none"}
_SMI_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class GpuProbe:
    """What one look at this machine (or pod) found.

    ``device_nodes``: numbered ``/dev/nvidiaN`` nodes; ``listed``: GPUs ``nvidia-smi -L`` listed
    (``None``: no nvidia-smi here); ``cuda_visible_devices``: the variable as set (``None``:
    unset); ``smi_error``: why nvidia-smi gave no list, if it failed.
    """

    device_nodes: int
    listed: int | None = None
    cuda_visible_devices: str | None = None
    smi_error: str | None = None

    @property
    def visible(self) -> int:
        """The number of GPUs a body started here could use."""
        count = self.device_nodes if self.listed is None else min(self.device_nodes, self.listed)
        if self.cuda_visible_devices is None or count == 0:
            return count
        raw = self.cuda_visible_devices.strip()
        if raw.lower() in _HIDDEN:
            return 0
        items = [i for i in (x.strip() for x in raw.split(",")) if i]
        if any(i.startswith("MIG-") for i in items):
            return len(items)  # MIG instances: several may share one device node
        return min(count, len(items))

    def describe(self) -> list[str]:
        """One line per source, for an error's details (no secret here: device facts only)."""
        lines = [f"/dev/nvidia[0-9]*: {self.device_nodes} device node(s)"]
        if self.smi_error:
            lines.append(f"nvidia-smi -L: {self.smi_error}")
        elif self.listed is not None:
            lines.append(f"nvidia-smi -L: {self.listed} GPU(s)")
        else:
            lines.append("nvidia-smi: not installed")
        if self.cuda_visible_devices is not None:
            lines.append(f"CUDA_VISIBLE_DEVICES={self.cuda_visible_devices!r}")
        return lines


def _device_nodes(dev: str) -> int:
    pattern = re.compile(re.escape(dev.rstrip("/")) + r"/nvidia\d+")
    return sum(1 for p in glob.glob(f"{dev.rstrip('/')}/nvidia[0-9]*") if pattern.fullmatch(p))


def probe_gpus(*, environ: Mapping[str, str] | None = None, dev: str = "/dev",
               smi: str | None = "auto") -> GpuProbe:
    """Look at this machine: device nodes under ``dev``, ``nvidia-smi -L`` (``smi``: its path,
    ``"auto"`` to search the system directories, ``None`` not to run it) and
    ``CUDA_VISIBLE_DEVICES`` from ``environ`` (default: this process's environment).

    >>> import tempfile
    >>> probe_gpus(environ={}, dev=tempfile.mkdtemp(), smi=None)
    GpuProbe(device_nodes=0, listed=None, cuda_visible_devices=None, smi_error=None)
    """
    env = os.environ if environ is None else environ
    nodes = _device_nodes(dev)
    path = shutil.which("nvidia-smi", path=_SEARCH) if smi == "auto" else smi
    listed: int | None = None
    error: str | None = None
    if path and nodes:
        try:
            out = subprocess.run([path, "-L"], capture_output=True, text=True,
                                 timeout=_SMI_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            error = f"could not run ({type(exc).__name__})"
        else:
            if out.returncode == 0:
                listed = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
            else:
                first = (out.stderr or out.stdout).strip().splitlines()[:1]
                error = f"exit {out.returncode}" + (f" ({first[0][:200]})" if first else "")
                listed = 0
    return GpuProbe(device_nodes=nodes, listed=listed,
                    cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES"), smi_error=error)


def require_gpus(count: int, *, optional: bool = False, probe: GpuProbe | None = None,
                 where: str = "this machine") -> int:
    """Check that ``count`` GPUs are visible; return how many the body will get.

    Fewer than ``count`` raises :class:`~stepguard.errors.GpuUnavailable` naming what was found,
    unless ``optional`` (the spec's ``gpus_optional``): then a warning is logged and emitted and
    the number actually visible is returned (possibly 0, and the body runs on the CPU).
    ``count == 0`` checks nothing.

    >>> require_gpus(1, probe=GpuProbe(device_nodes=0))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    stepguard.errors.GpuUnavailable: step asks for 1 GPU(s), 0 visible on ...: isolation.gpus
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     require_gpus(2, optional=True, probe=GpuProbe(device_nodes=1))
    1
    """
    if count <= 0:
        return 0
    found = probe if probe is not None else probe_gpus()
    visible = found.visible
    if visible >= count:
        return count
    message = f"step asks for {count} GPU(s), {visible} visible on {where}"
    if not optional:
        raise GpuUnavailable(
            message, subject="isolation.gpus", details=found.describe(),
            hint="run where the GPUs are (node selector, runtime class, device plugin), or set "
                 "gpus_optional: true if the body may run with fewer")
    log.warning("%s; gpus_optional is set, running with %d", message, visible)
    warnings.warn(f"{message}; gpus_optional: running with {visible}", stacklevel=2)
    return visible
