"""Signers: an EC key file, a Vault Transit key, Sigstore keyless. All emit bundle JSON bytes."""

from __future__ import annotations

import abc
import base64
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepguard.errors import (
    ConfigurationError,
    CredentialDenied,
    OperationalError,
    SignatureError,
    TransientError,
)
from stepguard.signing._bundle import (
    INTOTO_PAYLOAD_TYPE,
    build_key_bundle,
    dump_bundle,
    pae,
    public_key_hint,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from stepguard.spec import SigningSpec

_CURVE_HASH = {"secp256r1": "SHA256", "secp384r1": "SHA384", "secp521r1": "SHA512"}


def _spki_pem(public_key: ec.EllipticCurvePublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _ec_hash(public_key: ec.EllipticCurvePublicKey) -> Any:
    from cryptography.hazmat.primitives import hashes

    name = _CURVE_HASH.get(public_key.curve.name)
    if name is None:
        raise ConfigurationError(f"unsupported EC curve {public_key.curve.name!r} "
                                 "(P-256, P-384, P-521)")
    return getattr(hashes, name)()


class Signer(abc.ABC):
    """Signs DSSE payloads into OpenSSF model-signing (Sigstore bundle v0.3) bundles."""

    @property
    @abc.abstractmethod
    def identity(self) -> str:
        """Who signs, for receipts and audit (never a secret): e.g. ``key:sha256:<hex>``."""

    @abc.abstractmethod
    def sign_dsse(self, payload: bytes, payload_type: str = INTOTO_PAYLOAD_TYPE) -> bytes:
        """Sign ``payload`` as a DSSE envelope; return the bundle as JSON bytes."""


@dataclass(frozen=True)
class KeySigner(Signer):
    """Sign with an EC private key file (PEM; P-256/384/521), like ``model_signing sign key``.

    >>> import tempfile, pathlib
    >>> from cryptography.hazmat.primitives.asymmetric import ec
    >>> from cryptography.hazmat.primitives import serialization as s
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> key = ec.generate_private_key(ec.SECP256R1())
    >>> _ = (d / "k.pem").write_bytes(key.private_bytes(s.Encoding.PEM,
    ...     s.PrivateFormat.PKCS8, s.NoEncryption()))
    >>> KeySigner(d / "k.pem").identity.startswith("key:sha256:")
    True
    """

    private_key_path: Path
    password: str | None = field(default=None, repr=False)

    def _load(self) -> Any:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        try:
            data = Path(self.private_key_path).read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"cannot read signing key ({exc.strerror})",
                                     subject=str(self.private_key_path)) from exc
        try:
            key = serialization.load_pem_private_key(
                data, self.password.encode() if self.password else None)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError("signing key is not a usable PEM private key",
                                     subject=str(self.private_key_path)) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigurationError("signing key must be an EC key (P-256/384/521)",
                                     subject=str(self.private_key_path))
        _ec_hash(key.public_key())
        return key

    def public_key_pem(self) -> bytes:
        """The SubjectPublicKeyInfo PEM of this key (what verifiers are given)."""
        return _spki_pem(self._load().public_key())

    @property
    def identity(self) -> str:
        return "key:sha256:" + public_key_hint(self.public_key_pem())

    def sign_dsse(self, payload: bytes, payload_type: str = INTOTO_PAYLOAD_TYPE) -> bytes:
        from cryptography.hazmat.primitives.asymmetric import ec

        key = self._load()
        pub = key.public_key()
        sig = key.sign(pae(payload_type, payload), ec.ECDSA(_ec_hash(pub)))
        return dump_bundle(build_key_bundle(payload, sig, hint=public_key_hint(_spki_pem(pub)),
                                            payload_type=payload_type))


# -- Vault Transit ----------------------------------------------------------------------------


def _vault_error(exc: Exception, what: str, subject: str) -> Exception:
    import hvac.exceptions as hx
    import requests

    if isinstance(exc, hx.Forbidden | hx.Unauthorized):
        return CredentialDenied(f"Vault refused {what}", subject=subject)
    if isinstance(exc, hx.InvalidPath):
        return ConfigurationError(f"Vault has no such Transit key ({what})", subject=subject)
    if isinstance(exc, hx.VaultDown | hx.InternalServerError | hx.BadGateway |
                  requests.ConnectionError | requests.Timeout):
        return TransientError(f"Vault unreachable during {what}", subject=subject)
    return OperationalError(f"Vault failed during {what}: {type(exc).__name__}", subject=subject)


def transit_public_keys(client: Any, key: str, mount: str = "transit") -> dict[int, bytes]:
    """Version -> SubjectPublicKeyInfo PEM of every version of a Transit key still in Vault."""
    from cryptography.hazmat.primitives import serialization

    subject = f"{mount}/keys/{key}"
    try:
        resp = client.secrets.transit.read_key(name=key, mount_point=mount)
    except Exception as exc:
        raise _vault_error(exc, "reading the Transit key", subject) from exc
    data = resp.get("data", {}) if isinstance(resp, dict) else {}
    if data.get("type") not in ("ecdsa-p256", "ecdsa-p384", "ecdsa-p521"):
        raise ConfigurationError(f"Transit key type {data.get('type')!r} is not ECDSA "
                                 "(model-signing bundles need ecdsa-p256/384/521)", subject=subject)
    out: dict[int, bytes] = {}
    for version, info in (data.get("keys") or {}).items():
        pem = info.get("public_key") if isinstance(info, dict) else None
        if pem:
            # Re-serialize: the key hint is defined over cryptography's canonical PEM.
            pub = serialization.load_pem_public_key(pem.encode())
            out[int(version)] = _spki_pem(pub)  # type: ignore[arg-type]
    return out


@dataclass(frozen=True)
class TransitSigner(Signer):
    """Sign with a Vault/OpenBao Transit key; the private key never leaves Vault.

    Vault signs the DSSE pre-authentication encoding (``prehashed=false``, ``sha2-256``,
    ``asn1`` marshaling). The bundle carries the hint of the public key of the version that
    signed and ``keyid = "transit:<mount>/<key>:v<N>"``; it verifies with the stock
    ``model_signing verify key --public_key`` given that version's PEM.
    ``client`` is an authenticated ``hvac.Client`` (e.g. under the step's child token).
    """

    key: str
    client: Any = field(repr=False, compare=False)
    mount: str = "transit"
    key_version: int | None = None

    def _version_and_pem(self) -> tuple[int, bytes]:
        keys = transit_public_keys(self.client, self.key, self.mount)
        if not keys:
            raise ConfigurationError("Transit key has no usable versions",
                                     subject=f"{self.mount}/keys/{self.key}")
        version = self.key_version or max(keys)
        if version not in keys:
            raise ConfigurationError(f"Transit key has no version {version}",
                                     subject=f"{self.mount}/keys/{self.key}")
        return version, keys[version]

    @property
    def identity(self) -> str:
        version, pem = self._version_and_pem()
        return f"transit:{self.mount}/{self.key}:v{version}:sha256:{public_key_hint(pem)}"

    def sign_dsse(self, payload: bytes, payload_type: str = INTOTO_PAYLOAD_TYPE) -> bytes:
        version, pem = self._version_and_pem()
        subject = f"{self.mount}/sign/{self.key}"
        try:
            resp = self.client.secrets.transit.sign_data(
                name=self.key,
                hash_input=base64.b64encode(pae(payload_type, payload)).decode(),
                key_version=version,
                hash_algorithm="sha2-256",
                prehashed=False,
                marshaling_algorithm="asn1",
                mount_point=self.mount,
            )
        except Exception as exc:
            raise _vault_error(exc, "Transit signing", subject) from exc
        text = str(resp["data"]["signature"])
        prefix, _, b64sig = text.rpartition(":")
        if prefix != f"vault:v{version}":
            raise SignatureError("Vault signed with an unexpected key version", subject=subject,
                                 details=(f"asked v{version}, got {prefix!r}",))
        sig = base64.b64decode(b64sig)
        return dump_bundle(build_key_bundle(
            payload, sig, hint=public_key_hint(pem), payload_type=payload_type,
            keyid=f"transit:{self.mount}/{self.key}:v{version}"))


# -- Sigstore keyless --------------------------------------------------------------------------


@dataclass(frozen=True)
class SigstoreSigner(Signer):
    """Keyless Sigstore signing: an OIDC token -> Fulcio certificate -> Rekor entry.

    ``identity_token`` is an explicit OIDC token (a secret; never printed); without it an ambient
    credential is detected (GitHub Actions, GCP, ...). ``trust_config`` points at a client trust
    config JSON for a private Sigstore; without it the public-good instance is used (which needs
    network access to fulcio/rekor.sigstore.dev).
    """

    identity_token: str | None = field(default=None, repr=False)
    trust_config: Path | None = None
    use_ambient_credentials: bool = True

    @property
    def identity(self) -> str:
        """``sigstore:<identity>@<issuer>`` from the token's claims when one is at hand."""
        where = str(self.trust_config) if self.trust_config else "public-good"
        if self.identity_token:
            from sigstore.oidc import IdentityError, IdentityToken

            try:
                tok = IdentityToken(self.identity_token)
                return f"sigstore:{tok.identity}@{tok.federated_issuer or tok.issuer}"
            except IdentityError:
                pass
        return f"sigstore:{where}"

    def _trust(self) -> Any:
        from sigstore.models import ClientTrustConfig

        if self.trust_config is None:
            return ClientTrustConfig.production()
        try:
            return ClientTrustConfig.from_json(Path(self.trust_config).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigurationError("cannot load Sigstore trust config",
                                     subject=str(self.trust_config)) from exc

    def _token(self) -> Any:
        from sigstore.oidc import IdentityError, IdentityToken, detect_credential

        raw = self.identity_token
        if raw is None and self.use_ambient_credentials:
            try:
                raw = detect_credential()
            except IdentityError as exc:
                raise CredentialDenied("ambient OIDC credential detection failed") from exc
        if not raw:
            raise ConfigurationError("no OIDC identity token for Sigstore signing",
                                     hint="set identity_token_env in the signing spec")
        try:
            return IdentityToken(raw)
        except IdentityError as exc:
            raise CredentialDenied("OIDC identity token was refused for Sigstore",
                                   details=(str(exc).replace(raw, "<token>"),)) from exc

    def sign_dsse(self, payload: bytes, payload_type: str = INTOTO_PAYLOAD_TYPE) -> bytes:
        from sigstore import dsse
        from sigstore.sign import SigningContext

        if payload_type != INTOTO_PAYLOAD_TYPE:
            raise ConfigurationError("Sigstore DSSE signing supports in-toto payloads only")
        token = self._token()
        ctx = SigningContext.from_trust_config(self._trust())
        try:
            with ctx.signer(token) as signer:
                bundle = signer.sign_dsse(dsse.Statement(payload))
        except Exception as exc:
            msg = str(exc)
            if self.identity_token:
                msg = msg.replace(self.identity_token, "<token>")
            raise OperationalError("Sigstore signing failed (Fulcio/Rekor)",
                                   details=(f"{type(exc).__name__}: {msg}"[:500],)) from exc
        return str(bundle.to_json()).encode()


# -- construction from a step spec -------------------------------------------------------------


def signer_from_spec(spec: SigningSpec, *, vault_client: Any = None,
                     environ: Mapping[str, str] | None = None) -> Signer:
    """Build the signer a :class:`~stepguard.spec.SigningSpec` asks for.

    ``key``: ``spec.key`` is a PEM private key path. ``transit``: ``spec.key`` is the Transit key
    name and ``vault_client`` an authenticated ``hvac.Client`` (``stepguard.wiring`` hands one
    over: the step token's, or a login made from settings). ``sigstore``: the token is read from
    ``environ[spec.identity_token_env]`` (ambient detection when unset).

    >>> from stepguard.spec import SigningSpec
    >>> signer_from_spec(SigningSpec(signer="key"))
    Traceback (most recent call last):
    ...
    stepguard.errors.ConfigurationError: 'key' (a PEM private key path) is required: signing.key
    >>> signer_from_spec(SigningSpec(signer="transit", key="release"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    stepguard.errors.ConfigurationError: Transit signing needs a Vault client: signing.transit
    """
    env = os.environ if environ is None else environ
    if spec.signer == "key":
        if not spec.key:
            raise ConfigurationError("'key' (a PEM private key path) is required",
                                     subject="signing.key")
        return KeySigner(Path(spec.key))
    if spec.signer == "transit":
        if not spec.key:
            raise ConfigurationError("'key' (the Transit key name) is required",
                                     subject="signing.key")
        if vault_client is None:
            raise ConfigurationError("Transit signing needs a Vault client",
                                     subject="signing.transit",
                                     hint="build signers from settings with stepguard.wiring")
        return TransitSigner(spec.key, client=vault_client, mount=spec.transit_mount)
    if spec.signer == "sigstore":
        token = None
        if spec.identity_token_env:
            token = env.get(spec.identity_token_env)
            if not token:
                raise ConfigurationError("identity token variable is empty or unset",
                                         subject=spec.identity_token_env)
        return SigstoreSigner(identity_token=token,
                              trust_config=Path(spec.trust_config) if spec.trust_config else None)
    raise ConfigurationError(f"unknown signer {spec.signer!r}", subject="signing.signer")
