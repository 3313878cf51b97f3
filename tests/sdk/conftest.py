"""Shared fixtures for the signing and registry tests: key pairs and small models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec


@dataclass
class KeyPair:
    private: Path
    public: Path


def _keypair(d: Path, name: str) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    priv = d / f"{name}.pem"
    pub = d / f"{name}.pub"
    priv.write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(s.Encoding.PEM,
                                                  s.PublicFormat.SubjectPublicKeyInfo))
    return KeyPair(priv, pub)


@pytest.fixture
def keys(tmp_path: Path) -> KeyPair:
    return _keypair(tmp_path, "signer")


@pytest.fixture
def other_keys(tmp_path: Path) -> KeyPair:
    return _keypair(tmp_path, "attacker")


def make_model(root: Path, seed: bytes = b"v1") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + seed * 300)
    (root / "config.json").write_text('{"hidden": 8}\n')
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "vocab.txt").write_text("a\nb\nc\n")
    (root / "model.onnx").write_bytes(b"\x08\x07onnx" + seed)
    return root


@pytest.fixture
def mk():
    """The model factory: ``mk(dir, seed=b"v1")``."""
    return make_model


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_model(tmp_path / "model")
