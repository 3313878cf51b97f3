"""One exception tree for everything stepguard raises.

Three families that callers handle differently:

* :class:`ConfigurationError` -- the caller asked for something invalid (bad settings, a malformed
  spec, an unsafe manifest entry). Fix the input; retrying will not help.
* :class:`VerificationError` -- a security verdict: data, a signature or a policy did not check out.
  Never retry, never downgrade; stop the pipeline.
* :class:`OperationalError` -- something we depend on failed (Vault, the sandbox, the registry).
  :class:`TransientError` subclasses may be retried; everything else may not.

Every error carries a short ``message`` that is safe to log (it never contains a secret value), an
optional ``subject`` naming the thing that is wrong (a file, a setting, a lease -- hashed), optional
``details`` (one line per finding, e.g. every modified file) and an optional ``hint``.

>>> from stepguard.errors import IntegrityError, VerificationError
>>> err = IntegrityError("inputs do not match manifest", subject="data/train.csv",
...                      details=("modified: data/train.csv",))
>>> isinstance(err, VerificationError)
True
>>> print(err)
inputs do not match manifest: data/train.csv
>>> print(err.diagnostics())
IntegrityError: inputs do not match manifest: data/train.csv
  - modified: data/train.csv
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "AuditError",
    "BodyFailed",
    "ConfigurationError",
    "CredentialDenied",
    "CredentialError",
    "EvidenceNotFound",
    "GpuUnavailable",
    "IntegrityError",
    "IsolationError",
    "ManifestError",
    "OperationalError",
    "PolicyViolation",
    "RegistryError",
    "ServiceError",
    "SignatureError",
    "StepTimeout",
    "StepguardError",
    "TransientError",
    "TransientCredentialError",
    "VerificationError",
    "VersionConflict",
]


class StepguardError(Exception):
    """Root of every error stepguard raises.

    ``str(err)`` is one line: the message, then the subject when there is one.
    """

    #: Process exit status the CLI uses for this family of errors.
    exit_code: int = 1

    def __init__(
        self,
        message: str,
        *,
        subject: str | None = None,
        details: Iterable[str] = (),
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.subject = subject
        self.details: tuple[str, ...] = tuple(details)
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if self.subject:
            return f"{self.message}: {self.subject}"
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__str__()!r})"

    def __reduce__(self) -> tuple[object, ...]:
        # Keep errors picklable (Airflow and multiprocessing move them between processes).
        return (_rebuild, (type(self), self.message, self.subject, self.details, self.hint))

    def diagnostics(self) -> str:
        """A multi-line, human-oriented explanation: the error, every finding, and the hint."""
        lines = [f"{type(self).__name__}: {self}"]
        lines += [f"  - {d}" for d in self.details]
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)


def _rebuild(
    cls: type[StepguardError],
    message: str,
    subject: str | None,
    details: tuple[str, ...],
    hint: str | None,
) -> StepguardError:
    err = cls.__new__(cls)
    StepguardError.__init__(err, message, subject=subject, details=details, hint=hint)
    return err


# -- caller mistakes ---------------------------------------------------------------------------


class ConfigurationError(StepguardError):
    """The caller's input is invalid: settings, a step spec, CLI arguments."""

    exit_code = 2


class EvidenceNotFound(ConfigurationError):
    """What an investigation named is not there: an unknown model or version in the registry, a
    run with no receipts, a receipt that does not exist (``stepguard trace``, exit status 2)."""


class ManifestError(ConfigurationError):
    """A manifest is malformed or unsafe (absolute/``..`` paths, duplicates, bad root digest)."""

    exit_code = 4


# -- security verdicts -------------------------------------------------------------------------


class VerificationError(StepguardError):
    """A security check failed. Never retried, never downgraded to a warning."""

    exit_code = 3


class IntegrityError(VerificationError):
    """Bytes on disk or in a bucket do not match their manifest (modified, added, missing...)."""


class SignatureError(VerificationError):
    """A signature is missing, malformed, or made by a key/identity the policy does not accept."""


class PolicyViolation(VerificationError):
    """Something is well-formed and authentic but forbidden by policy (unsafe format, bad pod)."""


# -- operational failures ----------------------------------------------------------------------


class OperationalError(StepguardError):
    """A dependency (Vault, sandbox, registry, exporter) failed."""

    exit_code = 5


class TransientError(OperationalError):
    """A failure that may succeed when retried (connection reset, 429, 502, 503)."""


class CredentialError(OperationalError):
    """Credentials could not be obtained, renewed or revoked."""


class TransientCredentialError(CredentialError, TransientError):
    """Vault was unreachable or overloaded; the bounded retries are exhausted or still running."""


class CredentialDenied(CredentialError):
    """Vault refused (401/403): wrong role, missing policy, expired or revoked token."""


class IsolationError(OperationalError):
    """The sandbox or pod could not be created, or was torn down abnormally."""


class GpuUnavailable(IsolationError):
    """The step asks for GPUs that are not visible where it runs (and does not say they are
    optional): it would otherwise train on the CPU for hours, or fail deep inside the body."""


class StepTimeout(IsolationError):
    """The step body exceeded its deadline and was killed (whole process tree)."""


class RegistryError(OperationalError):
    """The artifact registry failed to store or return an artifact."""


class VersionConflict(RegistryError):
    """A registry version already exists with other bytes. Versions are immutable, so a
    retry cannot succeed: publish under a new version. (Same name, version and bytes is not a
    conflict: the publish returns the existing record.)"""


class AuditError(OperationalError):
    """Audit records could not be written, exported, or verified as a chain."""


class ServiceError(OperationalError):
    """A local development service (OpenBao, PostgreSQL, moto) could not be started or reached."""


class BodyFailed(StepguardError):
    """The step body itself failed (non-zero exit or an exception). Cleanup still ran."""

    exit_code = 6
