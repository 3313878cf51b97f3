"""``StepguardHook``: turns an Airflow connection of type ``stepguard`` into stepguard settings.

The connection holds where Vault/OpenBao is and how the worker logs in; stepguard settings
(file + ``STEPGUARD_*`` environment, see :mod:`stepguard.settings`) supply everything else. The
connection's password (an AppRole secret id or a development token) is registered with Airflow's
secrets masker the moment it is read, and never leaves the worker process except as the
environment of the Vault login.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

if TYPE_CHECKING:
    from stepguard.settings import Settings

__all__ = ["StepguardHook"]

_AUTH_ENV = {
    # auth method -> (env var for login, env var for password)
    "token": (None, "VAULT_TOKEN"),
    "approle": ("VAULT_ROLE_ID", "VAULT_SECRET_ID"),
}


class StepguardHook(BaseHook):
    """Settings and Vault login material from a ``stepguard`` connection.

    :param conn_id: the connection; when it does not exist, settings come from the stepguard
        settings file and environment alone (``[stepguard] settings_file`` in airflow.cfg, else
        ``$STEPGUARD_CONFIG``).
    """

    conn_name_attr = "conn_id"
    default_conn_name = "stepguard_default"
    conn_type = "stepguard"
    hook_name = "stepguard (Vault/OpenBao)"

    def __init__(self, conn_id: str | None = default_conn_name) -> None:
        super().__init__()
        self.conn_id = conn_id
        self._conn: Any = None
        self._looked_up = False

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Field behaviour for the connection form (mirrors ``get_provider_info``)."""
        return {
            "hidden_fields": ["schema", "extra"],
            "relabeling": {
                "host": "Vault address (https://vault:8200)",
                "login": "AppRole role_id",
                "password": "AppRole secret_id or token",
            },
            "placeholders": {"host": "https://vault.example:8200"},
        }

    def connection(self) -> Any:
        """The Airflow connection, or ``None`` when ``conn_id`` is unset or not defined."""
        if not self._looked_up:
            self._looked_up = True
            if self.conn_id:
                from airflow.sdk.exceptions import AirflowNotFoundException

                try:
                    self._conn = self.get_connection(self.conn_id)
                except AirflowNotFoundException:
                    self._conn = None
            if self._conn is not None and self._conn.password:
                from airflow.sdk.log import mask_secret

                mask_secret(self._conn.password)
        return self._conn

    def get_settings(self, settings_file: str | None = None) -> Settings:
        """stepguard settings: file/environment first, then the connection's fields on top."""
        from stepguard.settings import Settings

        path: str | None = settings_file or _conf("settings_file") or "auto"
        settings = Settings.load(path=path)
        data = settings.to_dict()
        # airflow.cfg [stepguard] defaults fill what the settings file and environment left unset.
        for key, (section, name) in _CFG_KEYS.items():
            value = _conf(key)
            if value and data.get(section, {}).get(name) in (None, "", _DEFAULTS.get(key)):
                data.setdefault(section, {})[name] = value
        conn = self.connection()
        if conn is None:
            return Settings.from_dict(data)
        extra = _extra(conn)
        vault = data.setdefault("vault", {})
        if conn.host:
            host = str(conn.host)
            if "://" not in host:
                host = f"https://{host}"
            if conn.port and host.count(":") < 2:
                host = f"{host}:{conn.port}"
            vault["addr"] = host
        for key, target in (("auth_method", "auth"), ("auth_mount", "mount"), ("role", "role"),
                            ("namespace", "namespace"), ("ca_cert", "ca_cert")):
            if extra.get(key):
                vault[target] = extra[key]
        if extra.get("registry"):
            data.setdefault("registry", {})["url"] = extra["registry"]
        return Settings.from_dict(data)

    @contextmanager
    def login_env(self, settings: Settings) -> Iterator[None]:
        """Expose the connection's login material to the Vault client for the step's duration.

        The values are set in this process's environment (where the credentials engine reads
        ``VAULT_ADDR`` and ``VAULT_TOKEN`` / ``VAULT_ROLE_ID`` / ``VAULT_SECRET_ID``) and
        restored afterwards.
        """
        import os

        conn = self.connection()
        names = _AUTH_ENV.get(settings.vault.auth, (None, None))
        wanted: dict[str, str] = {}
        if settings.vault.addr:
            wanted["VAULT_ADDR"] = settings.vault.addr
        if conn is not None:
            if names[0] and conn.login:
                wanted[names[0]] = str(conn.login)
            if names[1] and conn.password:
                wanted[names[1]] = str(conn.password)
        saved = {k: os.environ.get(k) for k in wanted}
        os.environ.update(wanted)
        try:
            yield
        finally:
            for key, old in saved.items():
                if old is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = old

    def test_connection(self) -> tuple[bool, str]:
        """The connection form's "Test": reach Vault, then log in with the configured method.

        Reports which of the two failed: Vault unreachable (address, TLS, outage) or the login
        denied (wrong AppRole secret, expired token, missing role). A token the login created is
        revoked at once; nothing secret is in the message.
        """
        from stepguard.audit import redact
        from stepguard.errors import ConfigurationError, CredentialDenied, StepguardError
        from stepguard.wiring import probe_vault, vault_client

        settings = self.get_settings()
        addr = settings.vault.addr
        if not addr:
            return False, "no Vault address configured"
        try:
            probe_vault(settings)
        except StepguardError as exc:
            return False, redact(f"Vault unreachable at {addr}: {exc.message}")
        method = settings.vault.auth
        try:
            with self.login_env(settings), vault_client(settings):
                pass
        except CredentialDenied as exc:
            return False, redact(f"Vault login denied ({method}): {exc}")
        except ConfigurationError as exc:
            return False, redact(f"Vault login not configured ({method}): {exc}")
        except StepguardError as exc:
            return False, redact(f"Vault login failed ({method}, {type(exc).__name__}): {exc}")
        return True, f"Vault answered at {addr}; {method} login succeeded"


#: ``[stepguard]`` airflow.cfg options -> settings (section, key).
_CFG_KEYS = {
    "vault_addr": ("vault", "addr"),
    "vault_auth": ("vault", "auth"),
    "registry": ("registry", "url"),
    "audit_exporter": ("audit", "exporter"),
    "audit_path": ("audit", "path"),
}
#: Settings defaults that an airflow.cfg value may replace (anything else was set on purpose).
_DEFAULTS = {"vault_auth": "token", "audit_exporter": "jsonl"}


def _extra(conn: Any) -> Mapping[str, Any]:
    try:
        value = conn.extra_dejson
    except Exception:  # a malformed extra is the connection's problem, not a crash
        return {}
    return value if isinstance(value, Mapping) else {}


def _conf(key: str) -> str | None:
    """A ``[stepguard]`` airflow.cfg value, without failing when the section is absent."""
    try:
        from airflow.sdk.configuration import conf

        value = conf.get("stepguard", key, fallback=None)
    except Exception:
        return None
    return str(value) if value else None
