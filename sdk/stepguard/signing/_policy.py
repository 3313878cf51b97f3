"""Verification policies. There is no default: every verification names who may have signed."""

from __future__ import annotations

import abc
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepguard.errors import ConfigurationError, SignatureError
from stepguard.signing._bundle import Envelope, pae, parse_envelope, public_key_hint


class UnsafeVerificationWarning(UserWarning):
    """Emitted every time a signature check is skipped through an ``unsafe_`` option."""


@dataclass(frozen=True)
class Verified:
    """An authenticated DSSE payload and who signed it."""

    payload_type: str
    payload: bytes
    signer: str


class Policy(abc.ABC):
    """Who may sign, plus what content is acceptable: ``allow_pickle``, and ``allowed_formats``
    -- when set, every file's content must be one of these kinds (``safetensors``, ``onnx``,
    ``gguf``, ``numpy``, ``json``, ``text``, ``zip``, ``compressed``); anything unrecognised is
    refused."""

    allow_pickle: bool
    allowed_formats: tuple[str, ...] | None = None

    @abc.abstractmethod
    def verify_bundle(self, bundle: Mapping[str, Any], *, subject: str = "bundle") -> Verified:
        """Check the bundle's signature against this policy; raise SignatureError if not."""

    @abc.abstractmethod
    def describe(self) -> str:
        """A one-line description for logs and receipts."""


def _load_public_key(source: Path | str | bytes, label: str) -> tuple[str, Any]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if isinstance(source, bytes):
        data = source
    elif isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
        data = source.encode()
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"cannot read public key ({exc.strerror})",
                                     subject=str(source)) from exc
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigurationError("not a PEM public key", subject=label) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigurationError("public key must be an EC key", subject=label)
    pem = key.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return public_key_hint(pem), key


def _verify_with_keys(env: Envelope, keys: Iterable[tuple[str, str, Any]],
                      subject: str) -> str:
    """``keys``: (label, hint, public key). Returns the label of the key that verified."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec

    from stepguard.signing._signers import _ec_hash

    candidates = list(keys)
    if env.hint is not None:
        candidates = [k for k in candidates if k[1] == env.hint]
        if not candidates:
            raise SignatureError(
                "signed by a key the policy does not accept", subject=subject,
                details=(f"bundle key hint sha256:{env.hint}",))
    message = pae(env.payload_type, env.payload)
    for label, _, key in candidates:
        try:
            key.verify(env.signature, message, ec.ECDSA(_ec_hash(key)))
        except InvalidSignature:
            continue
        return label
    raise SignatureError("signature does not verify with any key the policy accepts",
                         subject=subject)


@dataclass(frozen=True)
class KeyPolicy(Policy):
    """Accept signatures made by any of these EC public keys (PEM paths, PEM text or bytes).

    >>> KeyPolicy(public_keys=())
    Traceback (most recent call last):
    ...
    stepguard.errors.ConfigurationError: a key policy needs at least one public key
    """

    public_keys: tuple[Path | str | bytes, ...]
    allow_pickle: bool = False
    allowed_formats: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_keys", tuple(self.public_keys))
        if not self.public_keys:
            raise ConfigurationError("a key policy needs at least one public key")

    def describe(self) -> str:
        return f"key policy ({len(self.public_keys)} key(s))"

    def verify_bundle(self, bundle: Mapping[str, Any], *, subject: str = "bundle") -> Verified:
        env = parse_envelope(bundle, subject=subject)
        keys = []
        for i, src in enumerate(self.public_keys):
            hint, key = _load_public_key(src, f"public_keys[{i}]")
            keys.append((f"key:sha256:{hint}", hint, key))
        label = _verify_with_keys(env, keys, subject)
        return Verified(env.payload_type, env.payload, label)


@dataclass(frozen=True)
class TransitPolicy(Policy):
    """Accept signatures by the given versions of a Vault Transit key.

    Public keys are read from ``<mount>/keys/<key>`` (``client``: an authenticated
    ``hvac.Client``). ``versions`` lists accepted versions; ``min_version`` accepts that version
    and every later one. One of them is required: after a rotation, old signatures stay valid
    exactly as long as the policy still names their version.
    """

    key: str
    client: Any = field(repr=False, compare=False)
    versions: tuple[int, ...] = ()
    min_version: int | None = None
    mount: str = "transit"
    allow_pickle: bool = False
    allowed_formats: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "versions", tuple(int(v) for v in self.versions))
        if not self.versions and self.min_version is None:
            raise ConfigurationError("a Transit policy must name accepted key versions "
                                     "('versions' or 'min_version')", subject=self.key)

    def describe(self) -> str:
        acc = ",".join(f"v{v}" for v in self.versions) or f">=v{self.min_version}"
        return f"transit policy {self.mount}/{self.key} ({acc})"

    def _accepts(self, version: int) -> bool:
        if version in self.versions:
            return True
        return self.min_version is not None and version >= self.min_version

    def verify_bundle(self, bundle: Mapping[str, Any], *, subject: str = "bundle") -> Verified:
        from stepguard.signing._signers import transit_public_keys

        env = parse_envelope(bundle, subject=subject)
        all_keys = transit_public_keys(self.client, self.key, self.mount)
        keys = []
        refused = []
        for version, pem in sorted(all_keys.items()):
            hint, key = _load_public_key(pem, f"{self.key} v{version}")
            if self._accepts(version):
                # The same identity the Transit signer records: key, version and public key.
                keys.append((f"transit:{self.mount}/{self.key}:v{version}:sha256:{hint}", hint,
                             key))
            else:
                refused.append((version, hint))
        for version, hint in refused:
            if env.hint == hint:
                raise SignatureError(
                    f"signed by Transit key version v{version}, which the policy does not accept",
                    subject=subject, details=(self.describe(),))
        label = _verify_with_keys(env, keys, subject)
        return Verified(env.payload_type, env.payload, label)


@dataclass(frozen=True)
class SigstorePolicy(Policy):
    """Accept keyless Sigstore signatures by this identity (SAN) from this OIDC issuer.

    ``trust_config``: a client trust config JSON for a private Sigstore (its trusted root is
    used); without it, the public-good trusted root (network access for TUF).
    """

    identity: str
    issuer: str
    trust_config: Path | None = None
    allow_pickle: bool = False
    allowed_formats: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.identity or not self.issuer:
            raise ConfigurationError("a Sigstore policy needs an identity and an issuer")

    def describe(self) -> str:
        return f"sigstore policy {self.identity} from {self.issuer}"

    def verify_bundle(self, bundle: Mapping[str, Any], *, subject: str = "bundle") -> Verified:
        import json

        from sigstore.errors import Error as SigstoreError
        from sigstore.models import Bundle, ClientTrustConfig
        from sigstore.verify import Verifier, policy

        parse_envelope(bundle, subject=subject)  # same shape checks as key bundles
        try:
            if self.trust_config is not None:
                trust = ClientTrustConfig.from_json(Path(self.trust_config).read_text())
            else:
                trust = ClientTrustConfig.production()
            verifier = Verifier(trusted_root=trust.trusted_root)
            sbundle = Bundle.from_json(json.dumps(dict(bundle)))
            ptype, payload = verifier.verify_dsse(
                sbundle, policy.Identity(identity=self.identity, issuer=self.issuer))
        except (SigstoreError, ValueError) as exc:
            raise SignatureError("Sigstore signature does not satisfy the policy",
                                 subject=subject, details=(str(exc)[:500],)) from exc
        return Verified(ptype, payload, f"sigstore:{self.identity}@{self.issuer}")


@dataclass(frozen=True)
class UnsafeSkipVerification(Policy):
    """Accept any signer (integrity is still checked against the unauthenticated payload)."""

    reason: str
    allow_pickle: bool = False
    allowed_formats: tuple[str, ...] | None = None

    def describe(self) -> str:
        return f"UNSAFE: signature not verified ({self.reason})"

    def verify_bundle(self, bundle: Mapping[str, Any], *, subject: str = "bundle") -> Verified:
        warnings.warn(f"signature verification SKIPPED for {subject}: {self.reason}",
                      UnsafeVerificationWarning, stacklevel=3)
        env = parse_envelope(bundle, subject=subject)
        return Verified(env.payload_type, env.payload, "unverified")


def unsafe_skip_verification(reason: str, *, allow_pickle: bool = False,
                             allowed_formats: tuple[str, ...] | None = None) -> Policy:
    """A policy that does not check who signed. Warns on creation and on every use.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     p = unsafe_skip_verification("local experiment")
    >>> "UNSAFE" in p.describe(), len(w)
    (True, 1)
    """
    if not reason:
        raise ConfigurationError("unsafe_skip_verification needs a reason")
    warnings.warn(f"unsafe_skip_verification: signatures will not be checked ({reason})",
                  UnsafeVerificationWarning, stacklevel=2)
    return UnsafeSkipVerification(reason=reason, allow_pickle=allow_pickle,
                                  allowed_formats=allowed_formats)


_POLICY_FIELDS = {
    "key": {"keys", "allow_pickle", "formats"},
    "transit": {"key", "versions", "min_version", "mount", "allow_pickle", "formats"},
    "sigstore": {"identity", "issuer", "trust_config", "allow_pickle", "formats"},
}


def parse_policy(text: str, *, vault_client: Any = None) -> Policy:
    """Build a policy from its one-line form (as in ``InputSpec.signature_policy``).

    ``KIND:field=value;field=value``, with ``,`` inside list values:

    * ``key:keys=/etc/sg/ingest.pub,/etc/sg/old.pub`` (or just ``key:/etc/sg/ingest.pub``)
    * ``transit:key=stepguard-signing;versions=1,2`` or ``...;min_version=2`` (``mount=``)
    * ``sigstore:identity=ci@example.com;issuer=https://token.actions.githubusercontent.com``
      (``trust_config=/path``)

    Any kind takes ``allow_pickle=true`` and ``formats=safetensors,onnx,gguf,json,text`` (a
    content allow-list: anything else is refused). Transit reads public keys with
    ``vault_client`` (an authenticated ``hvac.Client``; ``stepguard.wiring`` makes one from
    settings). There is no form without a signer: that is the point.

    >>> parse_policy("sigstore:identity=ci@example.com;issuer=https://issuer.example").describe()
    'sigstore policy ci@example.com from https://issuer.example'
    >>> parse_policy("key:")
    Traceback (most recent call last):
    ...
    stepguard.errors.ConfigurationError: a key policy needs at least one public key
    >>> parse_policy("anyone")
    Traceback (most recent call last):
    ...
    stepguard.errors.ConfigurationError: unknown policy kind (key, transit, sigstore): anyone
    """
    kind, sep, rest = text.partition(":")
    kind = kind.strip()
    if not sep or kind not in _POLICY_FIELDS:
        raise ConfigurationError("unknown policy kind (key, transit, sigstore)", subject=text)
    fields: dict[str, str] = {}
    if kind == "key" and "=" not in rest:
        fields["keys"] = rest
    else:
        for item in filter(None, (p.strip() for p in rest.split(";"))):
            name, eq, value = item.partition("=")
            if not eq or name not in _POLICY_FIELDS[kind]:
                raise ConfigurationError(f"unknown {kind} policy field {name!r}", subject=text)
            fields[name] = value.strip()
    allow = fields.pop("allow_pickle", "false").lower() in ("1", "true", "yes")
    formats = None
    if "formats" in fields:
        from stepguard.signing._formats import check_allowed_formats

        formats = check_allowed_formats([f for f in fields.pop("formats").split(",") if f])
    if kind == "key":
        keys = tuple(Path(k) for k in fields.get("keys", "").split(",") if k)
        return KeyPolicy(public_keys=keys, allow_pickle=allow, allowed_formats=formats)
    if kind == "transit":
        client = vault_client
        if client is None:
            raise ConfigurationError("a Transit policy needs a Vault client", subject=text,
                                     hint="build policies from settings with stepguard.wiring")
        versions = tuple(int(v) for v in fields.get("versions", "").split(",") if v)
        minv = int(fields["min_version"]) if fields.get("min_version") else None
        return TransitPolicy(fields.get("key", ""), client=client, versions=versions,
                             min_version=minv, mount=fields.get("mount", "transit"),
                             allow_pickle=allow, allowed_formats=formats)
    tc = fields.get("trust_config")
    return SigstorePolicy(fields.get("identity", ""), fields.get("issuer", ""),
                          trust_config=Path(tc) if tc else None, allow_pickle=allow,
                          allowed_formats=formats)
