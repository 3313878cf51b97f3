"""Registering issued values with every masker in the process, derived forms included.

Masking is the second line of defence: values should never reach a log in the first place. But
when they do, Airflow's masker only matches the exact string, so the forms a value commonly takes
on the way to a sink (upper/lower case, base64, URL encoding) are registered too.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import sys
import urllib.parse
from typing import Any

log = logging.getLogger("stepguard.credentials")

#: Airflow's masker ignores shorter values; so do we (masking them would redact unrelated text).
MIN_MASK_LENGTH = 4


def derived_forms(value: str) -> set[str]:
    """The value and the encodings it commonly takes on its way into a log.

    >>> sorted(derived_forms("a b/c+d"))[:4]
    ['A B/C+D', 'YSBiL2MrZA', 'YSBiL2MrZA==', 'a b/c+d']
    >>> "a%20b%2Fc%2Bd" in derived_forms("a b/c+d")
    True
    """
    if len(value) < MIN_MASK_LENGTH:
        return set()
    raw = value.encode("utf-8")
    forms = {
        value,
        value.upper(),
        value.lower(),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        urllib.parse.quote(value, safe=""),
        urllib.parse.quote_plus(value, safe=""),
        value.encode("unicode_escape").decode("ascii"),
    }
    return {f for f in forms if len(f) >= MIN_MASK_LENGTH}


def hash_identifier(value: str) -> str:
    """One-way hash of a lease id or token accessor, shared with the audit package when present.

    >>> hash_identifier("database/creds/r/abc").startswith(("sha256:", "hmac-sha256:"))
    True
    >>> hash_identifier("")
    ''
    """
    if not value:
        return ""
    try:
        from stepguard.audit import hash_identifier as audit_hash
    except ImportError:
        return "sha256:" + hashlib.sha256(b"stepguard-id\0" + value.encode()).hexdigest()[:32]
    return str(audit_hash(value))


def _airflow_mask() -> Any:
    # Only when Airflow is already loaded: importing it here would put seconds of import time
    # into plain Python steps and the KFP runner.
    if "airflow.sdk" not in sys.modules and "airflow" not in sys.modules:
        return None
    try:
        from airflow.sdk.log import mask_secret

        return mask_secret
    except ImportError:
        pass
    try:
        from airflow.sdk._shared.secrets_masker import mask_secret as shared_mask

        return shared_mask
    except ImportError:
        return None


def register_secret(value: str) -> int:
    """Register ``value`` and its derived forms with Airflow's masker and the audit redactor.

    Returns how many forms were registered (0 for empty or too-short values). Never raises:
    a masker failure is logged (without the value) and issuance goes on.

    >>> register_secret("")
    0
    """
    if not value or len(value) < MIN_MASK_LENGTH:
        return 0
    forms = derived_forms(value)
    mask = _airflow_mask()
    audit_register: Any = None
    try:
        from stepguard.audit import register_secret as audit_register
    except ImportError:
        audit_register = None
    if audit_register is not None:
        # The audit redactor derives its own encoded forms: give it the value once.
        try:
            audit_register(value)
        except Exception as exc:
            log.warning("audit redactor refused a value (%s)", type(exc).__name__)
    if mask is not None:
        for form in forms:
            try:
                mask(form)
            except Exception as exc:  # the masker must not stop a step; the value stays unlogged
                log.warning("Airflow secrets masker refused a value (%s)", type(exc).__name__)
                break
    return len(forms)
