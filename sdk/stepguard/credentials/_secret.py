"""Secret values that never print (``SecretStr``, the read-only ``SecretMapping``), and how the
credentials code hands each value and identifier to the process's one secret registry,
:mod:`stepguard.audit` (redaction of spans and records, Airflow's masker, identifier hashing).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator, Mapping
from typing import NoReturn

_MASK = "**********"


class SecretStr:
    """A string that does not reveal itself in ``str``, ``repr``, f-strings or pickles.

    The value is only reachable through :meth:`get_secret_value`, so it cannot reach a log line,
    an exception message, XCom or a rendered template by accident.

    >>> s = SecretStr("hunter2-canary")
    >>> s
    SecretStr('**********')
    >>> f"{s} {s!r} {s:>20}"
    "********** SecretStr('**********') **********"
    >>> s.get_secret_value()
    'hunter2-canary'
    >>> s == SecretStr("hunter2-canary")
    True
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("SecretStr holds a str")
        object.__setattr__(self, "_value", value)

    def get_secret_value(self) -> str:
        """The value itself. Pass it straight to the client that needs it; never log it."""
        value: str = object.__getattribute__(self, "_value")
        return value

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("SecretStr is immutable")

    def __repr__(self) -> str:
        return f"SecretStr({_MASK!r})"

    def __str__(self) -> str:
        return _MASK

    def __format__(self, spec: str) -> str:
        # The format spec is ignored on purpose: padding or slicing must not reveal the length.
        return _MASK

    def __bool__(self) -> bool:
        return bool(self.get_secret_value())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SecretStr):
            return hmac.compare_digest(self.get_secret_value().encode(),
                                       other.get_secret_value().encode())
        return NotImplemented

    def __hash__(self) -> int:
        return hash(("SecretStr", self.get_secret_value()))

    def __reduce__(self) -> NoReturn:
        # Pickling is how values travel to XCom, multiprocessing and caches: refuse.
        raise TypeError("a SecretStr cannot be pickled or serialized")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("a SecretStr cannot be pickled or serialized")

    def __copy__(self) -> SecretStr:
        return self

    def __deepcopy__(self, memo: object) -> SecretStr:
        return self


class SecretMapping(Mapping[str, SecretStr]):
    """The values of one credential (``username``, ``password``, ...) as :class:`SecretStr`.

    Keys are printable; values are not.

    >>> m = SecretMapping({"username": "v-step-x1", "password": "s3cr3t-canary"})
    >>> m
    SecretMapping(keys=['password', 'username'])
    >>> m["password"]
    SecretStr('**********')
    >>> m.reveal("username")
    'v-step-x1'
    >>> "s3cr3t" in str(dict(m))
    False
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, str | SecretStr]) -> None:
        self._data: dict[str, SecretStr] = {
            str(k): v if isinstance(v, SecretStr) else SecretStr(str(v)) for k, v in data.items()
        }

    def __getitem__(self, key: str) -> SecretStr:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def reveal(self, key: str) -> str:
        """The plain value of ``key`` (shorthand for ``m[key].get_secret_value()``)."""
        return self._data[key].get_secret_value()

    def reveal_all(self) -> dict[str, str]:
        """A plain ``dict`` copy, for handing to a client library. Do not log it."""
        return {k: v.get_secret_value() for k, v in self._data.items()}

    def __repr__(self) -> str:
        return f"SecretMapping(keys={sorted(self._data)!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a SecretMapping cannot be pickled or serialized")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("a SecretMapping cannot be pickled or serialized")

    def __copy__(self) -> SecretMapping:
        return self

    def __deepcopy__(self, memo: object) -> SecretMapping:
        return self


def guard(value: str) -> None:
    """Register a value Vault (or STS) handed us with :func:`stepguard.audit.register_secret`.

    Values shorter than :data:`stepguard.audit.MIN_SECRET_LENGTH` (a KV flag, a port) cannot be
    guarded without redacting unrelated text; they are left out instead of failing the step.

    >>> guard("s3cr3t-guard-doctest"); guard("on"); guard("")
    >>> from stepguard.audit import redact
    >>> redact("dsn=u:s3cr3t-guard-doctest@db"), redact("on")
    ('[REDACTED]', 'on')
    """
    from stepguard.audit import MIN_SECRET_LENGTH, register_secret

    if len(value) >= MIN_SECRET_LENGTH:
        register_secret(value)


def hashed_id(value: str) -> str:
    """The audit hash of a lease id, accessor or token (:func:`stepguard.audit.hash_identifier`),
    ``""`` when there is none.

    >>> hashed_id("database/creds/r/abc").startswith(("sha256:", "hmac-sha256:")), hashed_id("")
    (True, '')
    """
    if not value:
        return ""
    from stepguard.audit import hash_identifier

    return hash_identifier(value)
