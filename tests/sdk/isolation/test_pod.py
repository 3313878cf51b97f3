"""Pod and NetworkPolicy builder, and the Pod Security validator.

No Kubernetes API server can run here, so these are contract tests: generated manifests are
validated strictly against the bundled Kubernetes OpenAPI schema (kubernetes-validate) and the
Pod Security "restricted" rules, and golden files pin their exact shape.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from stepguard.errors import ConfigurationError, PolicyViolation
from stepguard.isolation import (
    assert_pod_ok,
    build_network_policy,
    build_pod,
    check_pod,
)
from stepguard.isolation._check import RULES
from stepguard.spec import IsolationSpec, RunContext

GOLDEN = Path(__file__).parent / "golden"
DIGEST = "ghcr.io/acme/train@sha256:" + "0123456789abcdef" * 4
CTX = RunContext(pipeline="fraud_model", run_id="manual__2026-11-22T05:00:00+00:00",
                 step="train", try_number=2, orchestrator="airflow")

SPECS: dict[str, IsolationSpec] = {
    "cpu-default": IsolationSpec(mode="pod", image=DIGEST, namespace="ml"),
    "gpu-vault-allowlist": IsolationSpec(
        mode="pod", image=DIGEST, gpus=2, cpu="8", memory="64Gi", namespace="ml-train",
        network=("10.20.0.10:8200", "minio.storage.svc:9000", "10.30.0.0/16:443"),
        runtime_class="gvisor", node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
        tolerations=({"key": "dedicated", "operator": "Equal", "value": "ml",
                      "effect": "NoSchedule"},),
        service_account="trainer", vault_kubernetes_auth=True, uid=10001, scratch_size="20Gi",
    ),
}


def render(kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = SPECS[kind]
    pod = build_pod(spec, name=f"sg-train-{kind}", command=["stepguard", "exec", "--spec",
                    "/etc/stepguard/step.yaml", "--", "python", "train.py"],
                    env={"STEPGUARD_RUN_ID": CTX.run_id}, context=CTX, deadline_s=1800.5,
                    wrapped_token_env={"STEPGUARD_WRAPPED_TOKEN": "hvs.wrapping-token-single-use"}
                    if kind == "gpu-vault-allowlist" else None)
    pol = build_network_policy(spec, name=f"sg-train-{kind}", context=CTX)
    return pod, pol


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_generated_manifests_match_golden_files(kind: str) -> None:
    pod, pol = render(kind)
    text = yaml.safe_dump_all([pod, pol], sort_keys=True)
    golden = GOLDEN / f"{kind}.yaml"
    if os.environ.get("STEPGUARD_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert golden.read_text() == text, "regenerate with STEPGUARD_UPDATE_GOLDEN=1 and review"


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_generated_manifests_validate_strictly_and_pass_restricted(kind: str) -> None:
    pod, pol = render(kind)
    version = kubernetes_validate.latest_version()
    assert tuple(map(int, version.split(".")[:2])) >= (1, 33)
    kubernetes_validate.validate(pod, version, strict=True)
    kubernetes_validate.validate(pol, version, strict=True)
    assert check_pod(pod) == []
    assert_pod_ok(pod)


def test_gpu_pod_shape() -> None:
    pod, pol = render("gpu-vault-allowlist")
    spec = pod["spec"]
    c = spec["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        spec["tolerations"]
    assert spec["nodeSelector"]["cloud.google.com/gke-accelerator"] == "nvidia-l4"
    assert spec["runtimeClassName"] == "gvisor"
    assert spec["activeDeadlineSeconds"] == 1801
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    token = next(v for v in spec["volumes"] if v["name"] == "vault-token")
    src = token["projected"]["sources"][0]["serviceAccountToken"]
    assert src["audience"] == "vault" and src["expirationSeconds"] == 600
    assert pod["metadata"]["labels"]["stepguard.dev/step"] == "train"
    assert pod["metadata"]["labels"]["stepguard.dev/run"] == CTX.labels()["stepguard.dev/run"]


def test_cpu_pod_has_no_token_no_gpu_and_limits() -> None:
    pod, _ = render("cpu-default")
    spec = pod["spec"]
    assert "serviceAccountName" not in spec
    assert not any("projected" in v for v in spec["volumes"])
    limits = spec["containers"][0]["resources"]["limits"]
    assert set(limits) == {"cpu", "memory", "ephemeral-storage"}
    assert "tolerations" not in spec and "nodeSelector" not in spec
    assert spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "scratch", "mountPath": "/tmp"} in spec["containers"][0]["volumeMounts"]


def test_network_policy_default_deny_and_allowlist() -> None:
    _, closed = render("cpu-default")
    assert closed["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert closed["spec"]["ingress"] == [] and closed["spec"]["egress"] == []
    assert closed["spec"]["podSelector"]["matchLabels"]["stepguard.dev/pod"] == \
        "sg-train-cpu-default"
    _, opened = render("gpu-vault-allowlist")
    egress = opened["spec"]["egress"]
    assert egress[0]["ports"] == [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
    assert egress[1] == {"to": [{"ipBlock": {"cidr": "10.20.0.10/32"}}],
                         "ports": [{"protocol": "TCP", "port": 8200}]}
    assert egress[2]["to"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "storage"}
    assert egress[3]["to"] == [{"ipBlock": {"cidr": "10.30.0.0/16"}}]
    assert opened["spec"]["ingress"] == []


@pytest.mark.parametrize("entry", ["example.com:443", "10.0.0.1", "10.0.0.1:0", ":80",
                                   "10.0.0.1:http"])
def test_unfilterable_allowlist_entries_are_refused(entry: str) -> None:
    with pytest.raises(ConfigurationError):
        build_network_policy(IsolationSpec(mode="pod", network=(entry,)), name="x", context=CTX)


def test_tag_images_are_refused_unless_explicitly_allowed() -> None:
    with pytest.raises(PolicyViolation, match="not pinned by digest"):
        build_pod(IsolationSpec(mode="pod", image="ghcr.io/acme/train:latest"), name="x",
                  command=["true"], env={}, context=CTX)
    with pytest.raises(ConfigurationError):
        build_pod(IsolationSpec(mode="pod"), name="x", command=["true"], env={}, context=CTX)
    with pytest.warns(UserWarning, match="allow_unpinned_image"):
        pod = build_pod(IsolationSpec(mode="pod", image="ghcr.io/acme/train:v1",
                                      allow_unpinned_image=True),
                        name="x", command=["true"], env={}, context=CTX)
    assert [v.rule for v in check_pod(pod)] == ["stepguard.image-digest"]


def test_bad_names_and_duplicate_env_are_refused() -> None:
    spec = SPECS["cpu-default"]
    with pytest.raises(ConfigurationError):
        build_pod(spec, name="Bad_Name", command=["true"], env={}, context=CTX)
    with pytest.raises(ConfigurationError):
        build_pod(spec, name="x", command=["true"], env={"HOME": "/root"}, context=CTX)
    with pytest.raises(ConfigurationError):
        build_pod(spec, name="x", command=[], env={}, context=CTX)


# -- the validator: one case per rule ----------------------------------------------------------


def good_pod() -> dict[str, Any]:
    pod, _ = render("cpu-default")
    return copy.deepcopy(pod)


def c0(p: dict[str, Any]) -> dict[str, Any]:
    return p["spec"]["containers"][0]


def sc0(p: dict[str, Any]) -> dict[str, Any]:
    return c0(p)["securityContext"]


def _set(path: str, value: Any):
    def mutate(p: dict[str, Any]) -> None:
        node = p
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
        node[keys[-1]] = value
    return mutate


def _del(path: str):
    def mutate(p: dict[str, Any]) -> None:
        node = p
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        del node[keys[-1]]
    return mutate


def _add_init(p: dict[str, Any]) -> None:
    init = copy.deepcopy(c0(p))
    init["name"] = "init"
    init["securityContext"]["privileged"] = True
    p["spec"]["initContainers"] = [init]


def _add_ephemeral(p: dict[str, Any]) -> None:
    eph = {k: v for k, v in copy.deepcopy(c0(p)).items()
           if k not in ("resources",)}
    eph["name"] = "debug"
    eph["securityContext"]["capabilities"] = {"drop": ["ALL"], "add": ["SYS_PTRACE"]}
    p["spec"]["ephemeralContainers"] = [eph]


SA_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def _project_token(p: dict[str, Any], token: dict[str, Any]) -> None:
    """Mount a projected service-account token where client libraries look for one."""
    p["spec"]["volumes"].append({"name": "kube-api-access", "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", **token}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
    ]}})
    c0(p)["volumeMounts"].append({"name": "kube-api-access", "mountPath": SA_PATH,
                                  "readOnly": True})


C = "spec.containers.0.securityContext"
CASES: list[tuple[str, str, Any]] = [
    ("schema", "misspelled capabilities", lambda p: sc0(p).update(
        capabilites=sc0(p).pop("capabilities"))),
    ("baseline.host-process", "windows host process",
     _set(f"{C}.windowsOptions", {"hostProcess": True})),
    ("baseline.host-namespaces", "hostNetwork", _set("spec.hostNetwork", True)),
    ("baseline.host-namespaces", "hostPID", _set("spec.hostPID", True)),
    ("baseline.host-namespaces", "hostIPC", _set("spec.hostIPC", True)),
    ("baseline.privileged", "privileged", _set(f"{C}.privileged", True)),
    ("baseline.privileged", "privileged init container", _add_init),
    ("baseline.capabilities", "adds SYS_ADMIN",
     _set(f"{C}.capabilities", {"drop": ["ALL"], "add": ["SYS_ADMIN"]})),
    ("baseline.capabilities", "ephemeral container adds SYS_PTRACE", _add_ephemeral),
    ("baseline.host-path", "hostPath volume", lambda p: p["spec"]["volumes"].append(
        {"name": "host", "hostPath": {"path": "/var/run/docker.sock"}})),
    ("baseline.host-ports", "hostPort", _set("spec.containers.0.ports",
                                             [{"containerPort": 80, "hostPort": 80}])),
    ("baseline.apparmor", "unconfined AppArmor field",
     _set(f"{C}.appArmorProfile", {"type": "Unconfined"})),
    ("baseline.apparmor", "unconfined AppArmor annotation", _set(
        "metadata.annotations", {"container.apparmor.security.beta.kubernetes.io/step":
                                 "unconfined"})),
    ("baseline.selinux", "custom SELinux type", _set(f"{C}.seLinuxOptions", {"type": "spc_t"})),
    ("baseline.selinux", "custom SELinux user", _set("spec.securityContext.seLinuxOptions",
                                                      {"user": "system_u"})),
    ("baseline.proc-mount", "unmasked /proc", _set(f"{C}.procMount", "Unmasked")),
    ("baseline.seccomp", "seccomp unconfined",
     _set("spec.securityContext.seccompProfile", {"type": "Unconfined"})),
    ("baseline.sysctls", "unsafe sysctl", _set("spec.securityContext.sysctls",
                                               [{"name": "kernel.msgmax", "value": "1"}])),
    ("restricted.volume-types", "nfs volume", lambda p: p["spec"]["volumes"].append(
        {"name": "n", "nfs": {"server": "10.0.0.1", "path": "/"}})),
    ("restricted.privilege-escalation", "allowPrivilegeEscalation unset",
     _del(f"{C}.allowPrivilegeEscalation")),
    ("restricted.run-as-non-root", "runAsNonRoot false", _set(f"{C}.runAsNonRoot", False)),
    ("restricted.run-as-user", "uid 0", _set(f"{C}.runAsUser", 0)),
    ("restricted.seccomp", "no seccomp profile anywhere", lambda p: (
        _del(f"{C}.seccompProfile")(p), _del("spec.securityContext.seccompProfile")(p))),
    ("restricted.capabilities", "drop ALL missing", _set(f"{C}.capabilities", {"drop": ["NET_RAW"]})),
    ("restricted.capabilities", "adds CHOWN (baseline-allowed)",
     _set(f"{C}.capabilities", {"drop": ["ALL"], "add": ["CHOWN"]})),
    ("stepguard.image-digest", "tag image", _set("spec.containers.0.image", "busybox:1.36")),
    ("stepguard.sa-token", "token automount", _del("spec.automountServiceAccountToken")),
    ("stepguard.projected-token", "projected token without audience",
     lambda p: _project_token(p, {"expirationSeconds": 600})),
    ("stepguard.read-only-root", "writable root", _set(f"{C}.readOnlyRootFilesystem", False)),
    ("stepguard.limits", "no limits", _set("spec.containers.0.resources", {})),
    ("stepguard.deadline", "no deadline", _del("spec.activeDeadlineSeconds")),
    ("stepguard.restart-policy", "restart on failure", _set("spec.restartPolicy", "OnFailure")),
    ("stepguard.memory-volume", "unbounded memory-backed /dev/shm", lambda p: (
        p["spec"]["volumes"].append({"name": "shm", "emptyDir": {"medium": "Memory"}}),
        c0(p)["volumeMounts"].append({"name": "shm", "mountPath": "/dev/shm"}))),
    ("stepguard.memory-volume", "/dev/shm larger than the memory limit", lambda p: (
        p["spec"]["volumes"].append({"name": "shm", "emptyDir": {"medium": "Memory",
                                                                 "sizeLimit": "3Gi"}}),
        c0(p)["volumeMounts"].append({"name": "shm", "mountPath": "/dev/shm"}))),
    ("stepguard.writable-home", "HOME on the read-only root", lambda p: [
        e.update(value="/root") for e in c0(p)["env"] if e["name"] == "HOME"]),
    ("stepguard.writable-home", "HOME volume mounted read-only", lambda p: [
        m.update(readOnly=True) for m in c0(p)["volumeMounts"] if m["name"] == "home"]),
]


@pytest.mark.parametrize(("rule", "what", "mutate"), CASES, ids=[f"{r}:{w}" for r, w, _ in CASES])
def test_validator_flags_each_rule(rule: str, what: str, mutate: Any) -> None:
    pod = good_pod()
    assert check_pod(pod) == []
    mutate(pod)
    found = check_pod(pod)
    assert rule in {v.rule for v in found}, found
    with pytest.raises(PolicyViolation) as info:
        assert_pod_ok(pod)
    assert any(d.startswith(rule + ":") for d in info.value.details)


def test_every_rule_has_a_case() -> None:
    assert {r for r, _, _ in CASES} == set(RULES)
    assert sum(r.startswith("baseline.") for r in RULES) == 11
    assert sum(r.startswith("restricted.") for r in RULES) == 6


def test_every_schema_error_is_named() -> None:
    pod = good_pod()
    sc0(pod)["capabilites"] = sc0(pod).pop("capabilities")
    pod["spec"]["hostNetwrk"] = True
    schema = [v for v in check_pod(pod) if v.rule == "schema"]
    assert len(schema) == 2
    assert any("capabilites" in v.message for v in schema)
    assert any("hostNetwrk" in v.message for v in schema)


def test_stock_pod_fails_many_rules() -> None:
    stock = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "train"},
             "spec": {"containers": [{"name": "train", "image": "pytorch/pytorch:latest"}]}}
    rules = {v.rule for v in check_pod(stock)}
    assert {"restricted.privilege-escalation", "restricted.run-as-non-root",
            "restricted.seccomp", "restricted.capabilities", "stepguard.sa-token",
            "stepguard.image-digest", "stepguard.read-only-root", "stepguard.limits",
            "stepguard.deadline", "stepguard.restart-policy"} <= rules


def test_workload_templates_are_checked() -> None:
    pod = good_pod()
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"},
           "spec": {"activeDeadlineSeconds": 60, "backoffLimit": 0,
                    "template": {"metadata": {"labels": pod["metadata"]["labels"]},
                                 "spec": {k: v for k, v in pod["spec"].items()
                                          if k != "activeDeadlineSeconds"}}}}
    assert check_pod(job) == []
    job["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = True
    found = check_pod(job)
    assert [v.path for v in found if v.rule == "baseline.privileged"] == [
        "spec.template.spec.containers[0].securityContext.privileged"]
    pod = good_pod()
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
              "spec": {"selector": {"matchLabels": {"a": "b"}},
                       "template": {"metadata": {"labels": {"a": "b"}},
                                    "spec": {**pod["spec"], "restartPolicy": "Always"}}}}
    del deploy["spec"]["template"]["spec"]["activeDeadlineSeconds"]
    assert check_pod(deploy) == []
    with pytest.raises(ConfigurationError):
        check_pod({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"},
                   "spec": {}})


def _checkov_cli() -> str | None:
    return os.environ.get("STEPGUARD_CHECKOV") or shutil.which("checkov")


def test_checkov_second_opinion(tmp_path: Path) -> None:
    """checkov's Kubernetes checks as a second opinion on the generated manifests.

    checkov is not a project dependency: installing it into the project environment downgrades
    locked packages (boto3, botocore, s3transfer, packaging, networkx, ...). The test runs where
    a separately installed checkov exists: importable, on PATH, or named by $STEPGUARD_CHECKOV
    (e.g. a throwaway venv: ``uv venv /tmp/ckv && uv pip install --python /tmp/ckv/bin/python
    checkov`` then ``STEPGUARD_CHECKOV=/tmp/ckv/bin/checkov``).
    """
    cli = _checkov_cli()
    if cli is None:
        pytest.skip("checkov not installed (it would downgrade locked packages; set "
                    "STEPGUARD_CHECKOV to a separately installed checkov)")
    (tmp_path / "ours").mkdir()
    for kind in SPECS:
        pod, pol = render(kind)
        (tmp_path / "ours" / f"{kind}.yaml").write_text(yaml.safe_dump_all([pod, pol]))
    stock = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "stock", "namespace": "x"},
             "spec": {"containers": [{"name": "t", "image": "pytorch/pytorch:latest"}]}}
    (tmp_path / "stock").mkdir()
    (tmp_path / "stock" / "stock.yaml").write_text(yaml.safe_dump(stock))

    def failed(directory: Path) -> set[str]:
        r = subprocess.run([cli, "-d", str(directory), "--framework", "kubernetes", "-o", "json",
                            "--skip-download", "--quiet"], capture_output=True, text=True,
                           timeout=600, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
        text = r.stdout[r.stdout.index("{"):]
        report = json.loads(text)
        reports = report if isinstance(report, list) else [report]
        return {c["check_id"] for rep in reports
                for c in rep.get("results", {}).get("failed_checks", [])}

    # A batch step is not a service: liveness/readiness probes do not apply.
    not_applicable = {"CKV_K8S_8", "CKV_K8S_9"}
    ours = failed(tmp_path / "ours")
    assert ours - not_applicable == set(), sorted(ours)
    # The same checks do catch a stock pod, so a pass above means something.
    assert len(failed(tmp_path / "stock") - not_applicable) >= 10


# -- red-team finding 7: API-usable projected tokens --------------------------------------------


@pytest.mark.parametrize(("token", "field"), [
    ({}, "audience"),  # the attack as found: no audience, default 1 h, standard path
    ({"expirationSeconds": 86400}, "audience"),
    ({"audience": "https://kubernetes.default.svc", "expirationSeconds": 600}, "audience"),
    ({"audience": "https://kubernetes.default.svc.cluster.local/"}, "audience"),
    ({"audience": "kubernetes.default.svc"}, "audience"),
    ({"audience": "Kubernetes"}, "audience"),
    ({"audience": "  "}, "audience"),
    ({"audience": "vault", "expirationSeconds": 86400}, "expirationSeconds"),
    ({"audience": "vault", "expirationSeconds": "600"}, "expirationSeconds"),
])
def test_projected_tokens_usable_against_the_api_are_refused(token: dict[str, Any],
                                                             field: str) -> None:
    """Contract level: no API server runs here, so whether a token *would* be accepted by one
    is not tried; the rule is checked on the manifest the API server would receive."""
    pod = good_pod()
    _project_token(pod, token)
    found = [v for v in check_pod(pod) if v.rule == "stepguard.projected-token"]
    assert found and found[0].path.endswith(f".serviceAccountToken.{field}"), found
    assert found[0].path.startswith("spec.volumes[")
    with pytest.raises(PolicyViolation):
        assert_pod_ok(pod)


@pytest.mark.parametrize("token", [
    {"audience": "vault", "expirationSeconds": 600},
    {"audience": "vault"},  # the API server's default lifetime, 3600 s
    {"audience": "https://vault.example:8200", "expirationSeconds": 3600},
])
def test_projected_tokens_for_another_audience_and_short_lived_pass(token: dict[str, Any]) -> None:
    """Contract level (no API server here): the manifest shape stepguard itself generates."""
    pod = good_pod()
    _project_token(pod, token)
    assert check_pod(pod) == []
