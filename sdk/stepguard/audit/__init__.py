"""Audit trail: OpenTelemetry spans for every control, a tamper-evident local log, and trace
context across process boundaries.

Library code (the step lifecycle, the controls, the Airflow listener) uses :class:`Auditor`, which
depends on the OpenTelemetry *API* only and takes an optional tracer provider. :func:`configure`
builds the SDK side: a hash-chained JSON-lines log written synchronously, and OTLP over
http/protobuf when the standard ``OTEL_*`` variables name an endpoint.

>>> import tempfile
>>> from stepguard import audit
>>> setup = audit.configure(audit_dir=tempfile.mkdtemp(), otlp=False,
...                         install_signal_handlers=False)
>>> auditor = setup.auditor()
>>> with auditor.step_span("fit", audit.pipeline_attributes("train", "run-1", "fit")) as step:
...     with auditor.control_span("credentials", "acquire",
...                               audit.credential_attributes(["db/creds/r/lease-1"])):
...         pass
...     with auditor.control_span("integrity", "verify"):
...         auditor.verdict("inputs-match-manifest", True, files=2)
>>> audit.verify_chain(setup.audit_log).records
4
>>> setup.shutdown()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stepguard.audit._attributes import (
    STEP_SPAN,
    TASK_SPAN,
    VERDICT_EVENT,
    Attr,
    Attributes,
    AttributeValue,
    artifact_attributes,
    credential_attributes,
    k8s_attributes,
    pipeline_attributes,
    stepguard_attributes,
)
from stepguard.audit._auditor import Auditor, AuditSpan, TaskSpan, get_auditor
from stepguard.audit._chain import (
    AuditLog,
    ChainHead,
    ChainReport,
    FsyncPolicy,
    read_head,
    verify_chain,
)
from stepguard.audit._export import EXPORT_STATUSES, ExportCounter, export_status
from stepguard.audit._export import counter_for as export_counter
from stepguard.audit._propagation import (
    attach_env,
    extract_env,
    inject_env,
    run_context,
    run_trace_ids,
    run_traceparent,
)
from stepguard.audit._redact import (
    MIN_SECRET_LENGTH,
    REDACTED,
    contains_secret,
    derived_forms,
    hash_identifier,
    redact,
    register_secret,
    set_hash_key,
)
from stepguard.audit._segments import (
    SegmentReport,
    SegmentsReport,
    segment_name,
    verify_segment,
    verify_segments,
)
from stepguard.audit._show import show, timeline
from stepguard.audit._signals import flush_all, install_signal_flush, uninstall_signal_flush

if TYPE_CHECKING:
    from stepguard.audit._setup import (
        AuditSetup,
        audit_log_processor,
        configure,
        default_log_path,
        otlp_endpoint_from_env,
        setup_tracing,
    )

# These pull in opentelemetry-sdk: resolved on first use, not at import.
_LAZY = {
    "AuditSetup": "stepguard.audit._setup",
    "audit_log_processor": "stepguard.audit._setup",
    "configure": "stepguard.audit._setup",
    "default_log_path": "stepguard.audit._setup",
    "otlp_endpoint_from_env": "stepguard.audit._setup",
    "setup_tracing": "stepguard.audit._setup",
    "AuditLogProcessor": "stepguard.audit._exporters",
    "JsonlSpanExporter": "stepguard.audit._exporters",
    "RedactingSpanExporter": "stepguard.audit._exporters",
}

__all__ = [
    "EXPORT_STATUSES",
    "MIN_SECRET_LENGTH",
    "REDACTED",
    "STEP_SPAN",
    "TASK_SPAN",
    "VERDICT_EVENT",
    "Attr",
    "AttributeValue",
    "Attributes",
    "AuditLog",
    "AuditLogProcessor",
    "AuditSetup",
    "AuditSpan",
    "Auditor",
    "ChainHead",
    "ChainReport",
    "ExportCounter",
    "FsyncPolicy",
    "JsonlSpanExporter",
    "RedactingSpanExporter",
    "SegmentReport",
    "SegmentsReport",
    "TaskSpan",
    "artifact_attributes",
    "attach_env",
    "audit_log_processor",
    "configure",
    "contains_secret",
    "credential_attributes",
    "default_log_path",
    "derived_forms",
    "export_counter",
    "export_status",
    "extract_env",
    "flush_all",
    "get_auditor",
    "hash_identifier",
    "inject_env",
    "install_signal_flush",
    "k8s_attributes",
    "otlp_endpoint_from_env",
    "pipeline_attributes",
    "read_head",
    "redact",
    "segment_name",
    "register_secret",
    "run_context",
    "run_trace_ids",
    "run_traceparent",
    "set_hash_key",
    "verify_segment",
    "verify_segments",
    "setup_tracing",
    "show",
    "stepguard_attributes",
    "timeline",
    "uninstall_signal_flush",
    "verify_chain",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stepguard.audit' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
