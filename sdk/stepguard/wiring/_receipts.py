"""Settings -> signed receipts, and the check every consumed receipt passes first.

A receipt travels through the orchestrator (Airflow XCom, KFP outputs), where people and tools
other than the producing step can edit it. With ``receipts.signer`` set, every receipt a step
writes carries a DSSE signature bundle over its canonical JSON (:meth:`Receipt.payload`), made
with a key file or a Vault Transit key. With ``receipts.policy`` set, a step refuses any
producer's receipt that is unsigned, signed by someone the policy does not accept, or edited
after signing -- a :class:`~stepguard.errors.SignatureError` (a security verdict, never retried)
naming the producing step -- before it trusts a single digest the receipt names.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any

from stepguard.errors import SignatureError
from stepguard.receipt import Receipt
from stepguard.settings import Settings
from stepguard.wiring._signing import policy_from_settings
from stepguard.wiring._vault import vault_client

if TYPE_CHECKING:
    from stepguard.credentials import CredentialSession

#: DSSE payload type of a signed receipt.
RECEIPT_PAYLOAD_TYPE = "application/vnd.stepguard.receipt+json"


def sign_receipt(receipt: Receipt, settings: Settings, *,
                 session: CredentialSession | None = None) -> Receipt:
    """``receipt`` with its signature, when ``settings.receipts.signer`` is set (else as is).

    >>> import tempfile, pathlib
    >>> from cryptography.hazmat.primitives.asymmetric import ec
    >>> from cryptography.hazmat.primitives import serialization as s
    >>> from stepguard.spec import RunContext
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> key = ec.generate_private_key(ec.SECP256R1())
    >>> _ = (d / "k.pem").write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8,
    ...                                                 s.NoEncryption()))
    >>> _ = (d / "k.pub").write_bytes(key.public_key().public_bytes(s.Encoding.PEM,
    ...                               s.PublicFormat.SubjectPublicKeyInfo))
    >>> settings = Settings.from_dict({
    ...     "receipts": {"signer": "key", "key": str(d / "k.pem"), "policy": "steps"},
    ...     "policies": {"steps": {"kind": "key", "public_keys": [str(d / "k.pub")]}}})
    >>> r = sign_receipt(Receipt(step="ingest", context=RunContext(run_id="r1"),
    ...                          status="succeeded"), settings)
    >>> check_receipt(r, settings) == r
    True
    >>> edited = dataclasses.replace(r, status="failed")
    >>> check_receipt(edited, settings)
    Traceback (most recent call last):
    ...
    stepguard.errors.SignatureError: receipt was changed after it was signed: step ingest
    """
    rs = settings.receipts
    if rs.signer is None:
        return receipt
    from stepguard.signing import signer_from_spec
    from stepguard.spec import SigningSpec

    spec = SigningSpec(signer=rs.signer, key=rs.key, transit_mount=rs.transit_mount)
    unsigned = dataclasses.replace(receipt, signature=None)
    with contextlib.ExitStack() as stack:
        client: Any = None
        if rs.signer == "transit":
            client = stack.enter_context(vault_client(settings, session=session)).hvac()
        bundle = signer_from_spec(spec, vault_client=client).sign_dsse(
            unsigned.payload(), RECEIPT_PAYLOAD_TYPE)
    return dataclasses.replace(receipt, signature=bundle.decode())


def check_receipt(receipt: Receipt, settings: Settings, *,
                  session: CredentialSession | None = None) -> Receipt:
    """The receipt as its producer signed it, verified under ``settings.receipts.policy``
    (returned as given when no policy is set). Unsigned, wrongly signed or edited:
    SignatureError naming the producing step."""
    rs = settings.receipts
    if rs.policy is None:
        return receipt
    from stepguard.signing import load_bundle

    subject = f"step {receipt.step}"
    if not receipt.signature:
        raise SignatureError("receipt is not signed; refused", subject=subject,
                             hint="the producing step signs receipts with receipts.signer")
    with policy_from_settings(settings, rs.policy, session=session) as policy:
        verified = policy.verify_bundle(load_bundle(receipt.signature, subject=subject),
                                        subject=subject)
    if verified.payload_type != RECEIPT_PAYLOAD_TYPE:
        raise SignatureError("signature does not sign a receipt", subject=subject)
    signed = Receipt.from_json(verified.payload)
    if signed != dataclasses.replace(receipt, signature=None):
        changed = sorted(k for k, v in signed.to_dict().items()
                         if receipt.to_dict().get(k) != v)
        raise SignatureError("receipt was changed after it was signed", subject=subject,
                             details=[f"changed: {', '.join(changed) or 'fields'}"])
    return receipt
