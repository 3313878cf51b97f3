"""Glue between the step lifecycle and signing/registry: publish outputs, check signed inputs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stepguard.errors import ConfigurationError
from stepguard.receipt import PublishRecord, Receipt
from stepguard.settings import PolicySettings, Settings
from stepguard.spec import InputSpec, OutputSpec, StepSpec


@contextlib.contextmanager
def vault_client(settings: Settings) -> Iterator[Any]:
    """An authenticated hvac client for Transit signing/verification; a token this login
    created is revoked when the block ends."""
    import hvac

    from stepguard._private.vault_config import vault_config
    from stepguard.credentials._api import VaultApi

    cfg = vault_config(settings)
    api = VaultApi(cfg)
    login = cfg.auth.login(api) if cfg.auth is not None else None
    token = login.token if login is not None else os.environ.get("VAULT_TOKEN")
    client = hvac.Client(url=cfg.addr, token=token, namespace=cfg.namespace,
                         verify=cfg.ca_cert or True, timeout=cfg.timeout_s)
    try:
        yield client
    finally:
        if login is not None and login.owned:
            with contextlib.suppress(Exception):
                client.auth.token.revoke_self()
        api.close()


def build_policy(policy: PolicySettings, settings: Settings, client: Any = None) -> Any:
    """The signing package's Policy object for a named policy in settings."""
    from stepguard.signing import KeyPolicy, SigstorePolicy, TransitPolicy

    if policy.kind == "key":
        return KeyPolicy(public_keys=tuple(Path(p) for p in policy.public_keys),
                         allow_pickle=policy.allow_pickle)
    if policy.kind == "transit":
        assert policy.key is not None
        return TransitPolicy(key=policy.key, client=client,
                             versions=policy.versions, min_version=policy.min_version,
                             mount=policy.mount, allow_pickle=policy.allow_pickle)
    assert policy.identity is not None and policy.issuer is not None
    return SigstorePolicy(identity=policy.identity, issuer=policy.issuer,
                          trust_config=Path(policy.trust_config) if policy.trust_config else None,
                          allow_pickle=policy.allow_pickle)


def verify_input_signature(inp: InputSpec, manifest: Any, settings: Settings) -> str:
    """Require ``inp``'s manifest to be signed under its named policy; return the signer."""
    from stepguard.signing import verify_manifest_signature

    assert inp.signature is not None and inp.signature_policy is not None
    named = settings.policy(inp.signature_policy)
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(vault_client(settings)) if named.kind == "transit" else None
        policy = build_policy(named, settings, client)
        verify_manifest_signature(Path(inp.signature), policy, manifest=manifest)
        verified = policy.verify_bundle(_load(Path(inp.signature)), subject=inp.signature)
    return str(verified.signer)


def _load(path: Path) -> Any:
    from stepguard.signing._bundle import load_bundle

    return load_bundle(path.read_bytes(), subject=str(path))


def publish_output(out: OutputSpec, path: Path, manifest: Any, *, spec: StepSpec,
                   settings: Settings, receipt: Receipt) -> PublishRecord:
    """Sign and publish one output from ``path`` (the directory the step hashed: the spec's
    path with its placeholders expanded); the signature bundle is uploaded last."""
    from stepguard.registry import open_registry
    from stepguard.signing import signer_from_spec

    pub = out.publish
    assert pub is not None
    url = pub.registry or settings.registry.url
    if not url:
        raise ConfigurationError("no registry to publish to", subject=f"outputs.{out.name}.publish",
                                 hint="set publish.registry or registry.url in settings")
    if spec.signing is None:
        raise ConfigurationError("publishing signs the output, but the step has no signer",
                                 subject="step.signing",
                                 hint="add signing: {signer: key|transit|sigstore, key: ...}")
    provenance = receipt.to_dict() if pub.provenance else None
    with contextlib.ExitStack() as stack:
        client = (stack.enter_context(vault_client(settings))
                  if spec.signing.signer == "transit" else None)
        signer = signer_from_spec(spec.signing, vault_client=client, settings=settings)
        rec = open_registry(url).publish(path, pub.name, pub.version, signer=signer,
                                         provenance=provenance, manifest=manifest,
                                         allow_pickle=pub.allow_pickle)
    return PublishRecord(registry=url, name=rec.name, version=rec.version, uri=rec.uri,
                         bundle_uri=rec.bundle_uri, bundle_digest=rec.bundle_digest,
                         signer=rec.signer, provenance_uri=rec.provenance_uri)
