"""The bubblewrap command line for one sandboxed body.

Everything the body can see is listed here. The root is an empty tmpfs made read-only at the end;
the host appears only through the read-only system binds, the Python installation, the caller's
binds, and -- when GPUs are requested and present -- the NVIDIA device nodes and driver libraries.
Home directories, ``/root``, ``/run/secrets``, Vault token files, cloud credential files and the
host environment are never bound: they do not exist inside.

Who the body is on the host. bubblewrap maps the sandbox uid onto the uid that started it, so a
root worker would give its body root's owner rights on every bound file. When we run as root the
user namespace is mapped by us instead (``--userns-block-fd``): host root stays root for the setup
only, and the body is switched by ``setpriv`` to ``spec.uid`` *on the host as well* (default 65534,
``nobody``), with no capabilities and no way back. When we are not root the kernel only lets the
namespace map our own uid, so the body keeps the caller's rights on what is bound (and nothing
else is bound); set-id bits and special files are still stripped from outputs afterwards.

Every tmpfs has a size: ``/tmp``, the home directory and ``/dev/shm`` get ``scratch_size`` each,
the secrets tmpfs a size fitted to its files; ``/dev`` and the root are remounted read-only.

Pinned inputs (``ro_bind_fds``) are bound from the open descriptor the caller verified through,
then re-checked by identity (device and inode) inside the finished sandbox before the body starts.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from stepguard._private.fileio import write_all
from stepguard.errors import ConfigurationError, IsolationError

SANDBOX_HOME = "/home/stepguard"
SECRETS_DIR = "/run/stepguard/secrets"

# Only what dynamic linking, name-service lookups of our synthetic user, time zones and TLS
# roots need. Never /etc/shadow, /etc/resolv.conf (no network), /etc/hosts of the host.
_ETC = (
    "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives",
    "/etc/localtime", "/etc/nsswitch.conf", "/etc/ssl", "/etc/ca-certificates",
    "/etc/pki", "/etc/mime.types", "/etc/protocols", "/etc/services",
)
_SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_NVIDIA_CONTROL = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")
# Driver libraries only (libcuda, libnvidia-*); the CUDA runtime (libcudart) ships with apps.
_NVIDIA_LIB = re.compile(r"^lib(cuda\.so|nvidia-)")
_SEARCH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NVIDIA_BINARIES = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced",
                    "nvidia-cuda-mps-control", "nvidia-cuda-mps-server")
# Mounting over these would hide the sandbox's own plumbing.
_RESERVED = ("/proc", "/dev", "/usr", "/etc", "/run/stepguard")
# Exit status of the identity check of pinned binds (before the body starts).
PIN_MISMATCH_STATUS = 125
# Runs inside the finished sandbox before the body, only when needed: hand the secrets tmpfs to
# the body's uid (root-made sandboxes), then check each pinned bind "PATH DEV:INO", then exec.
_PRELUDE = (
    'while [ "$1" = --own ]; do chown -R "$2" "$3" || exit 126; shift 3; done; '
    'while [ "$1" != -- ]; do '
    'if [ "$(stat -L -c %d:%i -- "$1")" != "$2" ]; then '
    'echo "stepguard: $1 is not the directory that was verified" >&2; exit 125; fi; '
    "shift 2; done; shift; exec \"$@\""
)


def find_bwrap(search_path: str | None = None) -> str:
    """Path of the bubblewrap binary, or IsolationError saying how to install it.

    ``search_path`` (a PATH-style list) defaults to ``$PATH`` plus ``/usr/bin``.

    >>> find_bwrap("/nonexistent")
    Traceback (most recent call last):
    ...
    stepguard.errors.IsolationError: bubblewrap is not installed; the sandbox cannot start: bwrap
    """
    if search_path is None:
        search_path = os.pathsep.join(filter(None, [os.environ.get("PATH"), "/usr/bin"]))
    path = shutil.which("bwrap", path=search_path)
    if path is None:
        raise IsolationError(
            "bubblewrap is not installed; the sandbox cannot start",
            subject="bwrap",
            hint="apt-get install bubblewrap (Debian/Ubuntu) or dnf install bubblewrap (Fedora)",
        )
    return path


def check_sandbox_path(path: str, *, subject: str) -> str:
    """A clean absolute path inside the sandbox, not on top of its plumbing."""
    p = PurePosixPath(path)
    if not p.is_absolute() or ".." in p.parts:
        raise ConfigurationError("sandbox paths must be absolute, without '..'", subject=subject)
    clean = str(p)
    if clean == "/" or any(clean == r or clean.startswith(r + "/") for r in _RESERVED):
        raise ConfigurationError("sandbox path would cover the sandbox's system directories",
                                 subject=subject)
    return clean


def check_host_path(path: str, *, subject: str) -> str:
    """The resolved host path of a bind source (refusing the host root)."""
    if not os.path.isabs(path):
        raise ConfigurationError("host paths must be absolute", subject=subject)
    real = os.path.realpath(path)
    if real == "/":
        raise ConfigurationError("refusing to bind the host root", subject=subject)
    if not os.path.exists(real):
        raise ConfigurationError("bind source does not exist", subject=subject)
    return real


def python_prefixes() -> list[str]:
    """The directories a Python body needs: the venv and the real installation behind it.

    Bound exactly (e.g. ``/root/.pyenv/versions/3.11.7``), never a parent such as ``/root``.
    """
    exe_root = os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))
    found: list[str] = []
    for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, exe_root):
        real = os.path.realpath(p)
        if real in ("/", "/usr") or real.startswith("/usr/") or real in found:
            continue
        found.append(real)
    # Venv layouts point bin/python at the base installation through a symlink; keep both sides.
    if os.path.realpath(sys.prefix) != os.path.abspath(sys.prefix):
        found.append(os.path.abspath(sys.prefix))
    return sorted(set(found))


@functools.lru_cache(maxsize=1)
def _nvidia_libraries() -> list[str]:
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    libs: set[str] = set()
    for line in out.splitlines():
        if "=>" not in line:
            continue
        name, _, target = line.partition("=>")
        if _NVIDIA_LIB.search(name.strip().split(" ")[0]):
            path = target.strip()
            libs.add(path)
            libs.add(os.path.realpath(path))
    return sorted(p for p in libs if os.path.exists(p))


@functools.lru_cache(maxsize=1)
def _nvidia_binaries() -> list[str]:
    found = set()
    for name in _NVIDIA_BINARIES:
        path = shutil.which(name, path=_SEARCH)
        if path:
            found.add(path)
            found.add(os.path.realpath(path))
    return sorted(found)


def gpu_device_nodes(gpus: int) -> list[str]:
    """The control nodes plus the first ``gpus`` numbered GPU nodes (empty without a driver)."""
    numbered = sorted(
        (p for p in glob.glob("/dev/nvidia[0-9]*") if re.fullmatch(r"/dev/nvidia\d+", p)),
        key=lambda p: int(p[len("/dev/nvidia"):]),
    )
    if not numbered:
        return []
    nodes = [f"/dev/{n}" for n in _NVIDIA_CONTROL if os.path.exists(f"/dev/{n}")]
    nodes += numbered[:gpus]
    if os.path.isdir("/dev/nvidia-caps"):
        nodes.append("/dev/nvidia-caps")
    if os.path.isdir("/dev/dri"):
        nodes.append("/dev/dri")
    return nodes


def _covered(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


@dataclass
class BwrapPlan:
    """The argv plus the file descriptors bwrap must inherit (synthetic files, secrets)."""

    argv: list[str]
    pass_fds: list[int] = field(default_factory=list)
    gpus_visible: bool = False
    seccomp: bool = False
    # The host uid the body runs as when we map the user namespace ourselves (root only).
    host_uid: int | None = None
    pinned: bool = False


def find_setpriv() -> str:
    """Path of util-linux ``setpriv``, which drops the body to its own host uid."""
    path = shutil.which("setpriv", path=_SEARCH)
    if path is None:
        raise IsolationError(
            "setpriv is not installed; a sandbox started by root cannot drop its body to an "
            "unprivileged uid", subject="setpriv", hint="apt-get install util-linux")
    return path


def _parents(dest: str) -> list[str]:
    parts = PurePosixPath(dest).parents
    return [str(p) for p in reversed(list(parts)) if str(p) != "/"]


def _data_fd(data: bytes) -> int:
    # A memfd holds any size without a writer thread, and never touches a disk.
    fd = os.memfd_create("stepguard", os.MFD_CLOEXEC)
    write_all(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def build_bwrap(
    command: Sequence[str],
    *,
    uid: int,
    ro_binds: Mapping[str, str],
    rw_binds: Mapping[str, str],
    extra_ro: Sequence[str],
    secret_files: Mapping[str, bytes],
    cwd: str | None,
    gpus: int,
    share_net: bool,
    bind_python: bool,
    tmp_size: int | None,
    ro_bind_fds: Mapping[int, str] | None = None,
    drop_privileges: bool | None = None,
) -> BwrapPlan:
    """Assemble the bwrap invocation. The caller closes ``plan.pass_fds`` after spawning;
    if assembling fails, the descriptors opened so far are closed here.

    ``drop_privileges`` (default: we are root) means the caller maps the user namespace itself
    (``plan.host_uid`` set; see the module docstring) and the body is started through setpriv.
    ``ro_bind_fds`` (descriptor -> sandbox path) are bound by descriptor and re-checked by identity.
    The caller keeps ownership of those descriptors (they are passed, not closed here).
    """
    if drop_privileges is None:
        drop_privileges = os.geteuid() == 0
    plan = BwrapPlan([find_bwrap()])
    try:
        a = plan.argv.extend
        if drop_privileges:
            setpriv = find_setpriv()
            plan.host_uid = uid
            # No --disable-userns here (bwrap refuses it with a caller-made map); the seccomp
            # filter denies unshare(2)/clone(CLONE_NEWUSER) instead. CHOWN is kept for the
            # prelude (secrets become the body's), SETUID/SETGID/SETPCAP for setpriv, which
            # gives them all up with the switch to the body's uid.
            a(["--unshare-all", "--unshare-user", "--unshare-cgroup-try",
               "--uid", "0", "--gid", "0", "--hostname", "stepguard",
               "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
               "--cap-add", "CAP_CHOWN", "--cap-add", "CAP_SETPCAP",
               "--new-session", "--die-with-parent"])
        else:
            a(["--unshare-all", "--unshare-user", "--unshare-cgroup-try", "--disable-userns",
               "--uid", str(uid), "--gid", str(uid), "--hostname", "stepguard",
               "--cap-drop", "ALL", "--new-session", "--die-with-parent"])
        if share_net:
            a(["--share-net"])
        a(["--ro-bind", "/usr", "/usr"])
        for d in _SYSTEM_DIRS:
            if os.path.islink(d):
                a(["--symlink", os.readlink(d), d])
            elif os.path.isdir(d):
                a(["--ro-bind", d, d])
        for e in _ETC:
            if os.path.exists(e):
                a(["--ro-bind", e, e])
        if share_net and os.path.exists("/etc/resolv.conf"):
            a(["--ro-bind", "/etc/resolv.conf", "/etc/resolv.conf"])

        def data(dest: str, content: bytes, perms: str = "0444") -> None:
            fd = _data_fd(content)
            plan.pass_fds.append(fd)
            a(["--perms", perms, "--ro-bind-data", str(fd), dest])

        data("/etc/passwd", (f"root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
                             f"stepguard:x:{uid}:{uid}:stepguard:{SANDBOX_HOME}:/usr/sbin/nologin\n"
                             ).encode())
        data("/etc/group", f"root:x:0:\nstepguard:x:{uid}:\n".encode())
        data("/etc/hosts", b"127.0.0.1 localhost stepguard\n::1 localhost\n")

        a(["--proc", "/proc", "--dev", "/dev"])
        made: set[str] = set()
        host_backed: list[str] = []

        def parents(dest: str) -> None:
            # bwrap copies the host's mode onto the directories it creates above a mount point (a
            # 0700 /root would lock the body out of its own Python); create them 0755 first.
            # Never inside a host-backed bind: that would create directories on the host.
            for parent in _parents(dest):
                if parent in made or _covered(parent, ["/usr", "/dev", *host_backed]):
                    continue
                made.add(parent)
                a(["--dir", parent])

        def bind(flag: str, src: str, dest: str) -> None:
            parents(dest)
            a([flag, src, dest])
            host_backed.append(dest)

        # --size applies to the next tmpfs only: every tmpfs gets its own.
        # A root-started sandbox sets up as root: its body cannot own the home directory without
        # a chown inside (an extra exec on every start), so the home is sticky and
        # world-writable there -- the body's uid is the only unprivileged one inside.
        home_perms = "1777" if drop_privileges else "0700"
        for tmpfs, perms in (("/dev/shm", "1777"), ("/tmp", "1777"),  # noqa: S108 -- private
                             (SANDBOX_HOME, home_perms)):
            parents(tmpfs)
            if tmp_size:
                a(["--size", str(tmp_size)])
            a(["--perms", perms, "--tmpfs", tmpfs])
            made.add(tmpfs)

        if gpus > 0:
            nodes = gpu_device_nodes(gpus)
            for node in nodes:
                a(["--dev-bind", node, node])
            if nodes:
                plan.gpus_visible = True
                for lib in _nvidia_libraries() + _nvidia_binaries():
                    if not _covered(lib, ["/usr"]):
                        a(["--ro-bind", lib, lib])
        else:
            # /usr is bound whole, so driver libraries and tools must be masked, not merely omitted.
            for path in _nvidia_libraries() + _nvidia_binaries():
                if _covered(path, ["/usr"]) and not os.path.islink(path):
                    a(["--ro-bind", "/dev/null", path])

        if bind_python:
            for prefix in python_prefixes():
                bind("--ro-bind", prefix, prefix)
        for path in extra_ro:
            real = check_host_path(path, subject=f"isolation.read_only_paths:{path}")
            bind("--ro-bind", real, check_sandbox_path(path, subject=path))
        for host, inside in ro_binds.items():
            bind("--ro-bind", check_host_path(host, subject=host),
                 check_sandbox_path(inside, subject=inside))
        pins: list[str] = []
        for fd, inside in (ro_bind_fds or {}).items():
            st = os.fstat(fd)
            host_root = os.stat("/")
            if (st.st_dev, st.st_ino) == (host_root.st_dev, host_root.st_ino):
                raise ConfigurationError("refusing to bind the host root", subject=inside)
            dest = check_sandbox_path(inside, subject=inside)
            bind("--ro-bind-fd", str(fd), dest)
            pins += [dest, f"{st.st_dev}:{st.st_ino}"]
        for host, inside in rw_binds.items():
            bind("--bind", check_host_path(host, subject=host),
                 check_sandbox_path(inside, subject=inside))

        if secret_files:
            size = max(1 << 20, 2 * sum(map(len, secret_files.values())))
            parents(SECRETS_DIR)
            a(["--perms", "0700", "--size", str(size), "--tmpfs", SECRETS_DIR])
            for name, content in secret_files.items():
                fd = _data_fd(content)
                plan.pass_fds.append(fd)
                a(["--perms", "0400", "--file", str(fd), f"{SECRETS_DIR}/{name}"])

        from stepguard.isolation._seccomp import filter_fd

        sfd = filter_fd()
        if sfd is not None:
            plan.pass_fds.append(sfd)
            plan.seccomp = True
            a(["--seccomp", str(sfd)])

        # Last: the root tmpfs (and the directories bwrap created in it) and /dev (a tmpfs
        # bwrap cannot size; its device nodes keep working) become read-only.
        a(["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", cwd or SANDBOX_HOME, "--"])
        plan.pinned = bool(pins)
        own: list[str] = []
        if drop_privileges and secret_files:
            own = ["--own", f"{uid}:{uid}", SECRETS_DIR]
        if own or pins:
            a(["/bin/sh", "-c", _PRELUDE, "sh", *own, *pins, "--"])
        if drop_privileges:
            a([setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
               "--inh-caps=-all", "--bounding-set=-all", "--"])
        a(list(command))
    except BaseException:
        for fd in plan.pass_fds:
            os.close(fd)
        raise
    return plan
