"""KFP components in real containers: ``kfp.local.DockerRunner`` on podman's Docker API.

``kfp.local`` runs each task of a pipeline in a container of the task's image when initialised
with ``DockerRunner``. Here the Docker API is podman's (``podman system service``) with the
project-local state of :class:`stepguard.testing.podman.Podman`, and the image is the stepguard
runtime image (:func:`stepguard.testing.podman.build_image`), so a component runs from the very
image a cluster pulls:

* :func:`docker_api` -- ``podman system service --time=0 unix://SOCKET`` for a block; yields the
  ``DOCKER_HOST`` value (and sets it for the block).
* :func:`container_runner` -- the ``DockerRunner`` for our image: the image's entrypoint (the
  step runner) replaced by ``env`` so KFP's own command runs, as it does on a cluster (there
  ``command`` overrides the entrypoint; Docker's ``command`` only replaces ``CMD``); read-only
  root with ``/tmp`` and ``HOME`` as tmpfs (the pod's emptyDirs); no network unless asked;
  the variables a KFP driver sets, so the component takes the container for its pod.
* :func:`real_exit_codes` -- kfp 2.16's ``DockerRunner`` removes containers automatically and,
  when the container is gone before it asks for the exit status (podman removes it at once),
  *assumes success*. A secured step refused with exit 3 (tampered data) was reported as
  SUCCESS. Inside this block the container is kept until its status is read, then removed.

Every component runs: the Python-function components (``verify_dataset``, ``secure_train``,
``sign_and_publish``, ``verify_model``) start with KFP's executor (``python3 -m
kfp.dsl.executor_main``), which the runtime image's lock installs; the container component
``secure_train_container`` (``python3 -m stepguard_kfp.train``) needs only stepguard. The example
pipeline's ``run_local(..., containers=True)`` (``dags_examples/kfp_secure_training.py``) puts
the four together.

>>> env = kfp_pod_env("train")
>>> sorted(env)
['KFP_POD_NAME', 'KFP_POD_UID', 'KUBERNETES_SERVICE_HOST']
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from stepguard.errors import ServiceError
from stepguard.testing.podman import Podman

__all__ = ["container_runner", "docker_api", "kfp_pod_env", "real_exit_codes"]

_HOME = "/home/stepguard"


def kfp_pod_env(name: str) -> dict[str, str]:
    """The variables a KFP driver sets in a task's pod (the runtime's "in a KFP pod" test)."""
    return {"KFP_POD_NAME": f"{name}-{uuid.uuid4().hex[:6]}", "KFP_POD_UID": str(uuid.uuid4()),
            "KUBERNETES_SERVICE_HOST": "10.0.0.1"}


@contextlib.contextmanager
def docker_api(podman: Podman | None = None, *, timeout_s: float = 30.0) -> Iterator[str]:
    """Serve podman's Docker-compatible API on a private socket for the block."""
    podman = podman or Podman.default()
    with tempfile.TemporaryDirectory(prefix="sg-docker-") as tmp:
        sock = Path(tmp) / "podman.sock"
        url = f"unix://{sock}"
        proc = subprocess.Popen(
            podman.argv("system", "service", "--time=0", url), env=podman.env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        previous = os.environ.get("DOCKER_HOST")
        try:
            end = time.monotonic() + timeout_s
            while not sock.exists():
                if proc.poll() is not None or time.monotonic() > end:
                    err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")
                    raise ServiceError("podman's Docker API did not start", subject=url,
                                       details=err.strip().splitlines()[-3:])
                time.sleep(0.05)
            os.environ["DOCKER_HOST"] = url
            yield url
        finally:
            if previous is None:
                os.environ.pop("DOCKER_HOST", None)
            else:
                os.environ["DOCKER_HOST"] = previous
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def container_runner(*, env: Mapping[str, str] | None = None, network: str = "none",
                     name: str = "task") -> Any:
    """A ``kfp.local.DockerRunner`` for the stepguard runtime image (see module docs).

    ``network`` is Docker's ``network_mode``: ``none`` (default) or ``host`` to reach a dev
    stack on loopback. ``env`` adds variables (settings, OTLP, object store endpoints).
    """
    from kfp import local

    environment = {**kfp_pod_env(name), **(env or {})}
    return local.DockerRunner(
        entrypoint=["/usr/bin/env"], environment=environment, network_mode=network,
        read_only=True,
        tmpfs={"/tmp": "size=512m,mode=1777",  # noqa: S108 -- the container's own tmpfs
               _HOME: "size=64m,mode=1777"},
        cap_drop=["ALL"], security_opt=["no-new-privileges"])


@contextlib.contextmanager
def real_exit_codes() -> Iterator[None]:
    """Within the block, DockerRunner reports the container's real exit status."""
    import kfp.local.docker_task_handler as handler

    original = handler.run_docker_container

    def run(client: Any, image: str, command: list[str], volumes: dict[str, Any],
            **run_args: Any) -> int:
        image = handler.add_latest_tag_if_not_present(image=image)
        container = client.containers.run(image=image, command=command, detach=True,
                                          stdout=True, stderr=True, volumes=volumes,
                                          auto_remove=False, **run_args)
        try:
            for line in container.logs(stream=True, follow=True):
                print(line.decode(errors="replace"), end="")
            code = int(container.wait()["StatusCode"])
            print(f"stepguard: container exit status {code}")
            return code
        finally:
            with contextlib.suppress(Exception):
                container.remove(force=True)

    handler.run_docker_container = run
    try:
        yield
    finally:
        handler.run_docker_container = original
