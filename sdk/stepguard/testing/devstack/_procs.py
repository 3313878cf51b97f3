"""Starting and stopping the stack's processes by pid, and waiting for them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from stepguard.errors import ServiceError

PROCS_FILE = "processes.json"
# Children started by this process, kept so a later table (``down`` after ``up`` in one test
# session) can collect their exit status instead of leaving zombies.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class Proc:
    """One process the stack started (its own session, so its pid is also its group id)."""

    name: str
    pid: int
    port: int
    log: str
    #: A substring of /proc/<pid>/cmdline: guards against killing a recycled pid.
    marker: str
    #: Signal that asks for a fast, clean shutdown.
    stop_signal: int = signal.SIGTERM


def remember_child(popen: subprocess.Popen[bytes]) -> None:
    _CHILDREN[popen.pid] = popen


def reap(pid: int, timeout: float = 0.0) -> None:
    """Collect the exit status of a child this process started (no zombie is left), waiting up
    to ``timeout`` seconds for it to finish exiting."""
    popen = _CHILDREN.get(pid)
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=timeout)
            _CHILDREN.pop(pid, None)


#: After a process stopped (or was killed), how long to wait for its exit to complete. An
#: exiting process loses its command line before it becomes a zombie: ``pid_alive`` with a
#: marker already says no, but its exit status cannot be collected yet.
EXIT_WAIT = 5.0


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def pid_alive(pid: int, marker: str | None = None) -> bool:
    """True if ``pid`` runs and (when given) its command line contains ``marker``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # A zombie has exited; only its parent's wait() is missing.
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
        if marker is None:
            return True
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except (OSError, IndexError):
        return marker is None
    return marker.encode() in cmdline


# Lines in which services print credentials (the dev server prints its root token).
_SECRET_LINE = re.compile(r"(root token|unseal key|password|secret|token)\s*[:=]", re.IGNORECASE)
_REDACT: set[str] = set()


def redact_in_logs(*values: str) -> None:
    """Never show ``values`` in a log tail (error details are printed and logged)."""
    _REDACT.update(v for v in values if v)


def log_tail(path: str | Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    out = []
    for raw in text.splitlines()[-lines:]:
        line = raw
        if _SECRET_LINE.search(line):
            line = _SECRET_LINE.split(line, 1)[0] + "[redacted]"
        for value in _REDACT:
            line = line.replace(value, "[redacted]")
        out.append(f"log: {line}")
    return out


class ProcessTable:
    """The processes of one stack, persisted as soon as each one starts.

    Writing every pid before waiting for readiness means ``down`` can stop a half-started
    stack even if ``up`` itself was killed.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / PROCS_FILE
        self.procs: dict[str, Proc] = {}
        self._popen: dict[str, subprocess.Popen[bytes]] = {}

    @classmethod
    def load(cls, state_dir: Path) -> ProcessTable:
        table = cls(state_dir)
        try:
            raw = json.loads(table.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return table
        except ValueError:
            return table
        for item in raw:
            table.procs[item["name"]] = Proc(**item)
        return table

    def _save(self) -> None:
        data = [p.__dict__ for p in self.procs.values()]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        port: int,
        log: Path,
        marker: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> Proc:
        """Start ``argv`` detached (own session), output to ``log``; record its pid at once."""
        try:
            # Services print credentials at start (the dev server its root token): 0600.
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "ab") as out:
                popen = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=dict(env) if env is not None else None,
                    cwd=cwd,
                    start_new_session=True,
                    close_fds=True,
                    user=user,
                    group=user,
                    extra_groups=[] if user else None,
                )
        except OSError as exc:
            raise ServiceError(
                f"could not start {name}", subject=str(argv[0]), details=(f"{type(exc).__name__}",),
            ) from exc
        proc = Proc(name, popen.pid, port, str(log), marker, int(stop_signal))
        self.procs[name] = proc
        self._popen[name] = popen
        _CHILDREN[popen.pid] = popen
        self._save()
        return proc

    def check_running(self, name: str) -> None:
        """Raise ServiceError with the log tail if ``name`` has exited."""
        proc = self.procs[name]
        popen = self._popen.get(name)
        exited = popen.poll() is not None if popen is not None else not pid_alive(proc.pid)
        if exited:
            code = popen.returncode if popen is not None else None
            status = f" (status {code})" if code is not None else ""
            raise ServiceError(
                f"{name} exited during start-up{status}",
                subject=name,
                details=log_tail(proc.log),
            )

    def wait_ready(
        self, name: str, probe: Callable[[], bool], *, timeout: float, what: str = "ready"
    ) -> None:
        """Poll ``probe`` until true; fail early if the process exits; bounded by ``timeout``.

        The poll backs off exponentially from 20 ms to 250 ms (tenacity); a process that exits
        ends the wait at once with its log tail.
        """
        from tenacity import (
            RetryError,
            Retrying,
            retry_if_result,
            stop_after_delay,
            wait_exponential,
        )

        def ready() -> bool:
            self.check_running(name)  # a ServiceError here is not retried: it ends the wait
            return probe()

        try:
            Retrying(retry=retry_if_result(lambda ok: not ok),
                     wait=wait_exponential(multiplier=0.02, exp_base=1.5, max=0.25),
                     stop=stop_after_delay(timeout), reraise=True)(ready)
        except RetryError:
            raise ServiceError(
                f"{name} was not {what} within {timeout:g}s",
                subject=name,
                details=log_tail(self.procs[name].log),
            ) from None

    def stop_all(self, *, timeout: float = 10.0) -> list[str]:
        """Stop every recorded process (clean signal, then KILL); return problems found."""
        problems: list[str] = []
        # Reverse start order: clients of a service stop before it.
        procs = list(self.procs.values())[::-1]
        running = {p.name for p in procs if pid_alive(p.pid, p.marker)}
        ours = running | {p.name for p in procs if p.name in self._popen}
        for proc in procs:
            if proc.name in ours:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(proc.pid, proc.stop_signal)
        deadline = time.monotonic() + timeout
        for proc in procs:
            while pid_alive(proc.pid, proc.marker) and time.monotonic() < deadline:
                self._reap(proc.name)
                time.sleep(0.05)
            if pid_alive(proc.pid, proc.marker):
                problems.append(f"{proc.name} (pid {proc.pid}) ignored signal; killed")
            # The whole session goes, so helpers a service forked cannot outlive it; only for
            # pids proven ours, never a recycled one.
            if proc.name in ours:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            self._reap(proc.name, EXIT_WAIT)
        for proc in procs:
            # One that died before binding (e.g. its port was taken) owns no port to wait for.
            if proc.name not in running:
                continue
            end = time.monotonic() + 5.0
            while port_open(proc.port) and time.monotonic() < end:
                time.sleep(0.05)
            if port_open(proc.port):
                problems.append(f"{proc.name}: port {proc.port} still accepts connections")
        self.procs.clear()
        self._popen.clear()
        self.path.unlink(missing_ok=True)
        return problems

    def _reap(self, name: str, timeout: float = 0.0) -> None:
        pid = self.procs[name].pid
        popen = self._popen.get(name) or _CHILDREN.get(pid)
        if popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=timeout)
                _CHILDREN.pop(pid, None)


def session_members(sid: int) -> list[int]:
    """Pids of the live processes in session ``sid`` (``/proc``), other than ``sid`` itself.

    >>> session_members(2**22 + 17)
    []
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == sid:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields: state ppid pgrp session ...
        if len(fields) > 3 and fields[3] == str(sid) and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def http_responds(url: str, *, ok_only: bool = False) -> Callable[[], bool]:
    """A probe: true once ``url`` answers HTTP (any status unless ``ok_only``)."""

    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:  # noqa: S310 -- loopback http
                return bool(resp.status < 400 or not ok_only)
        except urllib.error.HTTPError as exc:
            return not ok_only or exc.code < 400
        except (OSError, ValueError):
            return False

    return probe
