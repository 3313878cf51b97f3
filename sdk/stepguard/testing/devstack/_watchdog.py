"""Stop a dev stack when the process that owns it dies.

Run as ``python -m stepguard.testing.devstack._watchdog``.

A test session that is killed (timeout, SIGKILL, a crashed CI runner) never runs its fixture's
teardown; the services, started in their own sessions, would outlive it. The watchdog, started
by ``up(owner_pid=...)``, polls the owner and runs ``down`` for it.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

POLL_SECONDS = 0.5


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a live owner from a recycled pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return fields[19]


def main(argv: list[str]) -> int:
    owner_pid, owner_start, state_dir = int(argv[0]), argv[1], Path(argv[2])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    procs_file = state_dir / "processes.json"
    while procs_file.exists():
        if process_start_time(owner_pid) != owner_start:
            from stepguard.testing.devstack import down

            down(state_dir)
            return 0
        time.sleep(POLL_SECONDS)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
