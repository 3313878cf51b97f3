"""Model registries (local directory, S3) where publishing signs and fetching verifies.

``publish`` signs the model and uploads its files with SHA-256 checksums, then the signature
bundle last as the commit marker; ``fetch`` downloads into staging and returns a path only after
the signature, the policy, every digest and the format checks pass. Versions are immutable;
publishing the same bytes again returns the existing record, other bytes raise
:class:`~stepguard.errors.VersionConflict`.
Registries know nothing of settings: ``stepguard.wiring.fetch_verified`` is the deployment gate
that opens the settings' registry and policy.

>>> import tempfile, pathlib, warnings
>>> from cryptography.hazmat.primitives.asymmetric import ec
>>> from cryptography.hazmat.primitives import serialization as s
>>> from stepguard.registry import open_registry
>>> from stepguard.signing import KeySigner, KeyPolicy
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> key = ec.generate_private_key(ec.SECP256R1())
>>> _ = (d / "k.pem").write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8,
...                                                 s.NoEncryption()))
>>> pub = key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)
>>> (d / "model").mkdir()
>>> _ = (d / "model" / "model.onnx").write_bytes(b"onnx-bytes")
>>> reg = open_registry(f"file://{d}/registry")
>>> rec = reg.publish(d / "model", "demo", "1.0.0", signer=KeySigner(d / "k.pem"))
>>> [(e.name, e.version) for e in reg.list()]
[('demo', '1.0.0')]
>>> path = reg.fetch("demo", "1.0.0", policy=KeyPolicy(public_keys=(pub,)), dest=d / "out")
>>> (path / "model.onnx").read_bytes()
b'onnx-bytes'
>>> reg.publish(d / "model", "demo", "1.0.0", signer=KeySigner(d / "k.pem")) == rec
True
>>> _ = (d / "model" / "model.onnx").write_bytes(b"other-bytes")
>>> reg.publish(d / "model", "demo", "1.0.0", signer=KeySigner(d / "k.pem"))
Traceback (most recent call last):
...
stepguard.errors.VersionConflict: version exists with other content (immutable): demo:1.0.0
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlparse

from stepguard.errors import ConfigurationError
from stepguard.registry._base import (
    BUNDLE_NAME,
    PROVENANCE_NAME,
    FetchedModel,
    PublishedModel,
    Registry,
    RegistryEntry,
)
from stepguard.registry._local import LocalRegistry
from stepguard.registry._s3 import S3Registry

__all__ = [
    "BUNDLE_NAME",
    "PROVENANCE_NAME",
    "FetchedModel",
    "LocalRegistry",
    "PublishedModel",
    "Registry",
    "RegistryEntry",
    "S3Registry",
    "open_registry",
]


def open_registry(url: str, *, s3_client: Any = None) -> Registry:
    """Open ``file:///path`` or ``s3://bucket/prefix`` (endpoint from ``AWS_ENDPOINT_URL``).

    >>> open_registry("ftp://x")
    Traceback (most recent call last):
    ...
    stepguard.errors.ConfigurationError: registry URL must be file:// or s3://: ftp://x
    """
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path:
            raise ConfigurationError("file registry URL must be file:///absolute/path",
                                     subject=url)
        return LocalRegistry(unquote(parsed.path))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigurationError("s3 registry URL needs a bucket", subject=url)
        return S3Registry(parsed.netloc, parsed.path.lstrip("/"), client=s3_client)
    raise ConfigurationError("registry URL must be file:// or s3://", subject=url)
