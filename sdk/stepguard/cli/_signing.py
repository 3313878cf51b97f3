"""``stepguard sign``, ``stepguard verify`` and ``stepguard registry publish|fetch|list``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from stepguard.errors import ConfigurationError

__all__ = ["register"]


def _signer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("signer (exactly one)")
    g.add_argument("--key", metavar="PEM", help="EC private key file (PEM)")
    g.add_argument("--transit", metavar="KEY", help="Vault Transit key name (VAULT_ADDR, "
                   "VAULT_TOKEN from the environment)")
    g.add_argument("--transit-mount", default="transit", metavar="MOUNT")
    g.add_argument("--sigstore", action="store_true", help="Sigstore keyless signing")
    g.add_argument("--identity-token-env", metavar="VAR",
                   help="variable holding the OIDC token (default: ambient detection)")
    g.add_argument("--trust-config", metavar="JSON", help="private Sigstore trust config")


def _policy_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_argument_group("verification policy" + (" (required)" if required else ""))
    g.add_argument("--public-key", action="append", default=[], metavar="PEM",
                   help="accepted EC public key (repeatable)")
    g.add_argument("--transit-key", metavar="KEY", help="accepted Vault Transit key")
    g.add_argument("--transit-versions", metavar="N,N", help="accepted Transit key versions")
    g.add_argument("--transit-min-version", type=int, metavar="N")
    g.add_argument("--policy-transit-mount", default="transit", metavar="MOUNT")
    g.add_argument("--identity", help="accepted Sigstore identity (certificate SAN)")
    g.add_argument("--issuer", help="accepted Sigstore OIDC issuer")
    g.add_argument("--policy-trust-config", metavar="JSON", help="private Sigstore trust config")
    g.add_argument("--allow-pickle", action="store_true",
                   help="accept pickle files that pass both fickling and picklescan")


def _vault_client() -> Any:
    from stepguard.credentials import VaultClient, VaultConfig

    addr = os.environ.get("VAULT_ADDR") or os.environ.get("BAO_ADDR")
    token = os.environ.get("VAULT_TOKEN") or os.environ.get("BAO_TOKEN")
    if not addr or not token:
        raise ConfigurationError("Transit needs VAULT_ADDR and VAULT_TOKEN", subject="--transit")
    cfg = VaultConfig(addr=addr, auth=None, namespace=os.environ.get("VAULT_NAMESPACE") or None,
                      ca_cert=os.environ.get("VAULT_CACERT") or None)
    return VaultClient(cfg, token).hvac()


def _signer(args: argparse.Namespace) -> Any:
    from stepguard.signing import KeySigner, SigstoreSigner, TransitSigner

    chosen = [x for x in (args.key, args.transit, args.sigstore or None) if x]
    if len(chosen) != 1:
        raise ConfigurationError("choose exactly one signer: --key, --transit or --sigstore")
    if args.key:
        return KeySigner(Path(args.key))
    if args.transit:
        return TransitSigner(args.transit, client=_vault_client(), mount=args.transit_mount)
    token = None
    if args.identity_token_env:
        token = os.environ.get(args.identity_token_env)
        if not token:
            raise ConfigurationError("identity token variable is empty or unset",
                                     subject=args.identity_token_env)
    return SigstoreSigner(identity_token=token,
                          trust_config=Path(args.trust_config) if args.trust_config else None)


def _policy(args: argparse.Namespace, *, required: bool = True) -> Any:
    from stepguard.signing import KeyPolicy, SigstorePolicy, TransitPolicy

    kinds = [bool(args.public_key), bool(args.transit_key), bool(args.identity or args.issuer)]
    if sum(kinds) == 0:
        if required:
            raise ConfigurationError("a verification policy is required (--public-key, "
                                     "--transit-key or --identity/--issuer)")
        return None
    if sum(kinds) > 1:
        raise ConfigurationError("give one kind of policy")
    if args.public_key:
        return KeyPolicy(public_keys=tuple(Path(k) for k in args.public_key),
                         allow_pickle=args.allow_pickle)
    if args.transit_key:
        versions = tuple(int(v) for v in args.transit_versions.split(",")) \
            if args.transit_versions else ()
        return TransitPolicy(args.transit_key, client=_vault_client(), versions=versions,
                             min_version=args.transit_min_version,
                             mount=args.policy_transit_mount, allow_pickle=args.allow_pickle)
    if not (args.identity and args.issuer):
        raise ConfigurationError("a Sigstore policy needs both --identity and --issuer")
    tc = Path(args.policy_trust_config) if args.policy_trust_config else None
    return SigstorePolicy(args.identity, args.issuer, trust_config=tc,
                          allow_pickle=args.allow_pickle)


def _out(args: argparse.Namespace, data: dict[str, Any], text: str) -> int:
    if args.json:
        json.dump(data, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(text)
    return 0


def _read_manifest(path: Path) -> Any:
    from stepguard.integrity import Manifest

    try:
        return Manifest.from_json(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"cannot read manifest ({exc.strerror})",
                                 subject=str(path)) from exc


def _cmd_sign(args: argparse.Namespace) -> int:
    from stepguard.signing import sign_manifest, sign_model

    if args.manifest:
        manifest = _read_manifest(args.model)
        signer = _signer(args)
        sign_manifest(manifest, signer, bundle_path=args.signature)
        return _out(args, {"signature": str(args.signature), "manifest_digest": manifest.digest,
                           "signer": signer.identity},
                    f"signed manifest {manifest.digest} -> {args.signature}")

    signed = sign_model(args.model, _signer(args), bundle_path=args.signature,
                        name=args.name, allow_pickle=args.allow_pickle)
    return _out(args, {"signature": str(args.signature), "root_digest": signed.root_digest,
                       "files": len(signed.files), "signer": signed.signer},
                f"signed {len(signed.files)} files ({signed.root_digest}) -> {args.signature}")


def _cmd_verify(args: argparse.Namespace) -> int:
    from stepguard.signing import verify_manifest_signature, verify_model

    if args.manifest:
        policy = _policy(args)
        got = verify_manifest_signature(args.signature, policy,
                                        manifest=_read_manifest(args.model))
        return _out(args, {"verified": True, "manifest_digest": got.digest,
                           "policy": policy.describe()},
                    f"verified manifest {got.digest} ({policy.describe()})")

    ok = verify_model(args.model, args.signature, _policy(args), expected_name=args.name)
    return _out(args, {"verified": True, "root_digest": ok.root_digest, "files": len(ok.files),
                       "signer": ok.signer, "policy": ok.policy},
                f"verified {len(ok.files)} files ({ok.root_digest}) signed by {ok.signer}")


def _registry(args: argparse.Namespace) -> Any:
    from stepguard.registry import open_registry

    url = args.registry or os.environ.get("STEPGUARD_REGISTRY_URL")
    if not url:
        raise ConfigurationError("no registry: pass --registry or set STEPGUARD_REGISTRY_URL")
    return open_registry(url)


def _cmd_publish(args: argparse.Namespace) -> int:
    provenance = None
    if args.provenance:
        provenance = json.loads(Path(args.provenance).read_text(encoding="utf-8"))
    rec = _registry(args).publish(args.model, args.name, args.version, signer=_signer(args),
                                  provenance=provenance, allow_pickle=args.allow_pickle)
    return _out(args, rec.to_dict(), f"published {rec.name}:{rec.version} -> {rec.uri}")


def _cmd_fetch(args: argparse.Namespace) -> int:
    path = _registry(args).fetch(args.name, args.version, policy=_policy(args), dest=args.dest)
    return _out(args, {"path": str(path), "verified": True}, str(path))


def _cmd_list(args: argparse.Namespace) -> int:
    entries = _registry(args).list(args.name, policy=_policy(args, required=False))
    data = [{"name": e.name, "version": e.version, "signer": e.signer} for e in entries]
    return _out(args, {"versions": data},
                "\n".join(f"{e.name}:{e.version}" for e in entries) or "(none)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``sign``, ``verify`` and ``registry`` to the stepguard CLI."""
    p = sub.add_parser("sign", help="sign a model directory (OpenSSF model-signing bundle)")
    p.add_argument("model", type=Path, help="model directory or file (with --manifest: a "
                   "manifest JSON)")
    p.add_argument("--manifest", action="store_true",
                   help="sign a data manifest (stepguard manifest create) instead of a model")
    p.add_argument("--signature", type=Path, required=True, help="bundle to write")
    p.add_argument("--name", help="model name recorded in the signature (default: dir name)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="sign pickle files if both scanners pass")
    p.add_argument("--json", action="store_true")
    _signer_args(p)
    p.set_defaults(func=_cmd_sign)

    p = sub.add_parser("verify", help="verify a model directory against a bundle and policy")
    p.add_argument("model", type=Path, help="model directory or file (with --manifest: a "
                   "manifest JSON)")
    p.add_argument("--manifest", action="store_true",
                   help="verify a signed data manifest instead of a model")
    p.add_argument("--signature", type=Path, required=True)
    p.add_argument("--name", help="require this signed model name")
    p.add_argument("--json", action="store_true")
    _policy_args(p)
    p.set_defaults(func=_cmd_verify)

    reg = sub.add_parser("registry", help="publish, fetch and list signed models")
    rsub = reg.add_subparsers(dest="registry_command", required=True)
    p = rsub.add_parser("publish", help="sign and upload a model version")
    p.add_argument("model", type=Path)
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--registry", help="file:///dir or s3://bucket/prefix")
    p.add_argument("--provenance", metavar="RECEIPT_JSON", help="receipt to sign as provenance")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--json", action="store_true")
    _signer_args(p)
    p.set_defaults(func=_cmd_publish)

    p = rsub.add_parser("fetch", help="download and verify a model version")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--dest", type=Path, required=True)
    p.add_argument("--registry")
    p.add_argument("--json", action="store_true")
    _policy_args(p)
    p.set_defaults(func=_cmd_fetch)

    p = rsub.add_parser("list", help="committed versions (verified ones with a policy)")
    p.add_argument("name", nargs="?")
    p.add_argument("--registry")
    p.add_argument("--json", action="store_true")
    _policy_args(p, required=False)
    p.set_defaults(func=_cmd_list)
