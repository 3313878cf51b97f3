"""Reachability probes used by ``stepguard config check``."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from stepguard.errors import ConfigurationError, TransientCredentialError
from stepguard.settings import Settings


def probe_vault(settings: Settings) -> dict[str, object]:
    """Ask Vault's unauthenticated health endpoint; one clear error when it cannot answer."""
    addr = settings.vault.addr
    if not addr:
        raise ConfigurationError("Vault address is not set", subject="vault.addr",
                                 hint="set VAULT_ADDR or vault.addr in stepguard.yaml")
    url = addr.rstrip("/") + "/v1/sys/health?standbyok=true&perfstandbyok=true"
    try:
        with urllib.request.urlopen(url, timeout=settings.vault.timeout_s) as resp:  # noqa: S310
            body: dict[str, object] = json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        if exc.code in (429, 472, 473):  # standby / performance standby: reachable
            return {"code": exc.code}
        raise TransientCredentialError(
            f"Vault at {addr} answered HTTP {exc.code} (sealed or not initialised?)",
            subject="vault.addr") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransientCredentialError(f"cannot reach Vault at {addr} ({reason})",
                                       subject="vault.addr") from exc
    return body
