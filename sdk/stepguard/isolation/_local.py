"""Running a body on this machine: plain process or bubblewrap sandbox, with a hard deadline.

In the sandbox, when we run as root, the body runs under ``spec.uid`` on the host too: the output
directories are handed to that uid for the run and handed back afterwards, and every output is
sanitized (:mod:`stepguard.isolation._outputs`) before the run is reported. A sandbox memory
limit applies by default (:data:`DEFAULT_SANDBOX_MEMORY`, set ``isolation.memory`` to change it).
"""

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

from stepguard.errors import ConfigurationError, IntegrityError, IsolationError, StepTimeout
from stepguard.isolation._limits import (
    Cgroup,
    create_cgroup,
    make_preexec,
    parse_bytes,
    rlimits,
)
from stepguard.isolation._outputs import sanitize_output
from stepguard.isolation._result import RunResult
from stepguard.isolation._sandbox import (
    PIN_MISMATCH_STATUS,
    SANDBOX_HOME,
    SECRETS_DIR,
    build_bwrap,
)
from stepguard.spec import IsolationSpec

Output = str | os.PathLike[str] | int | IO[Any] | None
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The sandbox's memory limit when the spec names none (the pod's default limit is the same).
DEFAULT_SANDBOX_MEMORY = "2Gi"


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

    def __init__(self, host_uid: int | None) -> None:
        self.info_r, self.info_w = os.pipe()
        self.block_r, self.block_w = os.pipe()
        os.set_inheritable(self.info_w, True)
        os.set_inheritable(self.block_r, True)
        # With a caller-made user namespace map, a third pipe: bwrap waits for the map.
        self.host_uid = host_uid
        self.userns_r, self.userns_w = os.pipe() if host_uid is not None else (-1, -1)
        if host_uid is not None:
            os.set_inheritable(self.userns_r, True)

    def bwrap_args(self) -> tuple[list[str], list[int]]:
        """The bwrap options of the handshake and the descriptors bwrap inherits for it."""
        args = ["--info-fd", str(self.info_w), "--block-fd", str(self.block_r)]
        fds = [self.info_w, self.block_r]
        if self.host_uid is not None:
            args += ["--userns-block-fd", str(self.userns_r)]
            fds.append(self.userns_r)
        return args, fds

    def close(self) -> None:
        """Close our ends (bwrap's ends are closed with the other passed descriptors)."""
        for fd in (self.info_r, self.block_w, self.userns_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _map_user(self, pid: int) -> None:
        # Root inside is root outside, for bwrap's setup only (setpriv drops the body to
        # host_uid before it runs); the body's uid is the same number on both sides.
        uid = self.host_uid
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as fh:
                fh.write(f"0 0 1\n{uid} {uid} 1\n")
        os.write(self.userns_w, b"x")

    def confine(self, proc: subprocess.Popen[bytes], cgroup: Cgroup | None,
                limits: list[tuple[int, int]], timeout_s: float) -> None:
        """Read the sandbox init's pid, map its user namespace when we own the map, confine it
        and bwrap, then let the body start."""
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
                    if self.host_uid is not None:
                        self._map_user(pid)
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
    ro_bind_fds: Mapping[int, str] | None = None,
) -> RunResult:
    """Run ``command`` as a plain process or in bubblewrap; see :func:`run_isolated`."""
    if not command:
        raise ConfigurationError("empty command", subject="command")
    if deadline_s <= 0:
        # The lifecycle passes what is left of the step's deadline: nothing left is a timeout.
        raise StepTimeout("the deadline passed before the body could start",
                          subject=os.path.basename(str(command[0])))
    _check_env(env, secret_files)
    if gpus > 0:
        # One check for the sandbox and the step runner inside a pod (mode process there).
        from stepguard.isolation._gpu import require_gpus

        gpus = require_gpus(gpus, optional=spec.gpus_optional)
    for name in secret_files:
        if name in env:
            raise ConfigurationError("secret file name also set as a plain variable",
                                     subject=name)
    memory_text = spec.memory or (DEFAULT_SANDBOX_MEMORY if mode == "sandbox" else None)
    memory = parse_bytes(memory_text, subject="isolation.memory") if memory_text else None
    pinned = dict(ro_bind_fds or {})
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
        host_uid: int | None = None
        owners: dict[str, tuple[int, int]] = {}
        found: list[str] = []

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
                ro_bind_fds=pinned,
            )
            argv, pass_fds, gpus_visible = plan.argv, plan.pass_fds, plan.gpus_visible
            host_uid = plan.host_uid
            if host_uid is not None:
                applied = (*applied, f"uid:host={host_uid}")
                owners = _hand_over(rw_binds, host_uid, stack)
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
            for fd, where in pinned.items():
                # No bind to make: the path must still be the object that was verified.
                _check_pinned(fd, where)
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
            gate = _Gate(host_uid)
            gate_args, gate_fds = gate.bwrap_args()
            argv[1:1] = gate_args
            pass_fds = [*pass_fds, *gate_fds]
        elif limits or cgroup is not None:
            # Only os.open/os.write/setrlimit run between fork and exec.
            preexec = make_preexec(limits, cgroup.procs_files if cgroup else [])
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv, env=full_env, cwd=popen_cwd, stdin=subprocess.DEVNULL, stdout=out_fd,
                stderr=err_fd, start_new_session=True, close_fds=True,
                pass_fds=[*pass_fds, *pinned], preexec_fn=preexec,  # noqa: PLW1509
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
            if mode == "sandbox":
                # Nothing of the body runs any more: make its outputs safe on every path.
                found = _sanitize_outputs(rw_binds, host_uid, owners)
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
        if mode == "sandbox" and plan.pinned and code == PIN_MISMATCH_STATUS:
            mismatch = IntegrityError(
                "a bound input is not the directory that was verified; the body did not run",
                subject=", ".join(pinned.values()))
            mismatch.result = result  # type: ignore[attr-defined]
            raise mismatch
        if found:
            unsafe = IntegrityError(
                "the body left set-id or special files in its output; they were made safe and "
                "the run is refused", subject=found[0].split(": ", 1)[0], details=found)
            unsafe.result = result  # type: ignore[attr-defined]
            raise unsafe
        return result


def _check_pinned(fd: int, path: str) -> None:
    st, now = os.fstat(fd), os.stat(path)
    if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
        raise IntegrityError("the input path no longer leads to the directory that was verified",
                             subject=path)


def _hand_over(rw_binds: Mapping[str, str], uid: int,
               stack: contextlib.ExitStack) -> dict[str, tuple[int, int]]:
    """Give each output directory's top to the body's host uid for the run; returns the owners
    to restore (restored on every path, first thing after the run)."""
    owners: dict[str, tuple[int, int]] = {}
    for host in rw_binds:
        real = os.path.realpath(host)
        st = os.stat(real)
        owners[real] = (st.st_uid, st.st_gid)
        if (st.st_uid, st.st_gid) != (uid, uid):
            stack.callback(_restore_owner, real, st.st_uid, st.st_gid)
            os.chown(real, uid, uid)
    return owners


def _restore_owner(path: str, uid: int, gid: int) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.fchown(fd, uid, gid)
        finally:
            os.close(fd)


def _sanitize_outputs(rw_binds: Mapping[str, str], host_uid: int | None,
                      owners: Mapping[str, tuple[int, int]]) -> list[str]:
    """Sanitize every writable bind; returns what had to be made safe, one line per file."""
    found: list[str] = []
    for host in rw_binds:
        real = os.path.realpath(host)
        if real in owners:
            # The top first: from here on no other process of the body's uid can add to it.
            _restore_owner(real, *owners[real])
        if host_uid is not None:
            report = sanitize_output(real, owner=(os.geteuid(), os.getegid()), body_uid=host_uid)
        else:
            report = sanitize_output(real)
        found += [f"{real}/{p}: set-id bits (cleared)" for p in report.setid]
        found += [f"{real}/{p}: special file (removed)" for p in report.special]
    return found
