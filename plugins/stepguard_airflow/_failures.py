"""How a failed secured task ends: the control an error belongs to, whether retrying can change
the outcome, and the one-line Airflow exception that names them.

A leaf module: the operators, the asset and lineage helpers all take these from here, so none
of them imports another to report a failure.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger("stepguard.airflow")

__all__ = ["control_of", "control_of_name", "is_final", "step_name", "task_failure"]


def step_name(task_id: str) -> str:
    """A valid stepguard step name from an Airflow task id (dots of task groups kept)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", task_id)[:63].lstrip("_.-")
    return name or "step"


#: Error class name -> the control that raised it, for the one-line failure summary.
_CONTROLS: tuple[tuple[str, str], ...] = (
    ("IntegrityError", "integrity"), ("ManifestError", "integrity"),
    ("SignatureError", "signing"), ("PolicyViolation", "policy"),
    ("VersionConflict", "registry"), ("RegistryError", "registry"),
    ("CredentialError", "credentials"), ("StepTimeout", "isolation"),
    ("IsolationError", "isolation"), ("AuditError", "audit"), ("BodyFailed", "body"),
    ("ConfigurationError", "configuration"), ("VerificationError", "integrity"),
)


def control_of(err: Exception) -> str:
    """The control an error belongs to (``integrity``, ``credentials``, ``body``...)."""
    return _control_of_type(type(err))


def _control_of_type(cls: type) -> str:
    names = {c.__name__ for c in cls.__mro__}
    return next((control for name, control in _CONTROLS if name in names), "step")


def control_of_name(type_name: str) -> str:
    """:func:`control_of` for an error known by its class name only (a receipt's error).

    >>> control_of_name("IntegrityError"), control_of_name("TransientCredentialError")
    ('integrity', 'credentials')
    """
    from stepguard import errors

    cls = getattr(errors, type_name, None)
    if isinstance(cls, type):
        return _control_of_type(cls)
    return next((control for name, control in _CONTROLS if name == type_name), "step")


def is_final(err: Exception) -> bool:
    """Whether a retry cannot change the outcome: a security verdict, a caller mistake, a
    denial by Vault, or a registry version that exists with other bytes."""
    from stepguard.errors import (
        ConfigurationError,
        CredentialDenied,
        TransientError,
        VerificationError,
        VersionConflict,
    )

    if isinstance(err, TransientError):
        return False
    return isinstance(err, (VerificationError, ConfigurationError, CredentialDenied,
                            VersionConflict))


def task_failure(step: str, err: Exception) -> Exception:
    """The Airflow exception that ends the task: one line naming the step, the control, the
    error and its subject, the body's own (masked) message included.

    Final errors (:func:`is_final`) raise ``AirflowFailException``, so the task fails without
    using its retries; everything else raises ``AirflowException`` and retries with the task's
    policy. The error's findings and hint are logged once, as one record, before it. Raise it
    ``from None``: it carries the traceback of where the error happened.
    """
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    from stepguard.audit import redact
    from stepguard.errors import StepguardError

    if isinstance(err, StepguardError):
        extra = err.diagnostics().splitlines()[1:]
        if extra:
            log.error("%s", redact("\n".join(extra)))
        message = (f"stepguard step {step!r} failed: {type(err).__name__} "
                   f"[{control_of(err)}]: {redact(str(err))}")
        failure: Exception = (AirflowFailException(message) if is_final(err)
                              else AirflowException(message))
    else:
        failure = AirflowException(f"stepguard step {step!r} failed: {type(err).__name__}")
    # One traceback, not three chained ones: raised ``from None``, the failure carries the
    # frames of where it really happened -- the body's own for a body error.
    cause = err.__cause__ if type(err).__name__ == "BodyFailed" else None
    return failure.with_traceback((cause or err).__traceback__)
