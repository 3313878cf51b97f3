"""Settings: where Vault is and how to log in, where the registry is, where audit goes.

Read from a YAML file (``$STEPGUARD_CONFIG``, else ``./stepguard.yaml`` when present) and then
from the environment, which wins. Unknown keys and wrong types are refused with an error naming
the setting. Environment variables:

* ``VAULT_ADDR`` / ``BAO_ADDR``, ``VAULT_NAMESPACE``, ``VAULT_CACERT`` -- the standard names;
* ``STEPGUARD_<SECTION>_<KEY>`` for everything else, e.g. ``STEPGUARD_VAULT_AUTH=approle``,
  ``STEPGUARD_REGISTRY_URL=s3://models/prod``, ``STEPGUARD_AUDIT_PATH=/var/log/sg.jsonl``.

>>> from stepguard.settings import Settings
>>> s = Settings.load(path=None, environ={"VAULT_ADDR": "http://127.0.0.1:8200",
...                                       "STEPGUARD_AUDIT_EXPORTER": "none"})
>>> s.vault.addr, s.audit.exporter
('http://127.0.0.1:8200', 'none')
>>> Settings.load(path=None, environ={"STEPGUARD_VAULT_TIMEOUT_S": "soon"})
Traceback (most recent call last):
...
stepguard.errors.ConfigurationError: expected a number, got 'soon': vault.timeout_s
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from stepguard._private.schema import from_mapping, load_yaml, to_plain
from stepguard.errors import ConfigurationError
from stepguard.floor import Floor

__all__ = [
    "PLACEHOLDER_DIGEST",
    "AuditSettings",
    "PodSettings",
    "PolicySettings",
    "RegistrySettings",
    "Settings",
    "VaultSettings",
]


@dataclass(frozen=True)
class VaultSettings:
    """How to reach Vault/OpenBao and log in.

    ``auth`` is ``token`` (development only: ``VAULT_TOKEN``), ``approle``, ``jwt`` or
    ``kubernetes``; ``role`` is the auth role; ``jwt_path`` a file holding the JWT (e.g. a
    projected service-account token).
    """

    addr: str | None = None
    auth: Literal["token", "approle", "jwt", "kubernetes"] = "token"
    role: str | None = None
    mount: str | None = None
    jwt_path: str | None = None
    namespace: str | None = None
    ca_cert: str | None = None
    timeout_s: float = 5.0
    heartbeat_s: float = 300.0
    ttl_margin_s: float = 300.0

    def __post_init__(self) -> None:
        if self.addr is not None and not self.addr.startswith(("http://", "https://")):
            raise ConfigurationError("must start with http:// or https://", subject="vault.addr")
        if not 0 < self.timeout_s <= 30:
            raise ConfigurationError("must be in (0, 30]", subject="vault.timeout_s")


@dataclass(frozen=True)
class RegistrySettings:
    """Default model/dataset registry: ``file:///dir`` or ``s3://bucket/prefix``."""

    url: str | None = None

    def __post_init__(self) -> None:
        if self.url is not None and not self.url.startswith(("file://", "s3://")):
            raise ConfigurationError("must be a file:// or s3:// URL", subject="registry.url")


@dataclass(frozen=True)
class AuditSettings:
    """Where audit spans go. ``jsonl`` (default) is the local tamper-evident log; ``otlp`` uses
    the standard ``OTEL_EXPORTER_OTLP_*`` variables; ``both``; ``none`` disables auditing."""

    exporter: Literal["jsonl", "otlp", "both", "none"] = "jsonl"
    path: str | None = None
    dir: str | None = None


@dataclass(frozen=True)
class PolicySettings:
    """A named signature verification policy, referenced by steps and gates.

    ``kind: key`` needs ``public_keys`` (PEM paths); ``transit`` needs ``key`` (the Transit key
    name; ``versions``/``min_version`` say which key versions are accepted after rotation);
    ``sigstore`` needs ``identity`` and ``issuer``. There is no default policy.
    """

    kind: Literal["key", "transit", "sigstore"]
    public_keys: tuple[str, ...] = ()
    key: str | None = None
    versions: tuple[int, ...] = ()
    min_version: int | None = None
    mount: str = "transit"
    identity: str | None = None
    issuer: str | None = None
    trust_config: str | None = None
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        need = {"key": ("public_keys", self.public_keys), "transit": ("key", self.key),
                "sigstore": ("identity", self.identity and self.issuer)}[self.kind]
        if not need[1]:
            raise ConfigurationError(f"a {self.kind} policy needs '{need[0]}'",
                                     subject=f"policies.{need[0]}")
        if self.kind == "transit" and not (self.versions or self.min_version):
            raise ConfigurationError(
                "a transit policy must say which key versions it accepts",
                subject="policies.versions", hint="set versions: [1, 2] or min_version: 1")


@dataclass(frozen=True)
class ReceiptSettings:
    """How receipts are protected between steps (an XCom value can be edited by any user with
    XCom rights). ``signer`` (``key``: ``key`` is a PEM private key file; ``transit``: ``key``
    is a Vault Transit key) signs every receipt a step writes; ``policy`` names the
    verification policy (``policies:``) every receipt a step consumes must be signed under --
    an unsigned or edited receipt is then refused. Without ``policy`` receipts are taken as
    given, which is safe only where nobody else can write them (one machine).
    """

    signer: Literal["key", "transit"] | None = None
    key: str | None = None
    transit_mount: str = "transit"
    policy: str | None = None

    def __post_init__(self) -> None:
        if self.signer is not None and not self.key:
            raise ConfigurationError("a receipt signer needs 'key'", subject="receipts.key")


#: The all-zero digest that stood in for an unreleased image: never runnable, always refused.
PLACEHOLDER_DIGEST = "sha256:" + "0" * 64


@dataclass(frozen=True)
class PodSettings:
    """How steps run as pods (``SecureKubernetesPodOperator``, ``mode: pod``, KFP components).

    ``image`` is the stepguard runtime image, ``REPO@sha256:DIGEST`` (one setting for the Airflow
    operator, ``stepguard pod render`` and the KFP components; the all-zero placeholder digest
    is refused). ``vault_login`` is how the step runner inside the pod gets its credentials:
    ``wrapped`` -- the orchestrator mints them and hands over one single-use response-wrapped
    token that lives ``wrap_ttl_s`` (default 20 min: GPU scheduling plus a large image pull) --
    or ``jwt`` -- the pod logs in itself with Vault's JWT auth (role ``jwt_role`` at
    ``jwt_mount``) and a projected service-account token whose audience is ``jwt_audience``
    only, valid ``token_expiry_s``. ``vault_addr`` / ``otlp_endpoint`` are the addresses as
    seen from inside the pod (default: ``vault.addr`` / none).

    >>> PodSettings(image="ghcr.io/acme/stepguard@" + PLACEHOLDER_DIGEST)
    Traceback (most recent call last):
    ...
    stepguard.errors.ConfigurationError: the all-zero placeholder digest is not an image: pods.image
    """

    image: str | None = None
    vault_login: Literal["wrapped", "jwt"] = "wrapped"
    wrap_ttl_s: int = 1200
    jwt_role: str | None = None
    jwt_mount: str = "jwt"
    jwt_audience: str = "vault"
    token_expiry_s: int = 600
    vault_addr: str | None = None
    otlp_endpoint: str | None = None

    def __post_init__(self) -> None:
        if self.image is not None:
            if "@sha256:" not in self.image:
                raise ConfigurationError("must be pinned by digest (REPO@sha256:<64 hex>)",
                                         subject="pods.image")
            if self.image.endswith(PLACEHOLDER_DIGEST):
                raise ConfigurationError("the all-zero placeholder digest is not an image",
                                         subject="pods.image",
                                         hint="set pods.image to the digest you built and "
                                              "reviewed (components/image/Containerfile)")
        if not 60 <= self.wrap_ttl_s <= 3600:
            raise ConfigurationError("must be between 60 s and 1 h", subject="pods.wrap_ttl_s")
        if not 600 <= self.token_expiry_s <= 3600:
            # 600 s is the shortest a kubelet issues; an hour bounds a stolen token.
            raise ConfigurationError("must be between 600 s and 1 h",
                                     subject="pods.token_expiry_s")
        if self.vault_login == "jwt" and not self.jwt_role:
            raise ConfigurationError("JWT login from the pod needs a role",
                                     subject="pods.jwt_role")


@dataclass(frozen=True)
class Settings:
    """All stepguard settings. ``state_dir`` holds receipts, manifests and the audit log.

    ``floor`` is the organisation's policy floor (:class:`~stepguard.floor.Floor`): the step
    runner refuses any step that breaches it, whatever its spec or DAG file says.
    """

    vault: VaultSettings = field(default_factory=VaultSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    policies: Mapping[str, PolicySettings] = field(default_factory=dict)
    state_dir: str = ".stepguard"
    receipts: ReceiptSettings = field(default_factory=ReceiptSettings)
    floor: Floor | None = None
    pods: PodSettings = field(default_factory=PodSettings)

    def policy(self, name: str) -> PolicySettings:
        """The verification policy called ``name`` (ConfigurationError naming it if absent)."""
        try:
            return self.policies[name]
        except KeyError:
            raise ConfigurationError(
                "no such verification policy", subject=f"policies.{name}",
                hint=f"defined: {', '.join(sorted(self.policies)) or 'none'}",
            ) from None

    @property
    def audit_path(self) -> Path:
        """The local audit log location (default: ``<state_dir>/audit/audit.jsonl``)."""
        if self.audit.path:
            return Path(self.audit.path)
        return Path(self.audit.dir or Path(self.state_dir) / "audit") / "audit.jsonl"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Settings:
        """Build settings from plain data, refusing unknown keys and wrong types."""
        return from_mapping(cls, data, "")

    @classmethod
    def load(
        cls,
        path: str | Path | Literal["auto"] | None = "auto",
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Load settings from ``path`` (``"auto"``: ``$STEPGUARD_CONFIG`` or ``./stepguard.yaml``
        when it exists; ``None``: no file) and then the environment."""
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        if path == "auto":
            candidate = env.get("STEPGUARD_CONFIG")
            if candidate:
                path = candidate
            elif Path("stepguard.yaml").is_file():
                path = "stepguard.yaml"
            else:
                path = None
        if path is not None:
            data = _read_yaml(Path(path))
        _merge(data, _from_environ(env))
        return cls.from_dict(data)

    def with_overrides(self, **sections: Any) -> Settings:
        """A copy with whole sections replaced, e.g. ``s.with_overrides(audit=AuditSettings())``."""
        return replace(self, **sections)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form; holds no secret (secrets never live in settings)."""
        out: dict[str, Any] = to_plain(self)
        return out


_SECTIONS = {
    "vault": VaultSettings,
    "registry": RegistrySettings,
    "audit": AuditSettings,
    "receipts": ReceiptSettings,
    "pods": PodSettings,
}


def _read_yaml(path: Path) -> dict[str, Any]:
    loaded = load_yaml(path, "settings file")
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigurationError("settings file must hold a mapping", subject=str(path))
    return loaded


def _from_environ(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    std = {
        # Names other tools and the audit package already use.
        "STEPGUARD_AUDIT_LOG": ("audit", "path"),
        "VAULT_ADDR": ("vault", "addr"),
        "VAULT_NAMESPACE": ("vault", "namespace"),
        "VAULT_CACERT": ("vault", "ca_cert"),
    }
    if "BAO_ADDR" in env and "VAULT_ADDR" not in env:
        out.setdefault("vault", {})["addr"] = env["BAO_ADDR"]
    for var, (section, key) in std.items():
        if env.get(var):
            out.setdefault(section, {})[key] = env[var]
    for var, value in env.items():
        if not var.startswith("STEPGUARD_") or var in std:
            continue
        rest = var[len("STEPGUARD_"):].lower()
        if rest == "state_dir":
            out["state_dir"] = value
            continue
        match = next((s for s in _SECTIONS if rest.startswith(s + "_")), None)
        if match is None:
            continue
        section = match
        key = rest[len(section) + 1:]
        known = {f.name for f in fields(_SECTIONS[section])}
        if key not in known:
            raise ConfigurationError(
                "unknown setting in environment", subject=var,
                hint=f"known {section} settings: {', '.join(sorted(known))}",
            )
        out.setdefault(section, {})[key] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> None:
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
