"""Checking any pod manifest against Pod Security "restricted", our rules and the schema.

Controls follow https://kubernetes.io/docs/concepts/security/pod-security-standards/ : the eleven
baseline controls and the six restricted ones, for every container, init container and
ephemeral container, plus stepguard's own rules. Unknown or misspelled fields are errors: the
manifest is validated in strict mode against the Kubernetes OpenAPI schema, so a misspelled
``capabilites`` is reported instead of silently hardening nothing.

Accepted: a Pod, or a workload with a pod template (Deployment, StatefulSet, DaemonSet,
ReplicaSet, Job, CronJob).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stepguard.errors import ConfigurationError, PolicyViolation
from stepguard.isolation._pod import DIGEST_IMAGE
from stepguard.settings import PLACEHOLDER_DIGEST

_BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                  "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
_SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                 "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                 "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                 "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                 "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"}
_SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t",
                  "container_engine_t"}
_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                 "persistentVolumeClaim", "projected", "secret"}
_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
_CONTAINER_KEYS = ("initContainers", "containers", "ephemeralContainers")
#: Longest lifetime accepted for a projected service-account token (seconds). The API server
#: defaults to 3600 when the field is absent, and may extend tokens of the *API* audience to a
#: year; we only accept tokens for another audience, so an absent field means one hour.
MAX_TOKEN_EXPIRATION_S = 3600
# Audiences the Kubernetes API server accepts by default (``--api-audiences`` falls back to the
# issuer, which is one of these on every mainstream distribution). A token for any of them is a
# token for the API. Compared after lower-casing and stripping a trailing slash.
_API_AUDIENCES = {
    "kubernetes", "kubernetes.default", "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local", "https://kubernetes",
    "https://kubernetes.default", "https://kubernetes.default.svc",
    "https://kubernetes.default.svc.cluster.local", "api", "k3s", "rke2",
    "https://kubernetes.default.svc:443", "https://kubernetes.default.svc.cluster.local:443",
}

#: Every rule :func:`check_pod` knows, with a one-line description.
RULES: dict[str, str] = {
    "schema": "strictly valid against the Kubernetes OpenAPI schema (no unknown fields)",
    "baseline.host-process": "no Windows HostProcess",
    "baseline.host-namespaces": "hostNetwork, hostPID and hostIPC unset or false",
    "baseline.privileged": "no privileged containers",
    "baseline.capabilities": "added capabilities only from the baseline set",
    "baseline.host-path": "no hostPath volumes",
    "baseline.host-ports": "no hostPort",
    "baseline.apparmor": "AppArmor profile RuntimeDefault or Localhost only",
    "baseline.selinux": "SELinux type from the allowed set; no custom user or role",
    "baseline.proc-mount": "procMount Default",
    "baseline.seccomp": "seccomp never Unconfined",
    "baseline.sysctls": "only safe sysctls",
    "restricted.volume-types": "only configMap, csi, downwardAPI, emptyDir, ephemeral, "
                               "persistentVolumeClaim, projected, secret volumes",
    "restricted.privilege-escalation": "allowPrivilegeEscalation false on every container",
    "restricted.run-as-non-root": "runAsNonRoot true (pod or every container), never false",
    "restricted.run-as-user": "runAsUser never 0",
    "restricted.seccomp": "seccomp RuntimeDefault or Localhost set for every container",
    "restricted.capabilities": "drop ALL; add at most NET_BIND_SERVICE",
    "stepguard.image-digest": "every image pinned by @sha256 digest (never the all-zero "
                              "placeholder)",
    "stepguard.sa-token": "automountServiceAccountToken false",
    "stepguard.projected-token": "projected service-account tokens name an audience that is not "
                                 "the API server's, and expire within 3600 s",
    "stepguard.read-only-root": "readOnlyRootFilesystem true on every container",
    "stepguard.limits": "cpu and memory limits on every container",
    "stepguard.deadline": "activeDeadlineSeconds set (Pods and Jobs)",
    "stepguard.restart-policy": "restartPolicy Never (Pods and Jobs)",
    "stepguard.memory-volume": "memory-backed emptyDirs (/dev/shm) have a sizeLimit no larger "
                               "than the memory limit of a container mounting them",
    "stepguard.writable-home": "with a read-only root, HOME (when set) lies on a writable "
                               "volume mount",
}


@dataclass(frozen=True)
class Violation:
    """One broken rule: its id (see ``RULES``), where in the manifest, and what is wrong."""

    rule: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.path}: {self.message}"


def violations_summary(found: Sequence[Violation], what: str = "pod") -> str:
    """One line naming the broken rules, for an error's message (details list every one).

    >>> violations_summary([Violation("stepguard.image-digest", "spec.containers[0].image",
    ...                               "not pinned")])
    'pod violates 1 rule: stepguard.image-digest at spec.containers[0].image (not pinned)'
    >>> violations_summary([Violation(r, "p", "m") for r in "abcde"])
    'pod violates 5 rules: a, b, c, d, +1 more'
    """
    if len(found) == 1:
        v = found[0]
        return f"{what} violates 1 rule: {v.rule} at {v.path} ({v.message})"
    rules = list(dict.fromkeys(v.rule for v in found))
    shown = ", ".join(rules[:4]) + (f", +{len(rules) - 4} more" if len(rules) > 4 else "")
    return f"{what} violates {len(found)} rules: {shown}"


_PodParts = tuple[Mapping[str, Any], Mapping[str, Any], str, bool]


def _pod_spec(manifest: Mapping[str, Any]) -> _PodParts:
    """(pod spec, pod metadata, path prefix, whether the deadline rules apply)."""
    kind = manifest.get("kind")
    spec = manifest.get("spec")
    if not isinstance(spec, Mapping):
        raise ConfigurationError("manifest has no spec", subject=str(kind))
    if kind == "Pod":
        return spec, manifest.get("metadata") or {}, "spec", True
    if kind == "CronJob":
        tmpl = (spec.get("jobTemplate") or {}).get("spec", {}).get("template") or {}
        return tmpl.get("spec") or {}, tmpl.get("metadata") or {}, \
            "spec.jobTemplate.spec.template.spec", True
    if kind in _TEMPLATE_KINDS:
        tmpl = spec.get("template") or {}
        return tmpl.get("spec") or {}, tmpl.get("metadata") or {}, "spec.template.spec", \
            kind == "Job"
    raise ConfigurationError("not a Pod or a workload with a pod template", subject=str(kind))


def _containers(pod: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for key in _CONTAINER_KEYS:
        for i, c in enumerate(pod.get(key) or []):
            if isinstance(c, Mapping):
                yield f"{prefix}.{key}[{i}]", c


def check_schema(manifest: Mapping[str, Any], version: str | None = None) -> list[Violation]:
    """Every Kubernetes schema error of any manifest (``kubernetes_validate``'s strict schemas
    for ``version``, default its latest); no findings means it validates."""
    import kubernetes_validate

    target = version or kubernetes_validate.latest_version()
    try:
        kubernetes_validate.validate(dict(manifest), target, strict=True)
    except kubernetes_validate.ValidationError as exc:
        every = _all_schema_errors(manifest, target)
        if every:
            return every
        where = ".".join(str(p) for p in exc.path) or "(root)"
        return [Violation("schema", where, exc.message)]
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
        return [Violation("schema", "(root)", f"no schema for this object: {exc}")]
    return []


def _all_schema_errors(manifest: Mapping[str, Any], version: str) -> list[Violation]:
    """Every schema error, not just the first (kubernetes_validate stops at one).

    Uses kubernetes_validate's bundled strict schemas with the same resolution it performs; if
    its internals ever change, the caller falls back to the single error it raised.
    """
    try:
        import re

        import jsonschema  # type: ignore[import-untyped]
        from kubernetes_validate import utils
        from referencing import Registry, Resource

        mm = utils.major_minor(version)
        chosen = [v for v in utils.all_versions() if utils.major_minor(v) <= mm][-1]
        api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", str(manifest["apiVersion"]))
        schema_dir = f"v{chosen}-local-strict"
        schema = utils.schema_contents(
            f"kubernetes-json-schema/{schema_dir}/{str(manifest['kind']).lower()}-{api}.json",
            version)
        defs = utils.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json",
                                     version)
        registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
        validator = jsonschema.validators.Draft202012Validator(schema, registry=registry)
        errors = sorted(validator.iter_errors(dict(manifest)), key=lambda e: list(map(str, e.path)))
    except Exception:  # the single error already raised is still reported
        return []
    return [Violation("schema", ".".join(str(p) for p in e.path) or "(root)", e.message)
            for e in errors]


def check_pod(manifest: Mapping[str, Any], *, schema: bool = True,
              kubernetes_version: str | None = None) -> list[Violation]:
    """Every violation of Pod Security "restricted", our rules and (with ``schema``) the schema.

    An empty list means the manifest passes.

    >>> from stepguard.isolation import build_pod, check_pod
    >>> from stepguard.spec import IsolationSpec, RunContext
    >>> pod = build_pod(IsolationSpec(mode="pod", image="r/i@sha256:" + "a" * 64), name="p",
    ...                 command=["true"], env={}, context=RunContext(run_id="r"))
    >>> check_pod(pod, schema=False)
    []
    >>> pod["spec"]["containers"][0]["securityContext"]["privileged"] = True
    >>> [str(v) for v in check_pod(pod, schema=False)]
    ['baseline.privileged: spec.containers[0].securityContext.privileged: privileged container']
    """
    if not isinstance(manifest, Mapping):
        raise ConfigurationError("a manifest is a mapping", subject=type(manifest).__name__)
    out: list[Violation] = []
    if schema:
        out += check_schema(manifest, kubernetes_version)
    pod, meta, prefix, runs_once = _pod_spec(manifest)
    v = out.append
    psc: Mapping[str, Any] = pod.get("securityContext") or {}

    # -- baseline ------------------------------------------------------------------------------
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        v(Violation("baseline.host-process", f"{prefix}.securityContext.windowsOptions",
                    "hostProcess pod"))
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            v(Violation("baseline.host-namespaces", f"{prefix}.{key}", f"{key} is true"))
    for i, vol in enumerate(pod.get("volumes") or []):
        vtypes = [k for k in vol if k != "name"]
        if "hostPath" in vtypes:
            v(Violation("baseline.host-path", f"{prefix}.volumes[{i}]",
                        f"hostPath volume {vol.get('name')!r}"))
        bad = [t for t in vtypes if t not in _VOLUME_TYPES]
        if bad:
            v(Violation("restricted.volume-types", f"{prefix}.volumes[{i}]",
                        f"volume type {', '.join(bad)} not allowed"))
    for i, s in enumerate(psc.get("sysctls") or []):
        if s.get("name") not in _SAFE_SYSCTLS:
            v(Violation("baseline.sysctls", f"{prefix}.securityContext.sysctls[{i}]",
                        f"unsafe sysctl {s.get('name')!r}"))
    annotations = meta.get("annotations") or {}
    for key, value in annotations.items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
                value == "runtime/default" or str(value).startswith("localhost/")):
            v(Violation("baseline.apparmor", f"metadata.annotations.{key}",
                        f"AppArmor profile {value!r}"))

    def apparmor(sc: Mapping[str, Any], where: str) -> None:
        prof = sc.get("appArmorProfile")
        if prof and prof.get("type") not in ("RuntimeDefault", "Localhost"):
            v(Violation("baseline.apparmor", f"{where}.appArmorProfile",
                        f"AppArmor profile {prof.get('type')!r}"))

    def selinux(sc: Mapping[str, Any], where: str) -> None:
        opts = sc.get("seLinuxOptions") or {}
        if opts.get("type", "") not in _SELINUX_TYPES:
            v(Violation("baseline.selinux", f"{where}.seLinuxOptions.type",
                        f"SELinux type {opts.get('type')!r}"))
        for key in ("user", "role"):
            if opts.get(key):
                v(Violation("baseline.selinux", f"{where}.seLinuxOptions.{key}",
                            f"custom SELinux {key}"))

    def seccomp_type(sc: Mapping[str, Any]) -> str | None:
        prof = sc.get("seccompProfile") or {}
        t = prof.get("type")
        return str(t) if t is not None else None

    apparmor(psc, f"{prefix}.securityContext")
    selinux(psc, f"{prefix}.securityContext")
    pod_seccomp = seccomp_type(psc)
    if pod_seccomp == "Unconfined":
        v(Violation("baseline.seccomp", f"{prefix}.securityContext.seccompProfile.type",
                    "seccomp Unconfined"))
    if psc.get("runAsUser") == 0:
        v(Violation("restricted.run-as-user", f"{prefix}.securityContext.runAsUser",
                    "runs as uid 0"))
    pod_nonroot = psc.get("runAsNonRoot")
    if pod_nonroot is False:
        v(Violation("restricted.run-as-non-root", f"{prefix}.securityContext.runAsNonRoot",
                    "runAsNonRoot is false"))

    containers = list(_containers(pod, prefix))
    if not containers:
        v(Violation("schema", f"{prefix}.containers", "no containers"))
    for where, c in containers:
        sc: Mapping[str, Any] = c.get("securityContext") or {}
        sw = f"{where}.securityContext"
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            v(Violation("baseline.host-process", f"{sw}.windowsOptions", "hostProcess container"))
        if sc.get("privileged"):
            v(Violation("baseline.privileged", f"{sw}.privileged", "privileged container"))
        caps = sc.get("capabilities") or {}
        added = [str(x) for x in caps.get("add") or []]
        beyond = [x for x in added if x not in _BASELINE_CAPS]
        if beyond:
            v(Violation("baseline.capabilities", f"{sw}.capabilities.add",
                        f"adds {', '.join(beyond)}"))
        for j, port in enumerate(c.get("ports") or []):
            if port.get("hostPort"):
                v(Violation("baseline.host-ports", f"{where}.ports[{j}].hostPort",
                            f"hostPort {port.get('hostPort')}"))
        apparmor(sc, sw)
        selinux(sc, sw)
        if sc.get("procMount", "Default") != "Default":
            v(Violation("baseline.proc-mount", f"{sw}.procMount",
                        f"procMount {sc.get('procMount')!r}"))
        c_seccomp = seccomp_type(sc)
        if c_seccomp == "Unconfined":
            v(Violation("baseline.seccomp", f"{sw}.seccompProfile.type", "seccomp Unconfined"))
        # -- restricted ----------------------------------------------------------------------
        if sc.get("allowPrivilegeEscalation") is not False:
            v(Violation("restricted.privilege-escalation", f"{sw}.allowPrivilegeEscalation",
                        "must be set to false"))
        c_nonroot = sc.get("runAsNonRoot")
        if c_nonroot is False or (c_nonroot is None and pod_nonroot is not True):
            v(Violation("restricted.run-as-non-root", f"{sw}.runAsNonRoot",
                        "runAsNonRoot must be true (here or on the pod)"))
        if sc.get("runAsUser") == 0:
            v(Violation("restricted.run-as-user", f"{sw}.runAsUser", "runs as uid 0"))
        effective = c_seccomp or pod_seccomp
        if effective not in ("RuntimeDefault", "Localhost"):
            v(Violation("restricted.seccomp", f"{sw}.seccompProfile.type",
                        "seccomp RuntimeDefault or Localhost must be set"))
        if "ALL" not in [str(x) for x in caps.get("drop") or []]:
            v(Violation("restricted.capabilities", f"{sw}.capabilities.drop",
                        "must drop ALL"))
        extra = [x for x in added if x != "NET_BIND_SERVICE"]
        if extra:
            v(Violation("restricted.capabilities", f"{sw}.capabilities.add",
                        f"adds {', '.join(extra)}"))
        # -- ours --------------------------------------------------------------------------
        image = str(c.get("image") or "")
        if not DIGEST_IMAGE.match(image):
            v(Violation("stepguard.image-digest", f"{where}.image",
                        f"image {image!r} is not pinned by digest"))
        elif image.endswith("@" + PLACEHOLDER_DIGEST):
            v(Violation("stepguard.image-digest", f"{where}.image",
                        "the all-zero placeholder digest is not an image"))
        if sc.get("readOnlyRootFilesystem") is not True:
            v(Violation("stepguard.read-only-root", f"{sw}.readOnlyRootFilesystem",
                        "root filesystem is writable"))
        if not where.split(".")[-1].startswith("ephemeralContainers"):
            limits = (c.get("resources") or {}).get("limits") or {}
            missing = [r for r in ("cpu", "memory") if r not in limits]
            if missing:
                v(Violation("stepguard.limits", f"{where}.resources.limits",
                            f"no {' or '.join(missing)} limit"))

    out.extend(_memory_volume_violations(pod, prefix))
    out.extend(_home_violations(containers))
    if pod.get("automountServiceAccountToken") is not False:
        v(Violation("stepguard.sa-token", f"{prefix}.automountServiceAccountToken",
                    "service-account token is mounted (set false; use a projected token)"))
    for i, vol in enumerate(pod.get("volumes") or []):
        sources = (vol.get("projected") or {}).get("sources") or []
        for j, src in enumerate(sources):
            if not isinstance(src, Mapping) or "serviceAccountToken" not in src:
                continue
            out.extend(_token_violations(src.get("serviceAccountToken") or {},
                                         f"{prefix}.volumes[{i}].projected.sources[{j}]"
                                         ".serviceAccountToken"))
    if runs_once:
        deadline = pod.get("activeDeadlineSeconds")
        if manifest.get("kind") in ("Job", "CronJob"):
            job = manifest["spec"] if manifest.get("kind") == "Job" else \
                (manifest["spec"].get("jobTemplate") or {}).get("spec") or {}
            deadline = deadline or job.get("activeDeadlineSeconds")
        if not deadline:
            v(Violation("stepguard.deadline", f"{prefix}.activeDeadlineSeconds", "no deadline"))
        if pod.get("restartPolicy") != "Never":
            v(Violation("stepguard.restart-policy", f"{prefix}.restartPolicy",
                        f"restartPolicy {pod.get('restartPolicy', 'Always')!r}"))
    return out


def _quantity(value: object) -> int | None:
    from stepguard.isolation._limits import parse_bytes

    try:
        return parse_bytes(str(value), subject="quantity")
    except ConfigurationError:
        return None


def _memory_volume_violations(pod: Mapping[str, Any], prefix: str) -> list[Violation]:
    """Podman and some runtimes ignore emptyDir medium/sizeLimit; the rule is checked here."""
    found: list[Violation] = []
    sized: dict[str, tuple[int, str]] = {}
    for i, vol in enumerate(pod.get("volumes") or []):
        ed = vol.get("emptyDir") if isinstance(vol, Mapping) else None
        if not isinstance(ed, Mapping) or ed.get("medium") != "Memory":
            continue
        limit = ed.get("sizeLimit")
        size = _quantity(limit) if limit is not None else None
        if size is None:
            found.append(Violation("stepguard.memory-volume",
                                   f"{prefix}.volumes[{i}].emptyDir.sizeLimit",
                                   f"memory-backed volume {vol.get('name')!r} has no size limit"))
        else:
            sized[str(vol.get("name"))] = (size, str(limit))
    for where, c in _containers(pod, prefix):
        memory = ((c.get("resources") or {}).get("limits") or {}).get("memory")
        mem = _quantity(memory) if memory is not None else None
        for j, m in enumerate(c.get("volumeMounts") or []):
            hit = sized.get(str(m.get("name")))
            if hit and mem is not None and hit[0] > mem:
                found.append(Violation(
                    "stepguard.memory-volume", f"{where}.volumeMounts[{j}]",
                    f"memory-backed volume {m.get('name')!r} ({hit[1]}) exceeds the memory "
                    f"limit {memory}"))
    return found


def _home_violations(containers: list[tuple[str, Mapping[str, Any]]]) -> list[Violation]:
    found: list[Violation] = []
    for where, c in containers:
        if (c.get("securityContext") or {}).get("readOnlyRootFilesystem") is not True:
            continue
        home = next((str(e.get("value")) for e in c.get("env") or []
                     if isinstance(e, Mapping) and e.get("name") == "HOME" and "value" in e),
                    None)
        if home is None:
            continue
        writable = [str(m.get("mountPath", "")).rstrip("/") for m in c.get("volumeMounts") or []
                    if not m.get("readOnly")]
        if not any(home.rstrip("/") == p or home.startswith(p + "/") for p in writable if p):
            found.append(Violation("stepguard.writable-home", f"{where}.env.HOME",
                                   f"HOME {home!r} is on the read-only root"))
    return found


def _is_api_audience(audience: str) -> bool:
    a = audience.strip().lower().rstrip("/")
    return a in _API_AUDIENCES or a.startswith(("https://kubernetes.default.",
                                                "kubernetes.default."))


def _token_violations(tok: Mapping[str, Any], where: str) -> list[Violation]:
    """A projected token must be for someone else than the API server, and short-lived."""
    found: list[Violation] = []
    audience = tok.get("audience")
    if not isinstance(audience, str) or not audience.strip():
        found.append(Violation("stepguard.projected-token", f"{where}.audience",
                               "no audience: the token is valid against the Kubernetes API"))
    elif _is_api_audience(audience):
        found.append(Violation("stepguard.projected-token", f"{where}.audience",
                               f"audience {audience!r} is the Kubernetes API server's"))
    expiry = tok.get("expirationSeconds", MAX_TOKEN_EXPIRATION_S)
    if not isinstance(expiry, int) or isinstance(expiry, bool) \
            or expiry > MAX_TOKEN_EXPIRATION_S:
        found.append(Violation("stepguard.projected-token", f"{where}.expirationSeconds",
                               f"token lives {expiry!r} s (at most {MAX_TOKEN_EXPIRATION_S})"))
    return found


def assert_pod_ok(manifest: Mapping[str, Any], *, schema: bool = True,
                  kubernetes_version: str | None = None, subject: str | None = None) -> None:
    """Raise :class:`~stepguard.errors.PolicyViolation` listing every violation, if any.

    >>> from stepguard.isolation import assert_pod_ok
    >>> assert_pod_ok({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
    ...                "spec": {"containers": [{"name": "c", "image": "busybox"}]}},
    ...               schema=False)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    stepguard.errors.PolicyViolation: pod violates 10 rules: restricted.privilege-escalation, ...: x
    """
    found = check_pod(manifest, schema=schema, kubernetes_version=kubernetes_version)
    if found:
        name = subject or str((manifest.get("metadata") or {}).get("name") or
                              manifest.get("kind"))
        raise PolicyViolation(violations_summary(found), subject=name,
                              details=[str(f) for f in found],
                              hint="see docs/reference/isolation.md for each rule")
