"""Configure the OpenBao dev server for stepguard, idempotently (safe to run twice)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepguard.testing.devstack._info import PostgresInfo, write_private
from stepguard.testing.devstack._postgres import READERS_ROLE, VAULT_PG_USER

if TYPE_CHECKING:
    import hvac

TRANSIT_KEY = "stepguard-signing"
DB_CONNECTION = "stepguard-pg"
DB_ROLE = "stepguard-step"
OIDC_KEY = "stepguard"
OIDC_ROLE = "stepguard-step"
STS_AUDIENCE = "sts.amazonaws.com"
APPROLE_ROLE = "stepguard-orchestrator"
JWT_ROLE = "stepguard-step"
JWT_AUDIENCE = "stepguard"
JWT_ISSUER = "stepguard-dev"
TOKEN_ROLE = "stepguard-step"  # noqa: S105 -- a role name
ORCHESTRATOR_POLICY = "stepguard-orchestrator"
STEP_POLICY = "stepguard-step"

# What one step may do with its child token: nothing beyond its own credentials.
STEP_POLICY_HCL = """\
# stepguard-step: the credentials of one pipeline step, nothing else.
path "database/creds/stepguard-step" { capabilities = ["read"] }
path "identity/oidc/token/stepguard-step" { capabilities = ["read"] }
path "transit/sign/stepguard-signing" { capabilities = ["update"] }
path "transit/sign/stepguard-signing/*" { capabilities = ["update"] }
path "transit/verify/stepguard-*" { capabilities = ["update"] }
path "transit/keys/stepguard-*" { capabilities = ["read"] }
path "secret/data/stepguard/*" { capabilities = ["read"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
path "sys/leases/lookup" { capabilities = ["update"] }
"""

# The orchestrator mints per-step child tokens and hands them over wrapped. Vault itself keeps a
# child's policies a subset of its parent's (or of the token role's allowed_policies).
ORCHESTRATOR_POLICY_HCL = """\
# stepguard-orchestrator: mint, wrap, renew and revoke per-step child tokens.
path "auth/token/create" { capabilities = ["create", "update"] }
path "auth/token/create/stepguard-step" { capabilities = ["create", "update"] }
path "auth/token/lookup" { capabilities = ["update"] }
path "auth/token/lookup-accessor" { capabilities = ["update"] }
path "auth/token/revoke" { capabilities = ["update"] }
path "auth/token/revoke-accessor" { capabilities = ["update"] }
path "auth/token/renew" { capabilities = ["update"] }
path "database/creds/stepguard-step" { capabilities = ["read"] }
path "identity/oidc/token/stepguard-step" { capabilities = ["read"] }
path "transit/sign/stepguard-*" { capabilities = ["update"] }
path "transit/verify/stepguard-*" { capabilities = ["update"] }
path "transit/keys/stepguard-*" { capabilities = ["read"] }
path "secret/data/stepguard/*" { capabilities = ["read"] }
path "secret/metadata/stepguard/*" { capabilities = ["read", "list"] }
path "sys/leases/lookup" { capabilities = ["update"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
path "sys/wrapping/wrap" { capabilities = ["update"] }
path "sys/wrapping/lookup" { capabilities = ["update"] }
path "sys/wrapping/unwrap" { capabilities = ["update"] }
"""

CREATION_STATEMENTS = [
    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
    f'GRANT {READERS_ROLE} TO "{{{{name}}}}";',
]
# Really gone on revoke: sessions ended first, else DROP ROLE would fail or leave access open.
REVOCATION_STATEMENTS = [
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';",
    f'REVOKE {READERS_ROLE} FROM "{{{{name}}}}";',
    'DROP ROLE IF EXISTS "{{name}}";',
]


@dataclass(frozen=True)
class VaultSetup:
    approle_role_id: str
    approle_secret_id_file: Path
    jwt_private_key_path: Path
    oidc_issuer: str


def _post(client: hvac.Client, path: str, data: dict[str, Any]) -> Any:
    return client.adapter.post(f"/v1/{path}", json=data)


def _get(client: hvac.Client, path: str) -> Any:
    return client.adapter.get(f"/v1/{path}")


def _ensure_secrets_engine(client: hvac.Client, path: str, kind: str, **opts: Any) -> None:
    mounts = client.sys.list_mounted_secrets_engines()["data"]
    if f"{path}/" not in mounts:
        client.sys.enable_secrets_engine(backend_type=kind, path=path, **opts)


def _ensure_auth(client: hvac.Client, path: str, kind: str) -> str:
    methods = client.sys.list_auth_methods()["data"]
    if f"{path}/" not in methods:
        client.sys.enable_auth_method(method_type=kind, path=path)
        methods = client.sys.list_auth_methods()["data"]
    return str(methods[f"{path}/"]["accessor"])


def _jwt_keypair(state_dir: Path) -> tuple[Path, str]:
    """The EC P-256 key whose public half ``jwt/`` trusts; reused if it already exists."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = state_dir / "jwt-signing-key.pem"
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private(path, pem.decode())
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, pub.decode()


def configure_vault(
    client: hvac.Client,
    state_dir: Path,
    *,
    vault_addr: str,
    postgres: PostgresInfo | None,
    vault_pg_password: str | None,
) -> VaultSetup:
    """Mounts, keys, roles and policies stepguard expects; each step checks before creating."""
    import hvac.exceptions

    # KV v2 is mounted at secret/ by dev servers; ensure it for non-dev reuse too.
    _ensure_secrets_engine(client, "secret", "kv", options={"version": "2"})

    _ensure_secrets_engine(client, "transit", "transit")
    try:
        client.secrets.transit.read_key(name=TRANSIT_KEY)
    except hvac.exceptions.InvalidPath:
        client.secrets.transit.create_key(name=TRANSIT_KEY, key_type="ecdsa-p256")

    client.sys.create_or_update_policy(name=STEP_POLICY, policy=STEP_POLICY_HCL)
    client.sys.create_or_update_policy(name=ORCHESTRATOR_POLICY, policy=ORCHESTRATOR_POLICY_HCL)

    # A token role lets the orchestrator mint step tokens carrying only stepguard-step.
    _post(
        client,
        f"auth/token/roles/{TOKEN_ROLE}",
        {
            "allowed_policies": [STEP_POLICY],
            "orphan": False,
            "renewable": True,
            "token_explicit_max_ttl": "4h",
        },
    )

    if postgres is not None and vault_pg_password is not None:
        _ensure_secrets_engine(client, "database", "database")
        client.secrets.database.configure(
            name=DB_CONNECTION,
            plugin_name="postgresql-database-plugin",
            verify_connection=True,
            allowed_roles=[DB_ROLE],
            connection_url=(
                f"postgresql://{{{{username}}}}:{{{{password}}}}@{postgres.host}:{postgres.port}"
                f"/{postgres.database}?sslmode=disable"
            ),
            username=VAULT_PG_USER,
            password=vault_pg_password,
            max_open_connections=4,
        )
        client.secrets.database.create_role(
            name=DB_ROLE,
            db_name=DB_CONNECTION,
            creation_statements=CREATION_STATEMENTS,
            revocation_statements=REVOCATION_STATEMENTS,
            default_ttl="300s",
            max_ttl="3600s",
        )

    approle_accessor = _ensure_auth(client, "approle", "approle")
    del approle_accessor
    _post(
        client,
        f"auth/approle/role/{APPROLE_ROLE}",
        {
            "token_policies": [ORCHESTRATOR_POLICY, STEP_POLICY],
            # A killed orchestrator's login (and any child it left) should not outlive this.
            "token_ttl": "15m",
            "token_max_ttl": "1h",
            "secret_id_ttl": "24h",
            "token_bound_cidrs": ["127.0.0.1/32"],
            "secret_id_bound_cidrs": ["127.0.0.1/32"],
        },
    )
    role_id = str(_get(client, f"auth/approle/role/{APPROLE_ROLE}/role-id")["data"]["role_id"])
    secret_id_file = state_dir / "approle-secret-id"
    if not secret_id_file.exists():
        secret = _post(client, f"auth/approle/role/{APPROLE_ROLE}/secret-id", {})
        write_private(secret_id_file, str(secret["data"]["secret_id"]) + "\n")

    jwt_accessor = _ensure_auth(client, "jwt", "jwt")
    key_path, public_pem = _jwt_keypair(state_dir)
    _post(
        client,
        "auth/jwt/config",
        {"jwt_validation_pubkeys": [public_pem], "bound_issuer": JWT_ISSUER},
    )
    _post(
        client,
        f"auth/jwt/role/{JWT_ROLE}",
        {
            "role_type": "jwt",
            "bound_audiences": [JWT_AUDIENCE],
            "user_claim": "sub",
            "claim_mappings": {"run_id": "run_id", "step_id": "step_id"},
            "token_policies": [STEP_POLICY],
            "token_ttl": "15m",
            "token_max_ttl": "1h",
        },
    )

    # Identity tokens (OIDC) a step exchanges at STS AssumeRoleWithWebIdentity.
    _post(client, "identity/oidc/config", {"issuer": vault_addr})
    _post(
        client,
        f"identity/oidc/key/{OIDC_KEY}",
        {
            "algorithm": "RS256",
            "allowed_client_ids": [STS_AUDIENCE],
            "rotation_period": "24h",
            "verification_ttl": "24h",
        },
    )
    alias_meta = f"identity.entity.aliases.{jwt_accessor}.metadata"
    # Run and step ids come from the JWT login's claims (claim_mappings above).
    template = (
        '{"stepguard": {"entity": {{identity.entity.name}}, '
        '"run_id": {{' + alias_meta + '.run_id}}, '
        '"step_id": {{' + alias_meta + '.step_id}} } }'
    )
    _post(
        client,
        f"identity/oidc/role/{OIDC_ROLE}",
        {"key": OIDC_KEY, "client_id": STS_AUDIENCE, "ttl": "15m", "template": template},
    )
    return VaultSetup(
        approle_role_id=role_id,
        approle_secret_id_file=secret_id_file,
        jwt_private_key_path=key_path,
        oidc_issuer=f"{vault_addr}/v1/identity/oidc",
    )

