"""The Kubernetes API seam of :mod:`stepguard.isolation` served by podman: our pods, really run.

:class:`PodmanKube` implements the calls documented in ``stepguard/isolation/_kube.py`` (pod,
ConfigMap, NetworkPolicy; create, read, logs, delete) by running the *exact* Pod and ConfigMap
manifests our code builds with ``podman kube play``. What a kubelet and an API server would add
is done here at the contract level, and said so:

* **NetworkPolicies are recorded, not enforced by a CNI.** A pod selected by a policy whose
  egress allows nothing runs with ``--network none``; any other pod runs with ``--network
  host`` so it reaches the dev stack on loopback (test traffic stays on 127.0.0.1). The policy
  bodies are kept in :attr:`PodmanKube.policies` for the tests to assert on.
* **Projected service-account tokens** (``serviceAccountToken`` sources) are minted by
  ``token_issuer`` -- the tests pass one that signs with the dev OpenBao's trusted JWT key --
  written 0400 for the pod's uid into a private directory and mounted there read-only (a
  ``hostPath`` in the played copy only; the manifest we built is recorded unchanged).
* **activeDeadlineSeconds**, which ``kube play`` ignores, is enforced on read: a pod past its
  deadline is killed and reported ``Failed`` / ``DeadlineExceeded``, as a kubelet does.
* ``kube play`` also ignores seccompProfile, runAsNonRoot and emptyDir medium/sizeLimit; the
  validator (:func:`stepguard.isolation.check_pod`) keeps checking those on every manifest.

>>> kube = PodmanKube(Podman(root=Path("/nonexistent")))
>>> kube.api().core is kube.api().core
False
>>> kube.pod_network({"metadata": {"labels": {"stepguard.dev/pod": "p"}}})
'host'
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from stepguard.errors import IsolationError
from stepguard.isolation import KubeApi
from stepguard.testing.podman import Podman

__all__ = ["PodmanKube", "TokenIssuer", "from_environment", "jwt_issuer"]

#: ``(claims) -> JWT``: mints the projected token a kubelet would (audience, expiry, subject).
TokenIssuer = Callable[[Mapping[str, Any]], str]


def _yaml(docs: list[dict[str, Any]]) -> bytes:
    """A YAML stream of JSON documents (podman's YAML parser trips over PyYAML's folded
    long strings; JSON is YAML without folding)."""
    import json

    return "".join(f"---\n{json.dumps(d)}\n" for d in docs).encode()


@dataclass
class _Played:
    manifest: dict[str, Any]
    container: str
    started: float
    deadline_s: float | None
    token_dir: Path | None = None
    killed_by_deadline: bool = False


@dataclass
class PodmanKube:
    """Pods, ConfigMaps and NetworkPolicies through podman; see the module docs.

    ``created`` lists ``(kind, namespace/name)`` in creation order and ``deleted`` likewise,
    so tests can assert that cleanup ran on every path; ``manifests`` keeps every object as it
    was created (deleted ones too), for checks such as "no secret in any manifest".
    """

    podman: Podman
    token_issuer: TokenIssuer | None = None
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    config_maps: dict[str, dict[str, Any]] = field(default_factory=dict)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    created: list[tuple[str, str]] = field(default_factory=list)
    deleted: list[tuple[str, str]] = field(default_factory=list)
    manifests: list[dict[str, Any]] = field(default_factory=list)
    _played: dict[str, _Played] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def api(self) -> KubeApi:
        """The ``KubeApi(core, networking)`` to hand to ``run_pod`` / ``run_isolated``."""
        return KubeApi(core=_Core(self), networking=_Networking(self))

    # -- NetworkPolicy ------------------------------------------------------------------------

    def pod_network(self, pod: Mapping[str, Any]) -> str:
        """``none`` when a recorded policy selecting ``pod`` allows no egress, else ``host``."""
        labels = (pod.get("metadata") or {}).get("labels") or {}
        for policy in self.policies.values():
            sel = policy["spec"]["podSelector"].get("matchLabels", {})
            if sel and all(labels.get(k) == v for k, v in sel.items()) \
                    and "Egress" in policy["spec"].get("policyTypes", []) \
                    and not policy["spec"].get("egress"):
                return "none"
        return "host"

    # -- pods -----------------------------------------------------------------------------------

    def _tokens(self, name: str, ns: str, spec: dict[str, Any]) -> Path | None:
        """Replace projected service-account tokens with files minted by ``token_issuer``."""
        token_dir: Path | None = None
        uid = int((spec.get("securityContext") or {}).get("runAsUser", 65534))
        for vol in spec.get("volumes", []):
            sources = (vol.get("projected") or {}).get("sources", [])
            sat = [s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s]
            if not sat:
                continue
            if self.token_issuer is None:
                raise IsolationError("a projected service-account token needs a token issuer",
                                     subject=f"{ns}/{name}")
            token_dir = Path(tempfile.mkdtemp(prefix=f"sg-sat-{name}-",
                                              dir=self.podman.root))
            for tok in sat:
                now = int(time.time())
                claims = {"aud": tok.get("audience"), "iat": now, "nbf": now,
                          "exp": now + int(tok.get("expirationSeconds", 3600)),
                          "sub": f"system:serviceaccount:{ns}:"
                                 f"{spec.get('serviceAccountName', 'default')}",
                          "kubernetes.io": {"namespace": ns, "pod": {"name": name}}}
                path = token_dir / tok.get("path", "token")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
                with os.fdopen(fd, "w") as fh:
                    fh.write(self.token_issuer(claims))
                os.chown(path, uid, uid)
            os.chown(token_dir, uid, uid)
            os.chmod(token_dir, 0o500)
            vol.pop("projected")
            vol["hostPath"] = {"path": str(token_dir), "type": "Directory"}
        return token_dir

    def create_pod(self, namespace: str, body: dict[str, Any]) -> None:
        import copy

        name = body["metadata"]["name"]
        key = f"{namespace}/{name}"
        self.pods[key] = copy.deepcopy(body)
        self.manifests.append(copy.deepcopy(body))
        played = copy.deepcopy(body)
        spec = played["spec"]
        token_dir = self._tokens(name, namespace, spec)
        docs: list[dict[str, Any]] = []
        for vol in spec.get("volumes", []):
            cm = vol.get("configMap")
            if cm is not None:
                found = self.config_maps.get(f"{namespace}/{cm['name']}")
                if found is None:
                    raise IsolationError("pod mounts a ConfigMap that does not exist",
                                         subject=f"{namespace}/{cm['name']}")
                docs.append(found)
        docs.append(played)
        network = self.pod_network(body)
        try:
            self.podman.run("kube", "play", "--network", network, "--start=true", "-",
                            input=_yaml(docs), timeout=300)
        except Exception:
            if token_dir is not None:
                shutil.rmtree(token_dir, ignore_errors=True)
            raise
        deadline = spec.get("activeDeadlineSeconds")
        with self._lock:
            self._played[key] = _Played(
                manifest=body, container=f"{name}-{spec['containers'][0]['name']}",
                started=time.monotonic(), deadline_s=float(deadline) if deadline else None,
                token_dir=token_dir)
        self.created.append(("Pod", key))

    def read_pod(self, name: str, namespace: str) -> Any:
        key = f"{namespace}/{name}"
        played = self._played.get(key)
        if played is None:
            raise IsolationError("no such pod", subject=key)
        if played.deadline_s is not None and not played.killed_by_deadline \
                and time.monotonic() - played.started > played.deadline_s:
            self.podman.run("pod", "kill", name, check=False)
            played.killed_by_deadline = True
        proc = self.podman.run("container", "inspect", "--format",
                               "{{.State.Status}} {{.State.ExitCode}}", played.container)
        status, _, code = proc.stdout.decode().strip().partition(" ")
        terminated = None
        if status in ("exited", "stopped"):
            phase = "Succeeded" if code == "0" and not played.killed_by_deadline else "Failed"
            terminated = SimpleNamespace(exit_code=int(code or 1))
        elif status in ("created", "configured", "initialized"):
            phase = "Pending"
        else:
            phase = "Running"
        reason = "DeadlineExceeded" if played.killed_by_deadline and terminated else None
        state = SimpleNamespace(terminated=terminated)
        return SimpleNamespace(status=SimpleNamespace(
            phase=phase, reason=reason, container_statuses=[SimpleNamespace(state=state)]))

    def pod_log(self, name: str, namespace: str) -> Any:
        played = self._played.get(f"{namespace}/{name}")
        if played is None:
            raise IsolationError("no such pod", subject=f"{namespace}/{name}")
        return _LogStream(self.podman.popen("logs", "--follow", played.container))

    def delete_pod(self, name: str, namespace: str) -> None:
        key = f"{namespace}/{name}"
        self.podman.run("pod", "rm", "--force", "--time", "0", name, timeout=120)
        with self._lock:
            played = self._played.pop(key, None)
        if played is not None and played.token_dir is not None:
            with contextlib.suppress(OSError):
                os.chmod(played.token_dir, 0o700)
            shutil.rmtree(played.token_dir, ignore_errors=True)
        self.deleted.append(("Pod", key))

    def running(self) -> list[str]:
        """Names of podman pods that exist now (any state) -- for leak checks."""
        proc = self.podman.run("pod", "ps", "--format", "{{.Name}}")
        return [n for n in proc.stdout.decode().split() if n]


class _LogStream:
    """What ``read_namespaced_pod_log(..., _preload_content=False)`` returns: ``stream(amt)``
    and ``release_conn()``."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc

    def stream(self, amt: int) -> Iterator[bytes]:
        out = self._proc.stdout
        assert out is not None
        while chunk := os.read(out.fileno(), amt):
            yield chunk

    def release_conn(self) -> None:
        with contextlib.suppress(OSError):
            self._proc.kill()
        self._proc.wait(timeout=10)
        if self._proc.stdout is not None:
            self._proc.stdout.close()


class _Core:
    def __init__(self, kube: PodmanKube) -> None:
        self._kube = kube

    def create_namespaced_pod(self, namespace: str, body: dict[str, Any]) -> None:
        self._kube.create_pod(namespace, body)

    def read_namespaced_pod(self, name: str, namespace: str) -> Any:
        return self._kube.read_pod(name, namespace)

    def read_namespaced_pod_log(self, name: str, namespace: str, **_: Any) -> Any:
        return self._kube.pod_log(name, namespace)

    def delete_namespaced_pod(self, name: str, namespace: str, **_: Any) -> None:
        self._kube.delete_pod(name, namespace)

    def create_namespaced_config_map(self, namespace: str, body: dict[str, Any]) -> None:
        key = f"{namespace}/{body['metadata']['name']}"
        self._kube.config_maps[key] = body
        self._kube.manifests.append(body)
        self._kube.created.append(("ConfigMap", key))

    def delete_namespaced_config_map(self, name: str, namespace: str, **_: Any) -> None:
        key = f"{namespace}/{name}"
        if self._kube.config_maps.pop(key, None) is None:
            raise IsolationError("no such ConfigMap", subject=key)
        self._kube.deleted.append(("ConfigMap", key))


class _Networking:
    def __init__(self, kube: PodmanKube) -> None:
        self._kube = kube

    def create_namespaced_network_policy(self, namespace: str, body: dict[str, Any]) -> None:
        key = f"{namespace}/{body['metadata']['name']}"
        self._kube.policies[key] = body
        self._kube.manifests.append(body)
        self._kube.created.append(("NetworkPolicy", key))

    def delete_namespaced_network_policy(self, name: str, namespace: str, **_: Any) -> None:
        key = f"{namespace}/{name}"
        if self._kube.policies.pop(key, None) is None:
            raise IsolationError("no such NetworkPolicy", subject=key)
        self._kube.deleted.append(("NetworkPolicy", key))


def jwt_issuer(key_path: str | Path, issuer: str) -> TokenIssuer:
    """A :data:`TokenIssuer` signing ES256 with the PEM key at ``key_path`` as ``issuer`` --
    what a cluster's service-account issuer is to Vault's JWT auth (needs PyJWT: ``[dev]``)."""
    from stepguard.testing import dev_import

    pyjwt = dev_import("jwt")
    key = Path(key_path).read_bytes()

    def issue(claims: Mapping[str, Any]) -> str:
        token: str = pyjwt.encode({**claims, "iss": issuer}, key, algorithm="ES256")
        return token

    return issue


def from_environment() -> KubeApi:
    """The factory for ``STEPGUARD_KUBE_API=stepguard.testing.kubeplay:from_environment``:
    podman under :func:`~stepguard.testing.podman.podman_dir`; projected tokens signed with
    ``$STEPGUARD_POD_JWT_KEY`` as ``$STEPGUARD_POD_JWT_ISSUER`` when both are set."""
    key = os.environ.get("STEPGUARD_POD_JWT_KEY")
    issuer = os.environ.get("STEPGUARD_POD_JWT_ISSUER")
    issue = jwt_issuer(key, issuer) if key and issuer else None
    return PodmanKube(Podman.default(), token_issuer=issue).api()
