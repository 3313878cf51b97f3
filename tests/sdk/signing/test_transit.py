"""Vault Transit signing against the dev stack's OpenBao: stock CLI interop and key rotation."""

from __future__ import annotations

import base64
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from stepguard.errors import SignatureError
from stepguard.signing import (
    TransitPolicy,
    TransitSigner,
    sign_model,
    signer_from_spec,
    transit_public_keys,
    verify_model,
)
from stepguard.spec import SigningSpec

pytestmark = pytest.mark.services


@pytest.fixture
def transit_key(vault_client):
    """A fresh ecdsa-p256 Transit key per test (rotation must not disturb other tests)."""
    name = f"stepguard-test-{uuid.uuid4().hex[:8]}"
    vault_client.secrets.transit.create_key(name=name, key_type="ecdsa-p256")
    return name


def test_dev_stack_signing_key_signs(vault_client, model, tmp_path):
    signer = TransitSigner("stepguard-signing", client=vault_client)
    versions = sorted(transit_public_keys(vault_client, "stepguard-signing"))
    signed = sign_model(model, signer, bundle_path=tmp_path / "m.sig")
    ok = verify_model(model, tmp_path / "m.sig",
                      TransitPolicy("stepguard-signing", client=vault_client, versions=versions))
    # The verifier names the signer exactly as the signer names itself (key, version, key hint).
    assert ok.signer == signed.signer == signer.identity


def test_transit_bundle_verifies_with_stock_cli(vault_client, transit_key, model, tmp_path):
    sig = tmp_path / "m.sig"
    sign_model(model, TransitSigner(transit_key, client=vault_client), bundle_path=sig)
    pem = vault_client.secrets.transit.read_key(name=transit_key)["data"]["keys"]["1"]["public_key"]
    pub = tmp_path / "transit.pub"
    pub.write_text(pem)
    res = subprocess.run([str(Path(sys.executable).parent / "model_signing"), "verify", "key",
                          str(model), "--signature", str(sig), "--public_key", str(pub)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    import json

    keyid = json.loads(sig.read_text())["dsseEnvelope"]["signatures"][0]["keyid"]
    assert keyid == f"transit:transit/{transit_key}:v1"


def test_rotation_keeps_allowed_old_versions(vault_client, transit_key, model, tmp_path):
    old = tmp_path / "v1.sig"
    sign_model(model, TransitSigner(transit_key, client=vault_client), bundle_path=old)
    vault_client.secrets.transit.rotate_key(name=transit_key)
    new = tmp_path / "v2.sig"
    sign_model(model, TransitSigner(transit_key, client=vault_client), bundle_path=new)
    import json

    assert json.loads(new.read_text())["dsseEnvelope"]["signatures"][0]["keyid"].endswith(":v2")
    both = TransitPolicy(transit_key, client=vault_client, versions=(1, 2))
    verify_model(model, old, both)
    verify_model(model, new, both)
    only_new = TransitPolicy(transit_key, client=vault_client, min_version=2)
    verify_model(model, new, only_new)
    with pytest.raises(SignatureError, match="v1, which the policy does not accept"):
        verify_model(model, old, only_new)


def test_other_transit_key_refused(vault_client, transit_key, model, tmp_path):
    sig = tmp_path / "m.sig"
    sign_model(model, TransitSigner(transit_key, client=vault_client), bundle_path=sig)
    with pytest.raises(SignatureError):
        verify_model(model, sig, TransitPolicy("stepguard-signing", client=vault_client,
                                               min_version=1))


def test_signer_from_spec_and_token_never_printed(dev_stack, model, tmp_path):
    from stepguard.credentials import VaultClient, VaultConfig

    client = VaultClient(VaultConfig(addr=dev_stack.vault_addr, auth=None),
                         dev_stack.vault_root_token)
    signer = signer_from_spec(SigningSpec(signer="transit", key="stepguard-signing"),
                              vault_client=client.hvac())
    signed = sign_model(model, signer)
    token = dev_stack.vault_root_token
    texts = [repr(signer), signer.identity, repr(signed), signed.bundle.decode()]
    for t in texts:
        for form in (token, token.upper(), base64.b64encode(token.encode()).decode()):
            assert form not in t


def test_policy_requires_versions(vault_client):
    from stepguard.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="versions"):
        TransitPolicy("stepguard-signing", client=vault_client)


def test_parse_transit_policy(vault_client, transit_key, model, tmp_path):
    from stepguard.signing import parse_policy

    sig = tmp_path / "m.sig"
    sign_model(model, TransitSigner(transit_key, client=vault_client), bundle_path=sig)
    verify_model(model, sig, parse_policy(f"transit:key={transit_key};versions=1",
                                          vault_client=vault_client))
    vault_client.secrets.transit.rotate_key(name=transit_key)
    with pytest.raises(SignatureError):
        verify_model(model, sig, parse_policy(f"transit:key={transit_key};min_version=2",
                                              vault_client=vault_client))


def test_refused_token_never_in_errors(dev_stack, model):
    import hvac

    from stepguard.errors import CredentialDenied

    canary = "hvs.CANARYtoken0123456789abcdef"
    client = hvac.Client(url=dev_stack.vault_addr, token=canary, timeout=10)
    with pytest.raises(CredentialDenied) as exc:
        sign_model(model, TransitSigner("stepguard-signing", client=client))
    text = exc.value.diagnostics() + repr(exc.value)
    for form in (canary, canary.upper(), base64.b64encode(canary.encode()).decode()):
        assert form not in text
    assert canary not in repr(TransitSigner("stepguard-signing", client=client))
