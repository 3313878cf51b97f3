"""Models with git files, against the stock ``model_signing`` CLI (red-team finding 8).

Every Hugging Face checkout has a ``.gitattributes`` (and a clone has ``.git/``). The stock tool
leaves top-level git paths out of a signature by default (``--ignore-git-paths``) and records them
in ``ignore_paths``; a stepguard signature that listed ``.gitattributes`` among the signed files
*and* declared it ignored failed ``model_signing verify key`` with "Missing files in model". Both
directions are checked here with a key file; the Transit direction (we sign with a real Transit
key, the stock CLI verifies) needs the dev stack.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from stepguard.errors import IntegrityError
from stepguard.signing import (
    KeyPolicy,
    KeySigner,
    TransitPolicy,
    TransitSigner,
    sign_model,
    verify_model,
)

MS_CLI = str(Path(sys.executable).parent / "model_signing")


def _stock(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MS_CLI, *args], capture_output=True, text=True, timeout=120)


def _hf_checkout(model: Path) -> Path:
    (model / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (model / ".gitignore").write_text("__pycache__/\n")
    (model / ".git").mkdir()
    (model / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return model


def _statement(sig: Path) -> dict:
    return json.loads(base64.b64decode(json.loads(sig.read_text())["dsseEnvelope"]["payload"]))


def test_we_sign_a_checkout_and_the_stock_cli_verifies(model: Path, keys, tmp_path: Path) -> None:
    _hf_checkout(model)
    sig = tmp_path / "m.sig"
    signed = sign_model(model, KeySigner(keys.private), bundle_path=sig)
    res = _stock("verify", "key", str(model), "--signature", str(sig),
                 "--public_key", str(keys.public))
    assert res.returncode == 0, res.stdout + res.stderr
    assert not any(f.startswith(".git") for f in signed.files)
    assert {".gitattributes", ".git"} <= set(
        _statement(sig)["predicate"]["serialization"]["ignore_paths"])
    verify_model(model, sig, KeyPolicy(public_keys=(keys.public,)))


def test_the_stock_cli_signs_a_checkout_and_we_verify(model: Path, keys, tmp_path: Path) -> None:
    _hf_checkout(model)
    sig = tmp_path / "stock.sig"
    res = _stock("sign", "key", str(model), "--private_key", str(keys.private),
                 "--signature", str(sig))
    assert res.returncode == 0, res.stdout + res.stderr
    ok = verify_model(model, sig, KeyPolicy(public_keys=(keys.public,)))
    assert set(ok.files) == {"model.safetensors", "config.json", "tokenizer/vocab.txt",
                             "model.onnx"}
    # Both tools hash the same files the same way: identical root digests.
    ours = sign_model(model, KeySigner(keys.private))
    assert ours.root_digest == ok.root_digest


def test_git_files_below_the_top_are_model_files(model: Path, keys, tmp_path: Path) -> None:
    """Only the top-level git paths are outside the signature, as in model_signing."""
    sig = tmp_path / "m.sig"
    sign_model(model, KeySigner(keys.private), bundle_path=sig)
    (model / "tokenizer" / ".gitattributes").write_text("* -text\n")
    with pytest.raises(IntegrityError, match="tokenizer/.gitattributes"):
        verify_model(model, sig, KeyPolicy(public_keys=(keys.public,)))
    res = _stock("verify", "key", str(model), "--signature", str(sig),
                 "--public_key", str(keys.public))
    assert res.returncode != 0


@pytest.mark.services
def test_transit_signed_checkout_verifies_with_the_stock_cli(vault_client, model: Path,
                                                             tmp_path: Path) -> None:
    name = f"stepguard-test-{uuid.uuid4().hex[:8]}"
    vault_client.secrets.transit.create_key(name=name, key_type="ecdsa-p256")
    _hf_checkout(model)
    sig = tmp_path / "m.sig"
    sign_model(model, TransitSigner(name, client=vault_client), bundle_path=sig)
    pem = vault_client.secrets.transit.read_key(name=name)["data"]["keys"]["1"]["public_key"]
    pub = tmp_path / "transit.pub"
    pub.write_text(pem)
    res = _stock("verify", "key", str(model), "--signature", str(sig), "--public_key", str(pub))
    assert res.returncode == 0, res.stdout + res.stderr
    verify_model(model, sig, TransitPolicy(name, client=vault_client, versions=(1,)))
