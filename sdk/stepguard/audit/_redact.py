"""Secret redaction guard and one-way identifier hashing.

The credentials code registers every secret value it handles; every attribute, event, status
message and audit-log record is checked against those values -- and the encoded forms a value
commonly takes when it leaks (upper/lower case, base64 at any alignment, URL-encoded, hex) --
before it leaves the process.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any

from stepguard.errors import ConfigurationError

REDACTED = "[REDACTED]"

#: Below this length a value cannot be guarded without redacting unrelated text.
_MIN_SECRET_LEN = 4
#: Identifiers are truncated to 128 bits: plenty for correlation, short enough to read.
_HASH_HEX_CHARS = 32
_DOMAIN = b"stepguard.audit.identifier.v1\x00"

#: Up to this many guarded forms a string is scanned once per form (C-speed substring search);
#: beyond it, through the index of 4-character prefixes, whose cost does not grow with the number
#: of secrets a long-lived process has seen.
_SCAN_EACH_FORM_UP_TO = 128


class _Guard:
    """The registered forms, append-only. Writers hold ``_lock``; readers take no lock: they see
    the list and the index entries (immutable tuples, replaced whole) as of some moment."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.forms: list[str] = []
        self.index: dict[str, tuple[str, ...]] = {}

    def add(self, forms: frozenset[str]) -> None:
        for form in forms - self.seen:
            self.seen.add(form)
            key = form[:_MIN_SECRET_LEN]
            self.index[key] = (*self.index.get(key, ()), form)
            self.forms.append(form)

    def found_in(self, text: str) -> bool:
        forms = self.forms
        if len(forms) <= _SCAN_EACH_FORM_UP_TO:
            return any(f in text for f in forms)
        index = self.index
        n = _MIN_SECRET_LEN
        for i in range(len(text) - n + 1):
            candidates = index.get(text[i:i + n])
            if candidates and any(text.startswith(f, i) for f in candidates):
                return True
        return False


_lock = threading.Lock()
_guard = _Guard()
_hash_key: bytes | None = None


def _base64_fragments(raw: bytes) -> set[str]:
    """The base64 characters that encode only ``raw``, at each of the three byte alignments.

    A secret embedded in a larger base64 blob (``user:secret`` in a Basic auth header) does not
    produce ``b64(secret)``; it produces one of three alignments. Characters that straddle the
    neighbouring bytes are dropped so the fragment matches whatever surrounds it.
    """
    out: set[str] = set()
    n = len(raw)
    for k in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(b"\x00" * k + raw).decode("ascii")
            first = -(-8 * k // 6)  # ceil(8k/6): first char made only of secret bits
            last = (8 * (k + n)) // 6  # exclusive: last char made only of secret bits
            fragment = text[first:last]
            if len(fragment) >= _MIN_SECRET_LEN:
                out.add(fragment)
    return out


def secret_forms(value: str) -> frozenset[str]:
    """Every form of ``value`` the guard searches for.

    >>> forms = secret_forms("s3cr3t-value")
    >>> "S3CR3T-VALUE" in forms and "czNjcjN0LXZhbHVl" in forms
    True
    """
    raw = value.encode("utf-8")
    forms = {
        value,
        value.upper(),
        value.lower(),
        urllib.parse.quote(value, safe=""),
        urllib.parse.quote_plus(value),
        raw.hex(),
        raw.hex().upper(),
    }
    forms |= _base64_fragments(raw)
    return frozenset(f for f in forms if len(f) >= _MIN_SECRET_LEN)


def register_secret(value: str | bytes) -> None:
    """Register a secret value: from now on it is redacted from every span and audit record.

    Called by the credentials code for every token, password and key it obtains. An empty value
    is ignored (there is nothing to leak); a value shorter than four characters is refused, since
    guarding it would redact unrelated text.

    >>> from stepguard.audit import register_secret, redact
    >>> register_secret("hunter2-canary")
    >>> redact("password=hunter2-canary")
    '[REDACTED]'
    """
    text = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
    if not text:
        return
    if len(text) < _MIN_SECRET_LEN:
        raise ConfigurationError(
            "secret value too short to guard in audit records",
            subject="register_secret",
            hint=f"secrets must be at least {_MIN_SECRET_LEN} characters",
        )
    new = secret_forms(text)
    with _lock:
        _guard.add(new)


def contains_secret(text: str) -> bool:
    """True when ``text`` contains a registered secret in any guarded form."""
    return bool(_guard.forms) and _guard.found_in(text)


def redact(value: Any) -> Any:
    """Return ``value`` with any string holding a registered secret replaced by ``[REDACTED]``.

    Works on strings, sequences and mappings (keys too); other values pass through unchanged.
    The whole string is replaced, not only the secret, so no partial encoding survives.
    """
    if not _guard.forms:
        return value
    return _redact(value)


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return REDACTED if contains_secret(value) else value
    if isinstance(value, bytes):
        return REDACTED if contains_secret(value.decode("utf-8", "replace")) else value
    if isinstance(value, Mapping):
        return {_redact(k): _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact(v) for v in value)
    return value


def has_secrets() -> bool:
    """True when at least one secret is registered (lets hot paths skip the scan)."""
    return bool(_guard.forms)


def _forget_all_secrets() -> None:
    # For tests only: a real process never forgets a secret it has seen.
    global _guard  # noqa: PLW0603 - process-wide state by design
    with _lock:
        _guard = _Guard()


def set_hash_key(key: bytes | None) -> None:
    """Use HMAC-SHA256 with ``key`` for :func:`hash_identifier` from now on (``None``: unkeyed).

    A deployment-wide key makes hashes useless to anyone who does not hold it, even for
    low-entropy identifiers; responders holding the key can still check "is lease X in the log?".
    """
    global _hash_key  # noqa: PLW0603 - process-wide state by design
    if key is not None and len(key) < 16:
        raise ConfigurationError("audit hash key too short", subject="hash key",
                                 hint="use at least 16 random bytes")
    _hash_key = key
    if key is not None:
        register_secret(key.hex())


def hash_identifier(value: str, *, key: bytes | None = None) -> str:
    """One-way hash of a lease id, token accessor or similar identifier, for audit attributes.

    Keyed (``hmac-sha256:``) when a key is given or set with :func:`set_hash_key`; otherwise a
    domain-separated SHA-256 (``sha256:``), which is irreversible for identifiers with high entropy
    such as Vault lease ids and accessors. Truncated to 128 bits.

    >>> h = hash_identifier("database/creds/train/AbCdEf123")
    >>> h.startswith("sha256:") and len(h) == 7 + 32
    True
    >>> h == hash_identifier("database/creds/train/AbCdEf123")
    True
    >>> hash_identifier("x", key=b"k" * 16).startswith("hmac-sha256:")
    True
    """
    if not isinstance(value, str) or not value:
        raise ConfigurationError("identifier to hash must be a non-empty string",
                                 subject="hash_identifier")
    use_key = key if key is not None else _hash_key
    data = value.encode("utf-8")
    if use_key is not None:
        digest = hmac.new(use_key, _DOMAIN + data, hashlib.sha256).hexdigest()
        return "hmac-sha256:" + digest[:_HASH_HEX_CHARS]
    return "sha256:" + hashlib.sha256(_DOMAIN + data).hexdigest()[:_HASH_HEX_CHARS]
