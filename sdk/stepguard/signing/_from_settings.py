"""Verification policies named in stepguard settings (``policies:``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stepguard.settings import Settings
    from stepguard.signing._policy import Policy


@contextlib.contextmanager
def policy_from_settings(settings: Settings, name: str) -> Iterator[Policy]:
    """The verification policy called ``name`` in ``settings``, ready to verify with.

    A Transit policy reads the key's public versions from Vault with a login made for this block
    (the configured auth method), revoked when the block ends: use the policy inside it.

    >>> import tempfile, pathlib
    >>> from cryptography.hazmat.primitives.asymmetric import ec
    >>> from cryptography.hazmat.primitives import serialization as s
    >>> from stepguard.settings import Settings
    >>> from stepguard.signing import policy_from_settings
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    >>> _ = (d / "release.pub").write_bytes(pub.public_bytes(s.Encoding.PEM,
    ...                                     s.PublicFormat.SubjectPublicKeyInfo))
    >>> settings = Settings.from_dict({"policies": {"release": {
    ...     "kind": "key", "public_keys": [str(d / "release.pub")]}}})
    >>> with policy_from_settings(settings, "release") as policy:
    ...     print(type(policy).__name__)
    KeyPolicy
    >>> with policy_from_settings(settings, "prod"):
    ...     pass
    Traceback (most recent call last):
    ...
    stepguard.errors.ConfigurationError: no such verification policy: policies.prod
    """
    from stepguard._private.publishing import build_policy, vault_client

    named = settings.policy(name)
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(vault_client(settings)) if named.kind == "transit" else None
        yield build_policy(named, settings, client)
