"""The wiring layer: settings in, ready objects out.

Controls (``credentials``, ``integrity``, ``isolation``, ``signing``, ``registry``, ``audit``)
never read settings. This package is where :class:`~stepguard.settings.Settings` become the
objects they take -- a :class:`~stepguard.credentials.VaultConfig` and an authenticated
:class:`~stepguard.credentials.VaultClient`, signers, verification policies, registries and the
step's auditor -- and where the step lifecycle (:mod:`stepguard.step`), the CLI and the
Airflow/KFP adapters get them. It sits between the lifecycle and the controls: it imports
controls and base modules, and nothing imports it from below.

=====================================  =========================================================
``vault_config(settings)``             address, limits and auth method from settings; the auth
                                       method's secret from its own variable or file
``vault_client(settings, session=)``   the step token's client, or a login for the block
``probe_vault(settings)``              Vault's health, one clear error when unreachable
``policy_from_settings(settings, n)``  the named verification policy (Transit: keys from Vault)
``build_policy(policy_settings)``      the same from one :class:`PolicySettings`
``publish_output(...)``                sign and publish one step output (bundle last)
``verify_input_signature(...)``        require an input's manifest signature under its policy
``fetch_verified(settings, ...)``      the deployment gate: fetch a model verified by policy
``StepAudit(settings, provider)``      the lifecycle's spans and verdicts
``current_audit()``                    the running step's StepAudit (signing, gate spans)
``sign_receipt``/``check_receipt``     receipts signed by the producer, verified by consumers
``s3_client(credential)``              an S3 client from one just-in-time AWS credential
``enforce_floor(spec, settings)``      refuse a step that breaches the settings' policy floor
=====================================  =========================================================

>>> from stepguard.settings import Settings
>>> from stepguard.wiring import vault_config
>>> cfg = vault_config(Settings.from_dict({"vault": {"addr": "http://127.0.0.1:8200",
...     "auth": "jwt", "role": "train", "jwt_path": "/var/run/secrets/vault/token"}}), {})
>>> cfg.auth, cfg.child_token
(JwtAuth(role='train', jwt_path='/var/run/secrets/vault/token', jwt_env=None, mount='jwt'), False)
"""

from __future__ import annotations

from stepguard.wiring._audit import StepAudit, current_audit
from stepguard.wiring._floor import enforce_floor
from stepguard.wiring._receipts import RECEIPT_PAYLOAD_TYPE, check_receipt, sign_receipt
from stepguard.wiring._signing import (
    build_policy,
    fetch_verified,
    fetch_verified_model,
    policy_from_settings,
    publish_output,
    verify_input_signature,
)
from stepguard.wiring._storage import s3_client
from stepguard.wiring._vault import (
    probe_vault,
    unauthenticated_config,
    vault_client,
    vault_config,
)

__all__ = [
    "RECEIPT_PAYLOAD_TYPE",
    "StepAudit",
    "build_policy",
    "check_receipt",
    "current_audit",
    "enforce_floor",
    "fetch_verified",
    "fetch_verified_model",
    "policy_from_settings",
    "probe_vault",
    "publish_output",
    "s3_client",
    "sign_receipt",
    "unauthenticated_config",
    "vault_client",
    "vault_config",
    "verify_input_signature",
]
