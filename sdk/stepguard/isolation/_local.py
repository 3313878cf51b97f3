"""Running a body on this machine: plain process or bubblewrap sandbox, with a hard deadline."""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

from stepguard.errors import ConfigurationError, IsolationError, StepTimeout
from stepguard.isolation._limits import (
    Cgroup,
    create_cgroup,
    make_preexec,
    parse_bytes,
    rlimits,
)
from stepguard.isolation._result import RunResult
from stepguard.isolation._sandbox import SANDBOX_HOME, SECRETS_DIR, build_bwrap
from stepguard.spec import IsolationSpec

Output = str | os.PathLike[str] | int | IO[Any] | None
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def base_path(bind_python: bool) -> str:
    """PATH for a body: the running Python's bin directory first, then the system directories."""
    if bind_python:
        return f"{os.path.join(sys.prefix, 'bin')}:{_SYSTEM_PATH}"
    return _SYSTEM_PATH


def _check_env(env: Mapping[str, str], secret_files: Mapping[str, bytes]) -> None:
    for key in list(env) + list(secret_files):
        if not _ENV_NAME.match(key):
            raise ConfigurationError("invalid environment variable name", subject=key)
    for key, value in env.items():
        if not isinstance(value, str) or "\0" in value:
            # Never echo the value: it may be a credential.
            raise ConfigurationError("environment value must be a string without NUL",
                                     subject=key)


def _open_output(target: Output, stack: contextlib.ExitStack) -> tuple[Any, str | None]:
    if target is None:
        return None, None
    if isinstance(target, (str, os.PathLike)):
        path = os.fspath(target)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        stack.callback(os.close, fd)
        return fd, path
    return target, None


def _kill_tree(proc: subprocess.Popen[bytes], cgroup: Cgroup | None, *, wait: bool) -> None:
    # The group first (the sandbox's bwrap, or the body and its ordinary children), then every
    # cgroup member: that catches processes that escaped the group with setsid().
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if cgroup is not None:
        cgroup.kill_all(wait=wait)


class _Gate:
    """The two pipes of bwrap's ``--info-fd`` / ``--block-fd`` handshake."""

    def __init__(self) -> None:
        self.info_r, self.info_w = os.pipe()
        self.block_r, self.block_w = os.pipe()
        os.set_inheritable(self.info_w, True)
        os.set_inheritable(self.block_r, True)

    def close(self) -> None:
        """Close our ends (bwrap's ends are closed with the other passed descriptors)."""
        for fd in (self.info_r, self.block_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def confine(self, proc: subprocess.Popen[bytes], cgroup: Cgroup | None,
                limits: list[tuple[int, int]], timeout_s: float) -> None:
        """Read the sandbox init's pid, confine it and bwrap, then let the body start."""
        import json
        import resource

        try:
            data = b""
            poller = select.poll()
            poller.register(self.info_r, select.POLLIN | select.POLLHUP)
            end = time.monotonic() + max(timeout_s, 1.0)
            while time.monotonic() < end and poller.poll(max(0.0, end - time.monotonic()) * 1000):
                chunk = os.read(self.info_r, 4096)
                if not chunk:
                    break
                data += chunk
            try:
                child = int(json.loads(data)["child-pid"])
            except (ValueError, KeyError, TypeError):
                raise IsolationError(
                    "the sandbox could not be set up (see bwrap's message on stderr)",
                    subject="bwrap",
                ) from None
            # The sandbox's init only: every process of the body descends from it. bwrap itself
            # stays outside and dies through the process group and --die-with-parent.
            for pid in (child,):
                try:
                    if cgroup is not None:
                        for procs in cgroup.procs_files:
                            with open(procs, "w") as fh:
                                fh.write(str(pid))
                    for res, value in limits:
                        resource.prlimit(pid, res, (value, value))
                except ProcessLookupError:
                    # The sandbox died during setup (bwrap said why on stderr): no body runs,
                    # there is nothing to confine, and its exit status reports the failure.
                    return
                except OSError as exc:
                    raise IsolationError(f"could not confine the sandbox ({exc.strerror})",
                                         subject="cgroup") from exc
            with contextlib.suppress(BrokenPipeError):
                os.write(self.block_w, b"x")
        finally:
            self.close()


def _wait(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Wait for exit without reaping; True when the process exited before the timeout."""
    fd = os.pidfd_open(proc.pid)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        end = time.monotonic() + timeout_s
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return False
            if poller.poll(min(left, 3600.0) * 1000):
                return True
    finally:
        os.close(fd)


def run_local(
    command: Sequence[str],
    spec: IsolationSpec,
    *,
    mode: str,
    ro_binds: Mapping[str, str],
    rw_binds: Mapping[str, str],
    env: Mapping[str, str],
    secret_files: Mapping[str, bytes],
    deadline_s: float,
    cwd: str | None,
    stdout: Output,
    stderr: Output,
    gpus: int,
    bind_python: bool,
) -> RunResult:
    """Run ``command`` as a plain process or in bubblewrap; see :func:`run_isolated`."""
    if not command:
        raise ConfigurationError("empty command", subject="command")
    if deadline_s <= 0:
        # The lifecycle passes what is left of the step's deadline: nothing left is a timeout.
        raise StepTimeout("the deadline passed before the body could start",
                          subject=os.path.basename(str(command[0])))
    _check_env(env, secret_files)
    for name in secret_files:
        if name in env:
            raise ConfigurationError("secret file name also set as a plain variable",
                                     subject=name)
    memory = parse_bytes(spec.memory, subject="isolation.memory") if spec.memory else None
    share_net = False
    network = "none"
    if spec.network != "none":
        if mode == "sandbox" and not spec.unsafe_host_network:
            raise ConfigurationError(
                "the local sandbox cannot filter egress by host; it has no network at all",
                subject="isolation.network",
                hint="use mode 'pod' for an egress allowlist, or set unsafe_host_network: true",
            )
        share_net = True
        network = "host"
    if mode == "sandbox" and spec.unsafe_host_network:
        import warnings

        warnings.warn("unsafe_host_network: the sandbox shares the host's network",
                      stacklevel=3)
        share_net = True
        network = "host"
    if mode == "process":
        network = "host"

    full_env: dict[str, str] = {"PATH": base_path(bind_python)}
    full_env.update(env)

    with contextlib.ExitStack() as stack:
        cgroup = create_cgroup(pids_limit=spec.pids_limit, memory_bytes=memory)
        if cgroup is not None:
            stack.callback(cgroup.remove)
        limits, rl_applied = rlimits(pids_limit=spec.pids_limit, memory_bytes=memory,
                                     cgroup=cgroup, gpus=gpus)
        applied = tuple((cgroup.applied if cgroup else []) + rl_applied)
        out_fd, out_path = _open_output(stdout, stack)
        err_fd, err_path = _open_output(stderr, stack)
        pass_fds: list[int] = []
        gpus_visible = False

        if mode == "sandbox":
            full_env.setdefault("HOME", SANDBOX_HOME)
            full_env.setdefault("TMPDIR", "/tmp")  # noqa: S108 -- the sandbox's private tmpfs
            for name in secret_files:
                full_env[name] = f"{SECRETS_DIR}/{name}"
            if cwd is not None:
                inside = [SANDBOX_HOME, "/tmp", *ro_binds.values(), *rw_binds.values()]  # noqa: S108
                if not any(cwd == d or cwd.startswith(d.rstrip("/") + "/") for d in inside):
                    raise ConfigurationError(
                        "working directory does not exist inside the sandbox "
                        "(use a bound path, /tmp or the sandbox home)", subject=cwd)
            tmp_size = parse_bytes(spec.scratch_size, subject="isolation.scratch_size")
            plan = build_bwrap(
                command, uid=spec.uid, ro_binds=ro_binds, rw_binds=rw_binds,
                extra_ro=spec.read_only_paths, secret_files=secret_files, cwd=cwd, gpus=gpus,
                share_net=share_net, bind_python=bind_python, tmp_size=tmp_size,
            )
            argv, pass_fds, gpus_visible = plan.argv, plan.pass_fds, plan.gpus_visible
            if plan.seccomp:
                applied = (*applied, "seccomp:deny-list")
            popen_cwd = "/"
        else:
            moved = [f"{h} -> {s}" for h, s in {**ro_binds, **rw_binds}.items()
                     if os.path.realpath(h) != os.path.realpath(s)]
            if moved:
                # A plain process sees the host as it is: a path can be offered, not moved.
                raise ConfigurationError("binds to another path need mode 'sandbox'",
                                         subject="isolation.mode", details=moved)
            if secret_files:
                shm = "/dev/shm"  # noqa: S108 -- tmpfs; the 0700 directory is ours
                base = shm if os.path.isdir(shm) else None
                sdir = tempfile.mkdtemp(prefix="stepguard-secrets-", dir=base)
                stack.callback(shutil.rmtree, sdir, True)
                for name, content in secret_files.items():
                    path = os.path.join(sdir, name)
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(content)
                    full_env[name] = path
            argv = list(command)
            popen_cwd = cwd  # type: ignore[assignment]

        preexec = None
        gate: _Gate | None = None
        if mode == "sandbox":
            # bwrap reports its sandbox init's pid and then waits on a pipe before running the
            # body: we put that init in the cgroup and set its rlimits in that window, so the
            # body starts already confined -- without a preexec_fn, which would force a slow
            # fork() of this whole process instead of vfork().
            gate = _Gate()
            argv[1:1] = ["--info-fd", str(gate.info_w), "--block-fd", str(gate.block_r)]
            pass_fds = [*pass_fds, gate.info_w, gate.block_r]
        elif limits or cgroup is not None:
            # Only os.open/os.write/setrlimit run between fork and exec.
            preexec = make_preexec(limits, cgroup.procs_files if cgroup else [])
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv, env=full_env, cwd=popen_cwd, stdin=subprocess.DEVNULL, stdout=out_fd,
                stderr=err_fd, start_new_session=True, close_fds=True, pass_fds=pass_fds,
                preexec_fn=preexec,  # noqa: PLW1509
            )
        except FileNotFoundError as exc:
            if gate is not None:
                gate.close()
            raise IsolationError("command not found", subject=str(argv[0])) from exc
        except (OSError, subprocess.SubprocessError) as exc:
            if gate is not None:
                gate.close()
            raise IsolationError(f"could not start the body ({exc})", subject=str(argv[0])) from exc
        finally:
            # bwrap has its copies; ours go now so secret data is not held twice.
            for fd in pass_fds:
                os.close(fd)
        finished = False
        try:
            if gate is not None:
                gate.confine(proc, cgroup, limits, deadline_s)
            finished = _wait(proc, deadline_s - (time.monotonic() - start))
        finally:
            # Nothing of the body outlives the step: not on timeout, not on success (background
            # children), not when our caller is interrupted.
            # One sweep while our child is an unreaped zombie (its pid, and so the group id, cannot
            # be reused yet), then reap it, then sweep until the cgroup is empty.
            _kill_tree(proc, cgroup, wait=False)
            code = proc.wait()
            if cgroup is not None:
                cgroup.kill_all()
        duration = time.monotonic() - start
        sig = -code if code < 0 else None
        result = RunResult(
            exit_code=code, duration_s=duration, mode=mode,  # type: ignore[arg-type]
            killed_by_deadline=not finished, signal=sig, limits=applied,
            gpus_visible=gpus_visible, network=network, stdout_path=out_path,
            stderr_path=err_path,
        )
        if not finished:
            err = StepTimeout(
                f"body exceeded its deadline of {deadline_s:.1f}s; "
                "its whole process tree was killed",
                subject=os.path.basename(str(command[0])),
                details=[f"mode: {mode}", f"ran: {duration:.2f}s"],
            )
            err.result = result  # type: ignore[attr-defined]
            raise err
        return result
