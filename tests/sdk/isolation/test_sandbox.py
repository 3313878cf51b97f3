"""The bubblewrap sandbox, for real: the success path and every escape attempt from the issue.

Each attack is also tried where it *should* work (plain process mode, or the host) when that is
cheap, so a test that passes because the attack was broken cannot hide.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from stepguard.errors import ConfigurationError, IsolationError, StepTimeout
from stepguard.isolation import RunResult, find_bwrap, run_isolated
from stepguard.spec import IsolationSpec

pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed"),
]

SANDBOX = IsolationSpec(mode="sandbox")
PROCESS = IsolationSpec(mode="process")
PY = sys.executable


@pytest.fixture
def io_dirs(tmp_path: Path) -> tuple[Path, Path]:
    inp = tmp_path / "in"
    out = tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    (inp / "data.txt").write_text("hello data\n")
    return inp, out


def sandboxed(script: str, *, inp: Path | None = None, out: Path | None = None,
              spec: IsolationSpec = SANDBOX, deadline_s: float = 30, **kw: object) -> tuple[RunResult, str]:
    """Run a Python body in the sandbox with /in (ro) and /out (rw); return result and stdout."""
    tmp = Path(os.environ.get("PYTEST_TMP", "/tmp"))
    log = Path(
        subprocess.check_output(["mktemp", "-p", str(tmp), "sg-out.XXXXXX"], text=True).strip()
    )
    ro = {str(inp): "/in"} if inp else {}
    rw = {str(out): "/out"} if out else {}
    try:
        res = run_isolated([PY, "-c", textwrap.dedent(script)], spec, ro_binds=ro, rw_binds=rw,
                           deadline_s=deadline_s, stdout=log, stderr=subprocess.STDOUT, **kw)
        return res, log.read_text()
    finally:
        log.unlink()


def test_success_path_reads_input_writes_output(io_dirs: tuple[Path, Path]) -> None:
    inp, out = io_dirs
    res, text = sandboxed("""
        import os
        data = open('/in/data.txt').read()
        open('/out/result.txt', 'w').write(data.upper())
        print('uid', os.getuid(), 'home', os.environ['HOME'])
    """, inp=inp, out=out)
    assert res.exit_code == 0, text
    assert res.mode == "sandbox" and res.network == "none" and not res.killed_by_deadline
    assert (out / "result.txt").read_text() == "HELLO DATA\n"
    assert "uid 65534 home /home/stepguard" in text


def test_nonzero_exit_is_reported_not_raised() -> None:
    res, _ = sandboxed("raise SystemExit(7)")
    assert res.exit_code == 7 and not res.ok


def test_custom_uid_and_environment_is_exactly_what_was_given(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOST_CANARY", "host-env-canary-4711")
    res, text = sandboxed("""
        import os, json
        print(json.dumps(dict(os.environ)), os.getuid(), os.getgid())
    """, spec=IsolationSpec(mode="sandbox", uid=1234), env={"ONLY": "this"})
    assert res.exit_code == 0, text
    env_json, uid, gid = text.rsplit(" ", 2)
    import json
    env = json.loads(env_json)
    # PWD comes from bwrap's chdir, LC_CTYPE from Python's own C-locale coercion (PEP 538).
    assert set(env) - {"PWD", "LC_CTYPE"} == {"ONLY", "PATH", "HOME", "TMPDIR"}, env
    assert (uid, gid.strip()) == ("1234", "1234")
    assert "host-env-canary-4711" not in text


# -- escape attempts -------------------------------------------------------------------------


@pytest.fixture
def host_service() -> tuple[int, list[bytes]]:
    """A TCP service on the host's 127.0.0.1 that records who reached it."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    seen: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    seen.append(conn.recv(100))
                except OSError:
                    seen.append(b"")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1], seen
    stop.set()
    t.join()
    srv.close()


CONNECT = """
    import socket, sys
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect(('127.0.0.1', {port})); s.sendall(b'escaped'); print('CONNECTED')
    except OSError as e:
        print('REFUSED', e)
"""


def test_cannot_reach_a_service_on_the_hosts_loopback(host_service: tuple[int, list[bytes]]) -> None:
    port, seen = host_service
    # Control: a plain process does reach it, so the probe works.
    res, text = sandboxed(CONNECT.format(port=port), spec=PROCESS)
    assert "CONNECTED" in text
    end = time.monotonic() + 10
    while not seen and time.monotonic() < end:
        time.sleep(0.05)
    assert seen == [b"escaped"]
    seen.clear()
    res, text = sandboxed(CONNECT.format(port=port))
    assert res.exit_code == 0 and "REFUSED" in text, text
    time.sleep(0.5)
    assert seen == []


def test_only_loopback_interface_and_no_dns() -> None:
    res, text = sandboxed("""
        import socket, os
        print('IFACES', sorted(n for _, n in socket.if_nameindex()))
        print('RESOLV', os.path.exists('/etc/resolv.conf'))
        for host in ('example.com', 'kubernetes.default.svc', 'pypi.org'):
            try:
                socket.getaddrinfo(host, 443); print('RESOLVED', host)
            except OSError as e:
                print('NODNS', host)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.sendto(b'x', ('8.8.8.8', 53)); print('SENT')
        except OSError as e:
            print('NOROUTE', e.errno)
    """)
    assert res.exit_code == 0, text
    assert "IFACES ['lo']" in text
    assert "RESOLV False" in text
    assert "RESOLVED" not in text and text.count("NODNS") == 3
    assert "NOROUTE" in text


def test_host_secrets_home_and_environment_are_invisible(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".vault-token").write_text("hvs.VAULT-TOKEN-CANARY")
    (home / ".aws" / "credentials").write_text("[default]\naws_secret_access_key=AWS-CANARY\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ENV-CANARY-SECRET")
    monkeypatch.setenv("VAULT_TOKEN", "hvs.ENV-VAULT-CANARY")
    paths = [str(home / ".vault-token"), str(home / ".aws" / "credentials"),
             os.path.expanduser("~root/.vault-token"), "/root/.aws/credentials", "/run/secrets",
             "/etc/shadow", "/home", "/var/run/secrets/kubernetes.io", "/proc/1/environ"]
    # Control: the host (a plain process) can read the planted files.
    res, text = sandboxed(f"print(open({str(home / '.vault-token')!r}).read())", spec=PROCESS)
    assert "VAULT-TOKEN-CANARY" in text
    res, text = sandboxed(f"""
        import os, glob
        for p in {paths!r}:
            try:
                if os.path.isdir(p):
                    print('LISTED', p, os.listdir(p))
                else:
                    print('READ', p, open(p).read())
            except OSError as e:
                print('DENIED', p, type(e).__name__)
        print('ROOT', sorted(os.listdir('/')))
        print('ROOTHOME', os.listdir('/root') if os.path.isdir('/root') else None)
        print('ENV', dict(os.environ))
    """)
    assert res.exit_code == 0, text
    for canary in ("VAULT-TOKEN-CANARY", "AWS-CANARY", "ENV-CANARY-SECRET", "ENV-VAULT-CANARY"):
        assert canary not in text
    # /proc/1 is the sandbox's own init (bwrap); its environment is the sandbox's, not the host's.
    assert [ln for ln in text.splitlines()
            if ln.startswith("READ") and not ln.startswith("READ /proc/1/environ")] == []
    assert "LISTED /home ['stepguard']" in text
    # Only the Python installation is bound under /root, never /root itself.
    assert "ROOTHOME" in text and ".vault-token" not in text.split("ROOTHOME")[1]


def test_writes_outside_the_output_dir_fail(io_dirs: tuple[Path, Path]) -> None:
    inp, out = io_dirs
    before = (inp / "data.txt").read_text()
    targets = ["/in/data.txt", "/in/new.txt", "/usr/evil", "/etc/evil", "/evil", "/bin/evil",
               os.path.join(sys.prefix, "evil"), os.path.join(sys.base_prefix, "evil")]
    res, text = sandboxed(f"""
        for p in {targets!r}:
            try:
                open(p, 'a').write('x'); print('WROTE', p)
            except OSError as e:
                print('BLOCKED', p, e.errno)
        open('/out/ok', 'w').write('fine'); open('/tmp/scratch', 'w').write('fine')
        print('DONE')
    """, inp=inp, out=out)
    assert res.exit_code == 0, text
    assert "WROTE" not in text and text.count("BLOCKED") == len(targets) and "DONE" in text
    assert (inp / "data.txt").read_text() == before and not (inp / "new.txt").exists()
    assert (out / "ok").read_text() == "fine"
    for host in ("/usr/evil", "/etc/evil", "/evil", os.path.join(sys.prefix, "evil")):
        assert not os.path.exists(host)


def test_no_privileges_and_setuid_binaries_do_not_elevate(io_dirs: tuple[Path, Path]) -> None:
    inp, out = io_dirs
    # A setuid-root copy of `id`, planted where the body can run it.
    suid = inp / "suid-id"
    shutil.copy("/usr/bin/id", suid)
    os.chown(suid, 0, 0)
    os.chmod(suid, 0o4755)
    assert os.stat(suid).st_mode & stat.S_ISUID
    res, text = sandboxed("""
        import subprocess, os
        status = open('/proc/self/status').read()
        for key in ('CapEff', 'CapPrm', 'CapBnd', 'CapAmb', 'NoNewPrivs'):
            print(key, [l.split()[1] for l in status.splitlines() if l.startswith(key + ':')][0])
        print('SUID_EUID', subprocess.run(['/in/suid-id', '-u'], capture_output=True, text=True).stdout.strip())
        for cmd in (['su', '-c', 'id -u'], ['sudo', 'id', '-u'], ['unshare', '-Ur', 'id', '-u'],
                    ['mount', '-t', 'tmpfs', 'x', '/tmp']):
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
                print('RAN', cmd[0], r.returncode, r.stdout.strip())
            except OSError as e:
                print('NOEXEC', cmd[0])
        try:
            os.setuid(0); print('SETUID0')
        except OSError:  # EPERM, or EINVAL: uid 0 does not even exist in the namespace
            print('NOSETUID')
    """, inp=inp, out=out)
    assert res.exit_code == 0, text
    for key in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert f"{key} 0000000000000000" in text
    assert "NoNewPrivs 1" in text
    assert "SUID_EUID 65534" in text
    assert "NOSETUID" in text and "SETUID0" not in text
    for line in text.splitlines():
        if line.startswith("RAN"):
            _, _, code, *outp = line.split(" ")
            assert code != "0" or outp != ["0"], line


def test_deadline_kills_a_setsid_grandchild(io_dirs: tuple[Path, Path]) -> None:
    _, out = io_dirs
    script = """
        import subprocess, time
        subprocess.Popen(['sh', '-c', '(setsid sh -c "sleep 2; touch /out/late" &) ; true'],
                         start_new_session=True)
        time.sleep(0.3); print('spawned', flush=True); time.sleep(60)
    """
    t0 = time.monotonic()
    with pytest.raises(StepTimeout) as info:
        sandboxed(script, out=out, deadline_s=1)
    assert time.monotonic() - t0 < 5
    assert info.value.result.killed_by_deadline  # type: ignore[attr-defined]
    time.sleep(2.5)
    assert not (out / "late").exists()


def test_background_grandchild_does_not_outlive_a_successful_body(
        io_dirs: tuple[Path, Path]) -> None:
    _, out = io_dirs
    res = run_isolated(["sh", "-c", '(setsid sh -c "sleep 1; touch /out/late" &); exit 0'],
                       SANDBOX, rw_binds={str(out): "/out"}, deadline_s=10)
    assert res.exit_code == 0
    time.sleep(1.8)
    assert not (out / "late").exists()


def test_process_mode_deadline_also_kills_escaped_grandchildren(tmp_path: Path) -> None:
    """Process mode relies on the cgroup for setsid() escapees; without one only the group dies."""
    from stepguard.isolation._limits import create_cgroup

    probe = create_cgroup(pids_limit=None, memory_bytes=None)
    if probe is None:
        pytest.skip("no writable cgroup here: process mode kills the process group only")
    probe.remove()
    late = tmp_path / "late"
    with pytest.raises(StepTimeout):
        run_isolated(["sh", "-c", f'(setsid sh -c "sleep 2; touch {late}" &); sleep 60'],
                     PROCESS, deadline_s=1)
    time.sleep(2.5)
    assert not late.exists()


RUNNER = """
import sys
from stepguard.isolation import run_isolated
from stepguard.spec import IsolationSpec
run_isolated(["sh", "-c", "while true; do echo tick >> /out/ticks; sleep 0.1; done"],
             IsolationSpec(mode="sandbox"), rw_binds={sys.argv[1]: "/out"}, deadline_s=120)
"""


def test_body_dies_when_its_runner_is_killed(io_dirs: tuple[Path, Path]) -> None:
    _, out = io_dirs
    runner = subprocess.Popen([PY, "-c", RUNNER, str(out)])
    ticks = out / "ticks"
    try:
        end = time.monotonic() + 20
        while not (ticks.exists() and ticks.stat().st_size > 20):
            assert time.monotonic() < end, "body never started"
            time.sleep(0.05)
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait()
    time.sleep(0.5)
    size = ticks.stat().st_size
    time.sleep(1.0)
    assert ticks.stat().st_size == size, "the body kept running after its runner was killed"


# -- limits ------------------------------------------------------------------------------------


def test_process_limit_applies_where_the_kernel_allows() -> None:
    spec = IsolationSpec(mode="sandbox", pids_limit=16)
    res, text = sandboxed("""
        import subprocess
        procs = []
        try:
            for i in range(64):
                procs.append(subprocess.Popen(['sleep', '5']))
            print('SPAWNED', len(procs))
        except OSError as e:
            print('LIMITED', len(procs), e.errno)
        for p in procs:
            p.kill()
    """, spec=spec)
    if not any("pids" in lim for lim in res.limits):
        pytest.skip(f"no process limit applies here (limits: {res.limits})")
    assert "LIMITED" in text, text


def test_memory_limit_applies_where_the_kernel_allows() -> None:
    spec = IsolationSpec(mode="sandbox", memory="64Mi")
    res, text = sandboxed("""
        blocks = []
        for i in range(40):
            blocks.append(bytearray(16 * 1024 * 1024))
        print('ALLOCATED', len(blocks) * 16, 'MiB')
    """, spec=spec)
    assert any("memory" in lim or "RLIMIT_AS" in lim for lim in res.limits), res.limits
    assert res.exit_code != 0 and "ALLOCATED" not in text


# -- secrets, output, configuration ------------------------------------------------------------


def _variants(canary: str) -> list[str]:
    return [canary, canary.upper(), base64.b64encode(canary.encode()).decode(),
            urllib.parse.quote(canary, safe="")]


def test_secret_files_are_0400_on_a_private_tmpfs_and_never_on_a_command_line(
        tmp_path: Path) -> None:
    canary = "sg-canary-7f3a9c/secret+value"
    seen_in_cmdlines: list[str] = []
    stop = threading.Event()

    def scan() -> None:
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        data = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                    except OSError:
                        continue
                    if any(v in data for v in _variants(canary)):
                        seen_in_cmdlines.append(pid)
            time.sleep(0.02)

    t = threading.Thread(target=scan, daemon=True)
    t.start()
    try:
        res, text = sandboxed("""
            import os, stat, time
            p = os.environ['DB_PASSWORD_FILE']
            st = os.stat(p)
            print('PATH', p, oct(stat.S_IMODE(st.st_mode)), st.st_uid)
            print('DIRMODE', oct(stat.S_IMODE(os.stat(os.path.dirname(p)).st_mode)))
            import hashlib
            print('SHA', hashlib.sha256(open(p, 'rb').read()).hexdigest())
            print('MOUNT', [l.split()[2] for l in open('/proc/mounts') if '/run/stepguard' in l])
            time.sleep(0.5)
        """, secret_files={"DB_PASSWORD_FILE": canary.encode()})
    finally:
        stop.set()
        t.join()
    assert res.exit_code == 0, text
    assert "PATH /run/stepguard/secrets/DB_PASSWORD_FILE 0o400 65534" in text
    import hashlib
    assert "DIRMODE 0o700" in text
    assert f"SHA {hashlib.sha256(canary.encode()).hexdigest()}" in text
    assert "MOUNT ['tmpfs']" in text
    assert seen_in_cmdlines == []
    for v in _variants(canary):
        assert v not in text and v not in repr(res)


def test_secret_files_in_process_mode_are_removed_afterwards() -> None:
    res, text = sandboxed("""
        import os, stat
        p = os.environ['TOKEN_FILE']
        print(p, oct(stat.S_IMODE(os.stat(p).st_mode)), open(p).read())
    """, spec=PROCESS, secret_files={"TOKEN_FILE": b"s3cr3t"})
    path, mode, value = text.split()
    assert (mode, value) == ("0o400", "s3cr3t")
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))


def test_stdout_and_stderr_capture_to_files(tmp_path: Path) -> None:
    out, err = tmp_path / "o.log", tmp_path / "e.log"
    res = run_isolated(["sh", "-c", "echo to-out; echo to-err >&2"], SANDBOX, stdout=out,
                       stderr=err, deadline_s=10)
    assert res.stdout_path == str(out) and out.read_text() == "to-out\n"
    assert err.read_text() == "to-err\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_network_allowlist_is_refused_locally_and_host_network_is_explicit() -> None:
    with pytest.raises(ConfigurationError, match="cannot filter egress"):
        run_isolated(["true"], IsolationSpec(mode="sandbox", network=("10.0.0.1:443",)),
                     deadline_s=5)
    with pytest.warns(UserWarning, match="unsafe_host_network"):
        res = run_isolated(["true"], IsolationSpec(mode="sandbox", unsafe_host_network=True),
                           deadline_s=5)
    assert res.network == "host"


@pytest.mark.parametrize("binds", [
    {"/etc": "/etc"}, {"/": "/host"}, {"relative": "/x"}, {"/usr": "/proc/x"}, {"/usr": "x/y"},
])
def test_unsafe_binds_are_refused(binds: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError):
        run_isolated(["true"], SANDBOX, ro_binds=binds, deadline_s=5)


def test_bwrap_missing_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(IsolationError) as info:
        find_bwrap(str(tmp_path))
    assert info.value.hint and "apt-get install bubblewrap" in info.value.hint
    assert find_bwrap().endswith("bwrap")


def test_secret_values_never_reach_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        run_isolated(["true"], SANDBOX, env={"BAD NAME": "hunter2-canary"}, deadline_s=5)
    assert "hunter2-canary" not in info.value.diagnostics()
    with pytest.raises(ConfigurationError) as info:
        run_isolated(["true"], SANDBOX, env={"OK": "hunter2\0canary"}, deadline_s=5)
    assert "hunter2" not in info.value.diagnostics()


def test_a_mount_that_cannot_be_made_fails_the_run_with_bwraps_message(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    d = tmp_path / "d"
    d.mkdir()
    err = tmp_path / "err"
    # /in is a file, so bwrap cannot create the mount point /in/sub: the body never runs.
    res = run_isolated(["sh", "-c", "echo RAN"], SANDBOX, ro_binds={str(f): "/in"},
                       rw_binds={str(d): "/in/sub"}, deadline_s=10, stderr=err, stdout=err)
    assert res.exit_code != 0
    text = err.read_text()
    assert "bwrap" in text and "RAN" not in text


def test_importing_isolation_stays_light() -> None:
    code = ("import sys, stepguard.isolation; "
            "print(sorted(m for m in ('kubernetes', 'kubernetes_validate', 'jsonschema') "
            "if m in sys.modules))")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_process_mode_environment_is_exactly_what_was_given(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOST_CANARY", "host-env-canary-4712")
    res, text = sandboxed("import os, json; print(json.dumps(dict(os.environ)))", spec=PROCESS,
                          env={"ONLY": "this"})
    import json
    env = json.loads(text)
    assert set(env) - {"LC_CTYPE"} == {"ONLY", "PATH"}, env
    assert res.network == "host"


def test_optional_gpu_request_without_a_gpu_runs_without_devices() -> None:
    if os.path.exists("/dev/nvidia0"):
        pytest.skip("this machine has a GPU; see test_gpu.py")
    with pytest.warns(UserWarning, match="gpus_optional"):
        res, text = sandboxed("import glob; print(glob.glob('/dev/nvidia*'))",
                              spec=IsolationSpec(mode="sandbox", gpus=1, gpus_optional=True))
    assert res.exit_code == 0 and text.strip() == "[]" and not res.gpus_visible


def test_no_time_left_is_a_timeout_not_a_configuration_error() -> None:
    with pytest.raises(StepTimeout, match="before the body could start"):
        run_isolated(["true"], SANDBOX, deadline_s=0)


SYSCALLS = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
for name, nr, args in (('keyctl', 250, (0, -3, 0)), ('ptrace', 101, (0, 0, 0, 0)),
                       ('io_uring_setup', 425, (1, 0)), ('bpf', 321, (0, 0, 0)),
                       ('userfaultfd', 323, (0,)), ('perf_event_open', 298, (0, 0, -1, -1, 0))):
    r = libc.syscall(nr, *args)
    print(name, 'EPERM' if r == -1 and ctypes.get_errno() == 1 else 'other')
print('Seccomp', [l.split()[1] for l in open('/proc/self/status') if l.startswith('Seccomp:')][0])
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the deny-list is for x86-64")
def test_seccomp_denies_kernel_attack_surface() -> None:
    # Control: outside the sandbox, keyctl and ptrace(TRACEME) work here.
    _, host = sandboxed(SYSCALLS, spec=PROCESS)
    assert "keyctl other" in host and "ptrace other" in host
    res, text = sandboxed(SYSCALLS)
    assert res.exit_code == 0, text
    assert "seccomp:deny-list" in res.limits
    for name in ("keyctl", "ptrace", "io_uring_setup", "bpf", "userfaultfd", "perf_event_open"):
        assert f"{name} EPERM" in text, text
    assert "Seccomp 2" in text
