"""The value returned by every isolation mode."""

from __future__ import annotations

from dataclasses import dataclass

from stepguard.spec import IsolationMode


@dataclass(frozen=True)
class RunResult:
    """How an isolated body ended.

    ``limits`` names every resource limit that was actually enforced (for example
    ``"cgroup-v1:pids.max=1024"`` or ``"rlimit:RLIMIT_AS=..."``), so a receipt can say what applied
    on this kernel instead of what was asked for. ``stdout_path``/``stderr_path`` are set when the
    output was captured to files.
    """

    exit_code: int
    duration_s: float
    mode: IsolationMode
    killed_by_deadline: bool = False
    signal: int | None = None
    limits: tuple[str, ...] = ()
    gpus_visible: bool = False
    network: str = "none"
    stdout_path: str | None = None
    stderr_path: str | None = None
    pod_name: str | None = None

    @property
    def ok(self) -> bool:
        """True when the body exited with status 0."""
        return self.exit_code == 0
