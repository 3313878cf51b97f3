"""A real container runtime for the pod path: podman, with its state kept under one cache folder.

No Kubernetes API server runs in CI, but pods can: Debian's ``podman`` runs Kubernetes Pod and
ConfigMap manifests with ``podman kube play``. This module gives the tests, the cluster harness
and the pod benchmark

* :class:`Podman` -- the ``podman`` command with project-local state: ``--root``/``--runroot``
  under :func:`podman_dir` (``$STEPGUARD_PODMAN_DIR``, default ``~/.cache/stepguard/podman``)
  and a ``containers.conf`` of our own through ``CONTAINERS_CONF``, so no system file is
  touched. What it sets, and why (measured on Debian bookworm hosts): ``runtime = "runc"``
  (crun refuses hybrid cgroup mounts), ``cgroup_manager = "cgroupfs"`` (no systemd in a CI
  container), ``default_ulimits`` capped at nofile 20000 / nproc 32768 (podman's defaults exceed
  the hard limits there and every container fails to start), ``events_logger = "file"``.
* :func:`build_base` -- a Debian bookworm ``minbase`` root filesystem made by ``mmdebstrap``
  from Debian's packages (python3 and what the runtime needs), ``podman import``-ed with a
  ``PATH`` (an imported tarball has none). Tagged by a hash of its inputs (suite, mirror, package
  list, this recipe), so a second run reuses it (cold: about a minute).
* :func:`build_image` -- ``components/image/Containerfile`` on top of that base (by digest):
  our wheel and the hash-pinned runtime lock, installed from a wheelhouse downloaded on the
  host. Tagged by a hash of wheel + lock + Containerfile + base digest, so unchanged sources
  reuse the image (cold: about 20 s).
* :func:`unavailable` -- why podman cannot run pods here (``None`` when it can): tests skip
  with that reason and nothing else.

The image reference returned is ``localhost/stepguard-runtime@sha256:<digest>``: what the
``pods.image`` setting holds.

>>> Podman(root=Path("/c")).argv("images")[:5]
['podman', '--root', '/c/storage', '--runroot', '/c/run']
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from stepguard.errors import OperationalError

__all__ = [
    "BASE_PACKAGES",
    "Podman",
    "build_base",
    "build_image",
    "podman_dir",
    "prune",
    "repo_root",
    "unavailable",
]

#: Debian packages of the base root filesystem (python3-venv: the build stage makes the venv
#: with it; the final stage deletes ensurepip and its wheels).
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_REPO = "localhost/stepguard-base"
IMAGE_REPO = "localhost/stepguard-runtime"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_RECIPE = 1  # bump when the way the base is made changes
_CONF = """\
# Written by stepguard.testing.podman: podman for stepguard's tests and cluster harness.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def podman_dir() -> Path:
    """Where podman's storage, run state and config live: ``$STEPGUARD_PODMAN_DIR`` or
    ``~/.cache/stepguard/podman`` (shared by checkouts: images are keyed by content hash)."""
    env = os.environ.get("STEPGUARD_PODMAN_DIR")
    return Path(env) if env else Path.home() / ".cache" / "stepguard" / "podman"


def repo_root() -> Path:
    """The source checkout this module belongs to (it holds ``components/image``)."""
    return Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Podman:
    """``podman`` with state under ``root``; every call goes through :meth:`run`."""

    root: Path

    @classmethod
    def default(cls) -> Podman:
        """Podman state under :func:`podman_dir`, its ``containers.conf`` written if missing."""
        p = cls(podman_dir())
        p.root.mkdir(parents=True, exist_ok=True)
        conf = p.root / "containers.conf"
        if not conf.exists() or conf.read_text() != _CONF:
            conf.write_text(_CONF)
        return p

    def argv(self, *args: str) -> list[str]:
        """The full command line for ``podman ARGS``."""
        return ["podman", "--root", f"{self.root}/storage", "--runroot", f"{self.root}/run",
                "--tmpdir", str(self.root / "tmp"), *args]

    def env(self) -> dict[str, str]:
        """The environment podman runs with (our ``containers.conf``)."""
        env = dict(os.environ)
        env["CONTAINERS_CONF"] = str(self.root / "containers.conf")
        return env

    def run(self, *args: str, input: bytes | None = None, check: bool = True,
            timeout: float = 300.0) -> subprocess.CompletedProcess[bytes]:
        """Run ``podman ARGS``; a failure raises OperationalError with podman's last words."""
        proc = subprocess.run(self.argv(*args), input=input, capture_output=True,
                              env=self.env(), timeout=timeout, check=False)
        if check and proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
            raise OperationalError(f"podman {args[0]} failed (exit {proc.returncode})",
                                   subject=" ".join(args[:3]), details=tail)
        return proc

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        """Start ``podman ARGS`` with stdout piped (log streaming)."""
        return subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=self.env())

    def image_digest(self, ref: str) -> str | None:
        """``sha256:...`` of a local image, or None when there is none."""
        proc = self.run("image", "inspect", "--format", "{{.Digest}}", ref, check=False)
        if proc.returncode != 0:
            return None
        digest = proc.stdout.decode().strip()
        return digest or None


def unavailable(podman: Podman | None = None) -> str | None:
    """Why pods cannot run here, or None. Checks the binaries and starts one tiny container
    from the base image only when ``podman`` is given and the base exists."""
    for tool in ("podman", "runc", "catatonit"):
        if shutil.which(tool) is None and not Path(f"/usr/libexec/podman/{tool}").exists():
            return f"{tool} is not installed (scripts/bootstrap.sh installs it as root)"
    if sys.platform != "linux":
        return "podman pods need Linux"
    p = podman or Podman.default()
    try:
        p.run("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=60)
    except (OperationalError, subprocess.TimeoutExpired, OSError) as exc:
        return f"podman cannot run here: {exc}"
    return None


def _hash(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def build_base(podman: Podman, *, packages: Sequence[str] = BASE_PACKAGES,
               suite: str = SUITE, mirror: str = MIRROR) -> str:
    """The base image by digest (``localhost/stepguard-base@sha256:...``), built if missing."""
    key = _hash(suite.encode(), mirror.encode(), " ".join(sorted(packages)).encode(),
                str(_RECIPE).encode(), _PATH.encode())[:16]
    tag = f"{BASE_REPO}:{key}"
    digest = podman.image_digest(tag)
    if digest is None:
        if shutil.which("mmdebstrap") is None:
            raise OperationalError("mmdebstrap is not installed", subject="mmdebstrap",
                                   hint="apt-get install mmdebstrap (scripts/bootstrap.sh)")
        with tempfile.TemporaryDirectory(dir=podman.root) as tmp:
            tar = Path(tmp) / "rootfs.tar"
            cmd = ["mmdebstrap", "--variant=minbase", "--quiet", "--mode=root",
                   f"--include={','.join(packages)}",
                   "--dpkgopt=path-exclude=/usr/share/doc/*",
                   "--dpkgopt=path-exclude=/usr/share/man/*",
                   "--dpkgopt=path-exclude=/usr/share/locale/*",
                   "--customize-hook=rm -rf $1/var/cache/apt/* $1/var/lib/apt/lists/*",
                   suite, str(tar), mirror]
            proc = subprocess.run(cmd, capture_output=True, timeout=900, check=False)
            if proc.returncode != 0:
                tail = proc.stderr.decode(errors="replace").strip().splitlines()[-5:]
                raise OperationalError("mmdebstrap could not build the base root filesystem",
                                       subject=suite, details=tail)
            podman.run("import", "--change", f"ENV PATH={_PATH}", "--change", "CMD []",
                       str(tar), tag, timeout=600)
        digest = podman.image_digest(tag)
        if digest is None:
            raise OperationalError("the imported base image has no digest", subject=tag)
    return f"{BASE_REPO}@{digest}"


def _build_wheel(root: Path, out: Path) -> Path:
    """Our wheel, built from a clean copy of the sources (no ``build/`` left in the checkout,
    no stray files in the wheel) with fixed timestamps, so the same sources hash the same."""
    src = out / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (root / name).exists():
            shutil.copy(root / name, src / name)
    for name in ("sdk", "plugins", "components"):
        shutil.copytree(root / name, src / name, ignore=skip)
    env = dict(os.environ, SOURCE_DATE_EPOCH="315532800")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(src)], capture_output=True, env=env, timeout=600, check=False)
    wheels = sorted(out.glob("stepguard-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise OperationalError("could not build the stepguard wheel", subject=str(root),
                               details=tail)
    return wheels[0]


def _wheelhouse(lock: Path, cache: Path) -> Path:
    """The lock's wheels, downloaded once per lock content (hash-checked by pip)."""
    house = cache / f"wheelhouse-{_hash(lock.read_bytes())[:16]}"
    if (house / ".complete").exists():
        return house
    house.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--require-hashes", "--no-deps",
         "--only-binary=:all:", "--python-version", "3.11", "--platform",
         "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
         "--platform", "manylinux2014_x86_64", "-r", str(lock), "-d", str(house)],
        capture_output=True, timeout=900, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise OperationalError("could not download the image's locked wheels",
                               subject=str(lock), details=tail)
    (house / ".complete").write_text("ok\n")
    return house


@contextlib.contextmanager
def _context(root: Path, wheel: Path, house: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="sg-image-") as tmp:
        ctx = Path(tmp)
        shutil.copy(root / "components/image/Containerfile", ctx / "Containerfile")
        shutil.copy(root / "components/image/requirements.lock", ctx / "requirements.lock")
        (ctx / "dist").mkdir()
        shutil.copy(wheel, ctx / "dist" / wheel.name)
        shutil.copytree(house, ctx / "wheelhouse", ignore=shutil.ignore_patterns(".complete"))
        yield ctx


def build_image(podman: Podman | None = None, *, root: Path | None = None,
                base: str | None = None) -> str:
    """The stepguard runtime image by digest (``localhost/stepguard-runtime@sha256:...``).

    Builds the base (:func:`build_base`) unless ``base`` names one, our wheel, and the image;
    each is reused while its inputs' hash is unchanged.
    """
    podman = podman or Podman.default()
    root = root or repo_root()
    base = base or build_base(podman)
    lock = root / "components/image/requirements.lock"
    containerfile = root / "components/image/Containerfile"
    with tempfile.TemporaryDirectory(prefix="sg-wheel-") as tmp:
        wheel = _build_wheel(root, Path(tmp))
        key = _hash(wheel.read_bytes(), lock.read_bytes(), containerfile.read_bytes(),
                    base.encode())[:16]
        tag = f"{IMAGE_REPO}:{key}"
        digest = podman.image_digest(tag)
        if digest is None:
            house = _wheelhouse(lock, podman.root)
            with _context(root, wheel, house) as ctx:
                podman.run("build", "--quiet", "--layers", "--pull=never", "--network=none",
                           "--build-arg", f"BASE_IMAGE={base}", "-f", str(ctx / "Containerfile"),
                           "-t", tag, str(ctx), timeout=900)
            digest = podman.image_digest(tag)
            if digest is None:
                raise OperationalError("the built image has no digest", subject=tag)
            prune(podman)
    return f"{IMAGE_REPO}@{digest}"


def prune(podman: Podman, *, keep: int = 4) -> None:
    """Drop the build stages and all but the ``keep`` newest runtime images (every source
    change makes a new one; checkouts sharing the cache rebuild theirs in seconds). An image a
    container still uses stays."""
    podman.run("image", "prune", "--force", check=False, timeout=300)
    listed = podman.run("images", "--filter", f"reference={IMAGE_REPO}", "--format",
                        "{{.ID}}", check=False).stdout.decode().split()
    old = list(dict.fromkeys(listed))[keep:]  # newest first
    if old:
        podman.run("rmi", *old, check=False, timeout=300)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stepguard.testing.podman``: build (or reuse) the image, print its reference."""
    del argv
    print(build_image())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
