"""The process's one secret registry: redaction of spans and audit records, Airflow's masker,
and one-way identifier hashing.

Every token, password and key stepguard handles is registered once, with
:func:`register_secret`. From then on:

* every attribute, event, status message and audit-log record is checked against the value and
  the forms a leaked value commonly takes -- upper/lower case, URL-encoded, hex, and base64 at
  every byte alignment (:func:`secret_forms`) -- and a string holding any of them is replaced
  whole by ``[REDACTED]`` before it leaves the process;
* when Airflow is already loaded in this process, its secrets masker -- the registry's one
  sink -- gets the value and its whole-value encodings (:func:`derived_forms`: case, base64
  padded/unpadded/URL-safe, URL encoding), since it only matches the strings it is given.
  Airflow is never imported here: plain Python steps and the KFP runner do not pay its import
  time. (Airflow's masker recompiles one regular expression per new pattern, which grows with
  every value; our own scan does not.)

Values shorter than :data:`MIN_SECRET_LENGTH` characters cannot be guarded without redacting
unrelated text: :func:`register_secret` refuses them rather than pretend they are protected.

>>> from stepguard.audit import register_secret, redact
>>> register_secret("doc-Secret/+42") > 10
True
>>> redact(["ok", "user ZG9jLVNlY3JldC8rNDI= here"])  # its base64 form, inside a string
['ok', '[REDACTED]']
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import sys
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from stepguard.errors import ConfigurationError

log = logging.getLogger("stepguard.audit")

REDACTED = "[REDACTED]"

#: Shortest value the registry guards: below it, guarding would redact unrelated text (Airflow's
#: masker draws a similar line).
MIN_SECRET_LENGTH = 4
#: Identifiers are truncated to 128 bits: plenty for correlation, short enough to read.
_HASH_HEX_CHARS = 32
_DOMAIN = b"stepguard.audit.identifier.v1\x00"

#: Up to this many guarded forms a string is scanned once per form (C-speed substring search);
#: beyond it, through the index of 4-character prefixes, whose cost does not grow with the number
#: of secrets a long-lived process has seen.
_SCAN_EACH_FORM_UP_TO = 128


#: A log masker the registry hands each new value's :func:`derived_forms` to; must not raise.
Sink = Callable[[set[str]], None]


class _Guard:
    """A registry: the registered forms, append-only, and the sinks each new value's derived
    forms also go to. Writers hold ``_lock``; readers take no lock: they see the list and the
    index entries (immutable tuples, replaced whole) as of some moment."""

    def __init__(self, sinks: tuple[Sink, ...] = ()) -> None:
        self.seen: set[str] = set()
        self.forms: list[str] = []
        self.index: dict[str, tuple[str, ...]] = {}
        self.sinks = sinks

    def add(self, forms: frozenset[str]) -> None:
        for form in forms - self.seen:
            self.seen.add(form)
            key = form[:MIN_SECRET_LENGTH]
            self.index[key] = (*self.index.get(key, ()), form)
            self.forms.append(form)

    def found_in(self, text: str) -> bool:
        forms = self.forms
        if len(forms) <= _SCAN_EACH_FORM_UP_TO:
            return any(f in text for f in forms)
        index = self.index
        n = MIN_SECRET_LENGTH
        for i in range(len(text) - n + 1):
            candidates = index.get(text[i:i + n])
            if candidates and any(text.startswith(f, i) for f in candidates):
                return True
        return False


def _mask_in_airflow(forms: set[str]) -> None:
    """Sink: Airflow's secrets masker, when Airflow is already loaded (else nothing)."""
    mask = _airflow_mask()
    if mask is None:
        return
    for form in forms:
        try:
            mask(form)
        except Exception as exc:  # the masker must not stop a step; the value stays unlogged
            log.warning("Airflow secrets masker refused a value (%s)", type(exc).__name__)
            return


def _airflow_mask() -> Callable[[str], Any] | None:
    """Airflow's ``mask_secret``, only when Airflow is already loaded: importing it here would
    put seconds of import time into plain Python steps and the KFP runner."""
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


_lock = threading.Lock()
#: The process's registry, with Airflow's masker as its sink.
_guard = _Guard(sinks=(_mask_in_airflow,))
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
            if len(fragment) >= MIN_SECRET_LENGTH:
                out.add(fragment)
    return out


def derived_forms(value: str) -> set[str]:
    """The value and the whole-value encodings it commonly takes on its way into a log.

    What an exact-match masker (Airflow's) is given. Empty for a value shorter than
    :data:`MIN_SECRET_LENGTH`; forms shorter than that are left out.

    >>> sorted(derived_forms("a b/c+d"))[:4]
    ['A B/C+D', 'YSBiL2MrZA', 'YSBiL2MrZA==', 'a b/c+d']
    >>> "a%20b%2Fc%2Bd" in derived_forms("a b/c+d")
    True
    >>> derived_forms("abc")
    set()
    """
    if len(value) < MIN_SECRET_LENGTH:
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
    return {f for f in forms if len(f) >= MIN_SECRET_LENGTH}


def secret_forms(value: str) -> frozenset[str]:
    """Every form of ``value`` the guard searches for inside any string: case, URL encoding,
    hex, and base64 (standard and URL-safe) at all three byte alignments.

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
    return frozenset(f for f in forms if len(f) >= MIN_SECRET_LENGTH)


def register_secret(value: str | bytes) -> int:
    """Register a secret value, process-wide: from now on it is redacted from every span and
    audit record, and -- when Airflow is loaded -- masked in Airflow's logs (see module docs).

    Returns how many distinct forms of the value are now guarded. An empty value is ignored
    (returns 0: there is nothing to leak); a value shorter than :data:`MIN_SECRET_LENGTH`
    characters raises :class:`~stepguard.errors.ConfigurationError`, since guarding it would
    redact unrelated text -- a caller registering whatever a server returned checks the length
    first. Otherwise never raises: a masker failure is logged (without the value).

    >>> from stepguard.audit import register_secret, redact
    >>> register_secret("hunter2-doctest-canary") > 0
    True
    >>> redact("password=hunter2-doctest-canary")
    '[REDACTED]'
    >>> register_secret("")
    0
    """
    text = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
    if not text:
        return 0
    if len(text) < MIN_SECRET_LENGTH:
        raise ConfigurationError(
            "secret value too short to guard in audit records",
            subject="register_secret",
            hint=f"secrets must be at least {MIN_SECRET_LENGTH} characters",
        )
    guarded = secret_forms(text)
    masked = derived_forms(text)
    with _lock:
        registry = _guard
        registry.add(guarded)
    for sink in registry.sinks:
        sink(masked)
    return len(guarded | masked)


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
        _guard = _Guard(sinks=_guard.sinks)


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
