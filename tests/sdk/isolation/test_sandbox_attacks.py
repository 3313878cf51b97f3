"""Red-team findings against the bubblewrap sandbox, performed for real.

Each test is the attack as an attacker with a malicious body would run it: a set-id binary planted
in the output, special files, reading a root-only file through ``read_only_paths``, filling the
unsized tmpfs mounts, a 2 GiB allocation with no memory limit given, a new user namespace.
Findings 1 and 2 need a root worker (CI runs as root); they skip elsewhere.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stepguard.errors import IntegrityError
from stepguard.isolation import RunResult, run_isolated
from stepguard.spec import IsolationSpec

pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed"),
]
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the attack needs a root worker")
PY = sys.executable


def run(script: str, tmp_path: Path, spec: IsolationSpec | None = None,
        out: Path | None = None) -> tuple[RunResult, str]:
    log = tmp_path / f"log-{len(list(tmp_path.iterdir()))}"
    res = run_isolated([PY, "-c", textwrap.dedent(script)], spec or IsolationSpec(),
                       rw_binds={str(out): "/out"} if out else None, deadline_s=60,
                       stdout=log, stderr=subprocess.STDOUT)
    return res, log.read_text()


@as_root
def test_a_setuid_binary_planted_in_the_output_never_leaves_the_sandbox(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    python3 = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else os.path.realpath(PY)
    with pytest.raises(IntegrityError) as caught:
        run(f"""
            import os, shutil
            shutil.copy({python3!r}, '/out/python3')
            os.chmod('/out/python3', 0o6755)
            os.mkdir('/out/sub'); os.mkfifo('/out/sub/pipe')
            print('PLANTED', oct(os.stat('/out/python3').st_mode))
        """, tmp_path, out=out)
    err = caught.value
    assert err.subject == f"{out}/python3"
    assert any("sub/pipe: special file" in d for d in err.details)
    planted = out / "python3"
    st = planted.lstat()
    # No set-id bit, and owned by the caller again: nothing for a local user to run as root.
    assert stat.S_IMODE(st.st_mode) & (stat.S_ISUID | stat.S_ISGID) == 0, oct(st.st_mode)
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
    assert not (out / "sub" / "pipe").exists()
    assert err.result.exit_code == 0  # type: ignore[attr-defined]


def test_output_bind_is_nosuid_and_nodev_inside(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    res, text = run("""
        for line in open('/proc/self/mountinfo'):
            f = line.split()
            if f[4] == '/out':
                print('OPTS', f[5])
    """, tmp_path, out=out)
    assert res.exit_code == 0, text
    opts = text.split("OPTS ", 1)[1].split()[0].split(",")
    assert "nosuid" in opts and "nodev" in opts, opts


@as_root
def test_the_body_has_no_owner_rights_of_a_root_worker(tmp_path: Path) -> None:
    secret_dir = tmp_path / "root-only"
    secret_dir.mkdir(mode=0o700)
    secret = secret_dir / "key.pem"
    secret.write_text("ROOT-ONLY-CANARY\n")
    os.chmod(secret, 0o600)
    os.chmod(secret_dir, 0o700)
    spec = IsolationSpec(read_only_paths=(str(secret_dir),))
    out = tmp_path / "out"
    out.mkdir()
    res, text = run(f"""
        import os
        print('UIDMAP', open('/proc/self/uid_map').read().split())
        try:
            print('READ', open({str(secret)!r}).read())
        except OSError as e:
            print('DENIED', e.errno)
        open('/out/made', 'w').write('x')
        print('OWNER', os.stat('/out/made').st_uid)
    """, tmp_path, spec=spec, out=out)
    assert res.exit_code == 0, text
    assert "ROOT-ONLY-CANARY" not in text and "DENIED 13" in text, text
    # The sandbox uid is the same unprivileged uid on the host, not root (root maps to root
    # only for bwrap's setup, which ends before the body starts).
    assert "UIDMAP ['0', '0', '1', '65534', '65534', '1']" in text, text
    assert any(a == "uid:host=65534" for a in res.limits), res.limits
    # What the body made is handed back to the caller afterwards.
    assert (out / "made").stat().st_uid == os.geteuid()


def test_every_tmpfs_is_sized(tmp_path: Path) -> None:
    spec = IsolationSpec(scratch_size="8Mi")
    res, text = run("""
        import os
        for d in ('/tmp', os.environ['HOME'], '/dev/shm', '/dev'):
            try:
                with open(os.path.join(d, 'fill'), 'wb') as fh:
                    for _ in range(16):
                        fh.write(b'\\0' * (1 << 20))
                        fh.flush(); os.fsync(fh.fileno())
                print('FILLED', d)
            except OSError as e:
                print('STOPPED', d, e.errno)
    """, tmp_path, spec=spec)
    assert res.exit_code == 0, text
    assert "FILLED" not in text, text
    for d in ("/tmp", "/home/stepguard", "/dev/shm"):
        assert f"STOPPED {d} 28" in text, text  # ENOSPC: the size applies
    assert "STOPPED /dev 30" in text or "STOPPED /dev 13" in text, text  # read-only, or not ours


def test_a_2gib_allocation_fails_with_no_memory_limit_given(tmp_path: Path) -> None:
    res, text = run("""
        block = b'\\1' * (2 * 1024 ** 3)
        print('ALLOCATED', len(block))
    """, tmp_path)
    assert any("memory" in lim or "RLIMIT_AS" in lim for lim in res.limits), res.limits
    assert res.exit_code != 0 and "ALLOCATED" not in text, text


def test_no_new_user_namespace_even_through_raw_clone(tmp_path: Path) -> None:
    res, text = run("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        r = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)  # clone(CLONE_NEWUSER | SIGCHLD)
        if r == 0:
            os._exit(0)
        if r > 0:
            os.waitpid(r, 0)
        print('CLONE', r, ctypes.get_errno())
    """, tmp_path)
    assert res.exit_code == 0, text
    assert "CLONE -1 1" in text, text  # EPERM
