"""The value describing a running dev stack, and its on-disk state file."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stepguard.errors import ConfigurationError

STATE_FILE = "state.json"
ENV_FILE = "env"
STATE_VERSION = 1


@dataclass(frozen=True)
class PostgresInfo:
    """The throwaway PostgreSQL cluster: loopback TCP, password authentication."""

    host: str
    port: int
    database: str
    admin_user: str
    admin_password: str = field(repr=False)
    data_dir: str
    socket_dir: str

    @property
    def admin_dsn(self) -> str:
        """libpq DSN of the cluster superuser (dev only; it is a secret)."""
        return (
            f"host={self.host} port={self.port} dbname={self.database} "
            f"user={self.admin_user} password={self.admin_password} sslmode=disable"
        )


@dataclass(frozen=True)
class DevStackInfo:
    """Everything a client needs to use a running dev stack.

    Secret fields (the Vault root token, the AWS admin secret key, the PostgreSQL admin
    password) are excluded from ``repr``.
    """

    state_dir: Path
    env_file: Path
    vault_addr: str
    vault_root_token: str = field(repr=False)
    moto_endpoint: str = ""
    aws_region: str = "us-east-1"
    aws_account_id: str = "123456789012"
    aws_access_key_id: str = ""
    aws_secret_access_key: str = field(default="", repr=False)
    postgres: PostgresInfo | None = None
    #: PEM private key (0600) whose public half the ``jwt/`` auth mount trusts.
    jwt_private_key_path: Path | None = None
    jwt_issuer: str = ""
    jwt_audience: str = "stepguard"
    jwt_role: str = "stepguard-step"
    approle_role_id: str = ""
    #: File (0600) holding a secret-id of the ``stepguard-orchestrator`` AppRole.
    approle_secret_id_file: Path | None = None
    oidc_issuer: str = ""
    oidc_provider_arn: str = ""
    web_identity_role_arn: str = ""
    pids: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    #: Paths outside ``state_dir`` owned by the stack (removed by ``down``).
    extra_dirs: tuple[str, ...] = ()

    @property
    def postgres_host(self) -> str | None:
        return self.postgres.host if self.postgres else None

    @property
    def postgres_port(self) -> int | None:
        return self.postgres.port if self.postgres else None

    @property
    def postgres_admin_dsn(self) -> str | None:
        return self.postgres.admin_dsn if self.postgres else None

    def to_json(self) -> dict[str, Any]:
        """Full state, secrets included: only for the 0600 state file."""
        data = asdict(self)
        for key, value in list(data.items()):
            if isinstance(value, Path):
                data[key] = str(value)
        data["extra_dirs"] = list(self.extra_dirs)
        data["version"] = STATE_VERSION
        return data

    def public_summary(self) -> dict[str, Any]:
        """What ``dev status --json`` prints: endpoints, pids, files; never a secret."""
        pg = self.postgres
        return {
            "state_dir": str(self.state_dir),
            "env_file": str(self.env_file),
            "vault_addr": self.vault_addr,
            "moto_endpoint": self.moto_endpoint,
            "aws_region": self.aws_region,
            "aws_access_key_id": self.aws_access_key_id,
            "postgres": None
            if pg is None
            else {"host": pg.host, "port": pg.port, "database": pg.database, "user": pg.admin_user},
            "jwt_private_key_path": str(self.jwt_private_key_path or ""),
            "jwt_issuer": self.jwt_issuer,
            "jwt_audience": self.jwt_audience,
            "approle_role_id": self.approle_role_id,
            "oidc_issuer": self.oidc_issuer,
            "web_identity_role_arn": self.web_identity_role_arn,
            "pids": dict(self.pids),
            "ports": dict(self.ports),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DevStackInfo:
        data = dict(data)
        if data.pop("version", None) != STATE_VERSION:
            raise ConfigurationError("dev stack state file has an unknown version")
        pg = data.pop("postgres", None)
        for key in ("state_dir", "env_file", "jwt_private_key_path", "approle_secret_id_file"):
            if data.get(key):
                data[key] = Path(data[key])
        data["extra_dirs"] = tuple(data.get("extra_dirs", ()))
        data["pids"] = {str(k): int(v) for k, v in data.get("pids", {}).items()}
        data["ports"] = {str(k): int(v) for k, v in data.get("ports", {}).items()}
        return cls(postgres=PostgresInfo(**pg) if pg else None, **data)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` created 0600 from the start (no window where it is readable)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def save_state(info: DevStackInfo) -> None:
    write_private(info.state_dir / STATE_FILE, json.dumps(info.to_json(), indent=2) + "\n")


def load_state(state_dir: Path) -> DevStackInfo | None:
    path = state_dir / STATE_FILE
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return DevStackInfo.from_json(json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(
            "dev stack state file is unreadable", subject=str(path),
            hint="stop leftover processes by hand and remove the state directory",
        ) from exc
