"""``stepguard pod``: render the restricted Pod + NetworkPolicy for a step, check any pod manifest.

``render`` prints what ``mode: pod`` would create (for review or GitOps); ``check`` holds any
manifest -- ours or hand-written -- to Pod Security "restricted", stepguard's rules and the strict
Kubernetes schema, naming every violation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from stepguard.errors import ConfigurationError, PolicyViolation

__all__ = ["register"]

_POD_KINDS = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}


def _cmd_render(args: argparse.Namespace) -> int:
    import yaml

    from stepguard.isolation import assert_pod_ok, build_network_policy, build_pod
    from stepguard.spec import RunContext, StepSpec

    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigurationError("no command to render (stepguard pod render --spec S -- CMD)",
                                 subject="CMD")
    import dataclasses

    from stepguard.settings import Settings

    spec = StepSpec.from_file(args.spec)
    settings = Settings.load(args.settings if args.settings else "auto")
    iso = spec.isolation
    if not iso.image and settings.pods.image:  # the one image setting (pods.image)
        iso = dataclasses.replace(iso, image=settings.pods.image)
    ctx = RunContext(pipeline=args.pipeline, run_id=args.run_id or "render",
                     step=spec.name, orchestrator="cli")
    name = args.name or f"sg-{spec.name.lower().replace('_', '-').replace('.', '-')}"[:63]
    docs: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    env = dict(spec.env)
    if args.runner:
        # What `mode: pod` creates: the step runner around the command, its ConfigMap, and a
        # policy open to Vault, DNS, the object store and OTLP only.
        from stepguard._podstep import (
            check_pod_spec,
            jwt_login,
            pod_config,
            pod_egress,
            runner_command,
        )
        from stepguard.isolation import build_config_map

        check_pod_spec(spec)
        if iso.network != "none":
            iso = dataclasses.replace(iso, network=pod_egress(spec, settings))
        if jwt_login(spec, settings):
            iso = dataclasses.replace(iso, vault_kubernetes_auth=True)
            extra = {"vault_audience": settings.pods.jwt_audience,
                     "vault_token_expiry_s": settings.pods.token_expiry_s}
        command = runner_command(command, ctx)
        env["STEPGUARD_POD"] = name
        docs.append(build_config_map(name, pod_config(spec, settings), context=ctx,
                                     namespace=iso.namespace))
        extra["config_map"] = name
    pod = build_pod(iso, name=name, command=command, env=env, context=ctx,
                    deadline_s=spec.deadline_s, **extra)
    policy = build_network_policy(iso, name=name, context=ctx)
    assert_pod_ok(pod, kubernetes_version=args.kubernetes_version)
    docs = [pod, policy, *docs]
    if args.json:
        print(json.dumps(docs, indent=2, sort_keys=True))
    else:
        sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=True))
    return 0


def _load(path: str) -> list[Any]:
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot read manifest ({exc.strerror})", subject=path) from exc
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigurationError("manifest is not valid YAML", subject=path,
                                 details=[str(exc).splitlines()[0]]) from exc


def _cmd_check(args: argparse.Namespace) -> int:
    from stepguard.isolation import check_pod, check_schema

    findings: list[dict[str, str]] = []
    checked = 0
    for path in args.files:
        for i, doc in enumerate(_load(path)):
            where = f"{path}[{i}]"
            if not isinstance(doc, dict):
                findings.append({"file": where, "rule": "schema", "path": "(root)",
                                 "message": "not a mapping"})
                continue
            kind = doc.get("kind")
            if kind in _POD_KINDS:
                found = check_pod(doc, schema=not args.no_schema,
                                  kubernetes_version=args.kubernetes_version)
            elif args.no_schema:
                continue
            else:
                found = check_schema(doc, args.kubernetes_version)
            checked += 1
            findings += [{"file": where, "rule": v.rule, "path": v.path, "message": v.message}
                         for v in found]
    if args.json:
        print(json.dumps({"ok": not findings, "documents": checked, "violations": findings},
                         indent=2, sort_keys=True))
    elif not findings:
        print(f"ok: {checked} document{'s' if checked != 1 else ''} pass Pod Security "
              "restricted and stepguard's rules")
    if findings:
        raise PolicyViolation(
            f"{len(findings)} violation{'s' if len(findings) != 1 else ''}",
            subject=", ".join(args.files),
            details=[f"{f['file']}: {f['rule']}: {f['path']}: {f['message']}" for f in findings],
            hint="each rule is explained in docs/reference/isolation.md",
        )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``stepguard pod render`` and ``stepguard pod check``."""
    p = sub.add_parser("pod", help="render or check restricted pod manifests")
    psub = p.add_subparsers(dest="pod_cmd", metavar="ACTION")
    psub.required = True

    r = psub.add_parser("render", help="print the Pod and NetworkPolicy a step would run as")
    r.add_argument("--spec", required=True, help="step spec (YAML or JSON)")
    r.add_argument("--name", help="pod name (DNS-1123; default sg-<step>)")
    r.add_argument("--pipeline", default="adhoc", help="pipeline label")
    r.add_argument("--run-id", default=None, help="run label (default: render)")
    r.add_argument("--kubernetes-version", default=None,
                   help="schema version to validate against (default: newest bundled)")
    r.add_argument("--json", action="store_true", help="JSON list instead of YAML documents")
    r.add_argument("--settings", help="settings file (default: $STEPGUARD_CONFIG or "
                                      "./stepguard.yaml); pods.image is the default image")
    r.add_argument("--runner", action="store_true",
                   help="render what mode: pod creates: the step runner (stepguard exec) as "
                        "the entrypoint, plus its ConfigMap (spec, settings, Vault CA)")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    r.set_defaults(func=_cmd_render)

    c = psub.add_parser("check", help="check pod manifests against Pod Security restricted "
                                      "and stepguard's rules")
    c.add_argument("files", nargs="+", metavar="FILE", help="YAML/JSON manifest(s)")
    c.add_argument("--kubernetes-version", default=None,
                   help="schema version to validate against (default: newest bundled)")
    c.add_argument("--no-schema", action="store_true",
                   help="skip the strict OpenAPI schema check (rules only)")
    c.add_argument("--json", action="store_true", help="machine-readable findings")
    c.set_defaults(func=_cmd_check)
