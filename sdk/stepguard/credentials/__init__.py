"""Just-in-time Vault/OpenBao credentials for one pipeline step.

A step logs in (AppRole, JWT, Kubernetes; a plain token in development), creates a child token
whose TTL covers its deadline and whose policies are the ones it declares, mints every credential
under that token, delivers them without printing them, and revokes leases then token on every
exit path. If the process dies, the token's short TTL revokes everything.

>>> from stepguard.credentials import SecretMapping, VaultConfig, AppRoleAuth
>>> cfg = VaultConfig(addr="http://127.0.0.1:8200",
...                   auth=AppRoleAuth(role_id="orchestrator", secret_id="s-123"))
>>> cfg.auth
AppRoleAuth(role_id='orchestrator', mount='approle')
>>> SecretMapping({"password": "canary-123"})["password"]
SecretStr('**********')

Every Vault call (sessions, wrapping, Transit, the CLI's probe) goes through one
:class:`VaultClient` built from a :class:`VaultConfig`.

A session (needs a Vault; see ``docs/reference/credentials.md``)::

    with open_session([CredentialRequest(name="db", kind="database", role="stepguard-step")],
                      settings=cfg, context=RunContext(step="train"), ttl_s=900) as session:
        run(env=session.env())            # DB_USERNAME, DB_PASSWORD
    session.leases                        # records for the receipt, revoked=True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stepguard.credentials._api import VaultClient
from stepguard.credentials._config import (
    AppRoleAuth,
    JwtAuth,
    KubernetesAuth,
    Login,
    TokenAuth,
    VaultAuth,
    VaultConfig,
    auth_from_env,
)
from stepguard.credentials._delivery import (
    WRAPPED_ENV,
    DeliveredCredentials,
    WrappedDelivery,
    unwrap_delivery,
    wrap_for_delivery,
)
from stepguard.credentials._secret import SecretMapping, SecretStr
from stepguard.credentials._session import (
    CredentialSession,
    TokenRecord,
    open_session,
    revoke_open_sessions,
)
from stepguard.credentials._set import CredentialSet, filesystem_type

if TYPE_CHECKING:
    from stepguard.audit import derived_forms, register_secret
    from stepguard.receipt import LeaseRecord

#: Re-exported, resolved on first use so importing this package stays light: the process's one
#: secret registry lives in :mod:`stepguard.audit`, and a credential's record is the receipt's.
_REEXPORTS = {"derived_forms": "stepguard.audit", "register_secret": "stepguard.audit",
              "LeaseRecord": "stepguard.receipt"}

__all__ = [
    "WRAPPED_ENV",
    "AppRoleAuth",
    "CredentialSession",
    "CredentialSet",
    "DeliveredCredentials",
    "JwtAuth",
    "KubernetesAuth",
    "LeaseRecord",
    "Login",
    "SecretMapping",
    "SecretStr",
    "TokenAuth",
    "TokenRecord",
    "VaultAuth",
    "VaultClient",
    "VaultConfig",
    "WrappedDelivery",
    "auth_from_env",
    "derived_forms",
    "filesystem_type",
    "open_session",
    "register_secret",
    "revoke_open_sessions",
    "unwrap_delivery",
    "wrap_for_delivery",
]


def __getattr__(name: str) -> Any:
    module = _REEXPORTS.get(name)
    if module is not None:
        import importlib

        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'stepguard.credentials' has no attribute {name!r}")
