"""Resource limits for local bodies: cgroups where writable, rlimits otherwise.

What applies depends on the kernel and on who we run as, so every limit that was actually put in
place is reported by name (``RunResult.limits``) instead of assumed.

* cgroup v2 (``/sys/fs/cgroup`` is cgroup2 and our cgroup is writable): ``pids.max``,
  ``memory.max`` (+ ``memory.swap.max = 0``), and ``cgroup.kill`` for the deadline.
* cgroup v1 (hybrid hosts, many containers): the ``pids`` and ``memory`` hierarchies.
* otherwise rlimits: ``RLIMIT_AS`` for memory (not with GPUs: CUDA reserves far more address space
  than it uses) and ``RLIMIT_NPROC`` (only when we are not root -- the kernel exempts uid 0, and a
  sandbox user mapped onto host root is still uid 0 to that check).

``RLIMIT_CORE = 0`` always: a core dump of a body holding credentials is a secret on disk.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stepguard.errors import ConfigurationError

_CGROOT = Path("/sys/fs/cgroup")
_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_bytes(value: str, *, subject: str) -> int:
    """Parse a Kubernetes-style quantity (``512Mi``, ``2G``, ``1073741824``) into bytes.

    >>> parse_bytes("512Mi", subject="isolation.memory")
    536870912
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTkmgt]i?)?\s*", value)
    if not m:
        raise ConfigurationError("not a byte quantity (e.g. 512Mi, 2Gi)", subject=subject)
    unit = (m.group(2) or "").lower()
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass
class Cgroup:
    """A throwaway cgroup (one directory per hierarchy) holding exactly one body's processes."""

    dirs: list[Path]
    version: int
    applied: list[str] = field(default_factory=list)

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError):
                found.update(int(x) for x in (d / "cgroup.procs").read_text().split())
        return found

    def kill_all(self, timeout_s: float = 5.0, *, wait: bool = True) -> None:
        """SIGKILL every member, including processes that left our session or process group.

        With ``wait`` it keeps sweeping until the cgroup is empty (a member may fork between
        reading the list and the kill), for at most ``timeout_s``.
        """
        if self.version == 2:
            with contextlib.suppress(OSError):
                (self.dirs[0] / "cgroup.kill").write_text("1")
        end = time.monotonic() + timeout_s
        delay = 0.0005
        while True:
            members = self.pids()
            if not members:
                return
            for pid in members:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if not wait or time.monotonic() >= end:
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def remove(self) -> None:
        for d in self.dirs:
            delay = 0.0005
            for _ in range(40):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    # Members killed a moment ago are still being torn down.
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)


def _own_cgroup_v1(controller: str) -> Path | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and controller in parts[1].split(","):
            return _CGROOT / controller / parts[2].lstrip("/")
    return None


def _make_child(parent: Path) -> Path | None:
    child = parent / f"stepguard-{secrets.token_hex(6)}"
    try:
        child.mkdir(mode=0o755)
    except OSError:
        return None
    return child


def create_cgroup(*, pids_limit: int | None, memory_bytes: int | None) -> Cgroup | None:
    """Create a cgroup for one body, or None where no cgroup hierarchy is writable."""
    if (_CGROOT / "cgroup.controllers").exists():
        try:
            own = next(line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines()
                       if line.startswith("0::"))
        except (OSError, StopIteration):
            return None
        parent = _CGROOT / own.lstrip("/")
        with contextlib.suppress(OSError):
            (parent / "cgroup.subtree_control").write_text("+pids +memory")
        child = _make_child(parent)
        if child is None:
            return None
        cg = Cgroup([child], 2)
        if pids_limit and _write(child / "pids.max", str(pids_limit)):
            cg.applied.append(f"cgroup-v2:pids.max={pids_limit}")
        if memory_bytes and _write(child / "memory.max", str(memory_bytes)):
            cg.applied.append(f"cgroup-v2:memory.max={memory_bytes}")
            _write(child / "memory.swap.max", "0")
        return cg
    dirs: list[Path] = []
    applied: list[str] = []
    for controller, knob, value in (("pids", "pids.max", pids_limit),
                                    ("memory", "memory.limit_in_bytes", memory_bytes)):
        if controller == "memory" and not value:
            continue  # the pids hierarchy alone is enough to find every process
        v1_parent = _own_cgroup_v1(controller)
        if v1_parent is None or not v1_parent.is_dir():
            continue
        made = _make_child(v1_parent)
        if made is None:
            continue
        child = made
        dirs.append(child)
        if value and _write(child / knob, str(value)):
            applied.append(f"cgroup-v1:{knob}={value}")
            if controller == "memory":
                _write(child / "memory.memsw.limit_in_bytes", str(value))
    if not dirs:
        return None
    return Cgroup(dirs, 1, applied)


def _write(path: Path, value: str) -> bool:
    try:
        path.write_text(value)
    except OSError:
        return False
    return True


def rlimits(*, pids_limit: int | None, memory_bytes: int | None, cgroup: Cgroup | None,
            gpus: int) -> tuple[list[tuple[int, int]], list[str]]:
    """The rlimits to set in the child, and their names for the result."""
    limits: list[tuple[int, int]] = [(resource.RLIMIT_CORE, 0)]
    applied = ["rlimit:RLIMIT_CORE=0"]
    has_mem = cgroup is not None and any("memory" in a for a in cgroup.applied)
    has_pids = cgroup is not None and any("pids" in a for a in cgroup.applied)
    if memory_bytes and not has_mem and gpus == 0:
        limits.append((resource.RLIMIT_AS, memory_bytes))
        applied.append(f"rlimit:RLIMIT_AS={memory_bytes}")
    if pids_limit and not has_pids and os.geteuid() != 0:
        limits.append((resource.RLIMIT_NPROC, pids_limit))
        applied.append(f"rlimit:RLIMIT_NPROC={pids_limit}")
    return limits, applied


def make_preexec(limits: list[tuple[int, int]], procs_files: list[str]) -> Callable[[], None]:
    """A preexec function that joins the cgroup and sets rlimits before exec.

    Joining before exec (not after spawn) means no process of the body ever runs outside the
    cgroup, so nothing can fork its way out in the gap.
    """
    encoded = [p.encode() for p in procs_files]

    def _preexec() -> None:
        for path in encoded:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        for res, value in limits:
            resource.setrlimit(res, (value, value))

    return _preexec
