"""Exporter setup: builds an OpenTelemetry SDK tracer provider for the audit trail.

Kept apart from the span model so library code depends on the OpenTelemetry API only; the SDK
is imported here, inside the functions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from stepguard.audit import _signals
from stepguard.audit._auditor import Auditor
from stepguard.audit._chain import AuditLog, FsyncPolicy, verify_chain
from stepguard.errors import ConfigurationError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

DEFAULT_DIR = Path(".stepguard") / "audit"
DEFAULT_NAME = "audit.jsonl"


def default_log_path(audit_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the local audit log goes: ``$STEPGUARD_AUDIT_LOG``, else ``<dir>/audit.jsonl`` with
    ``<dir>`` = ``audit_dir``, ``$STEPGUARD_AUDIT_DIR`` or ``./.stepguard/audit``."""
    if audit_dir is None and os.environ.get("STEPGUARD_AUDIT_LOG"):
        return Path(os.environ["STEPGUARD_AUDIT_LOG"])
    base = audit_dir or os.environ.get("STEPGUARD_AUDIT_DIR") or (Path.cwd() / DEFAULT_DIR)
    return Path(base) / DEFAULT_NAME


def otlp_endpoint_from_env() -> str | None:
    """The OTLP traces endpoint named by the standard ``OTEL_*`` variables, if any."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    exporters = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower()
    if "otlp" not in exporters.split(","):
        return None
    return (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None)


def audit_log_processor(path: str | os.PathLike[str], *, fsync: FsyncPolicy = "close"
                        ) -> SpanProcessor:
    """A span processor writing every span to the hash-chained log at ``path``, synchronously,
    through the redaction guard. Add it to an existing SDK provider (Airflow's, for one)."""
    from stepguard.audit._exporters import AuditLogProcessor

    return AuditLogProcessor(AuditLog(path, fsync=fsync))


def _otlp_exporter() -> Any:
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
    try:
        if protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        elif protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore
                OTLPSpanExporter,
            )
        else:
            raise ConfigurationError("unsupported OTLP protocol",
                                     subject="OTEL_EXPORTER_OTLP_PROTOCOL",
                                     hint="use http/protobuf or grpc")
    except ImportError as exc:
        raise ConfigurationError("OTLP exporter package not installed", subject=protocol) from exc
    # Endpoint, headers, timeout, compression and certificates come from the OTEL_* variables.
    return OTLPSpanExporter()


@dataclass
class AuditSetup:
    """What :func:`configure` built. ``auditor()`` gives an :class:`Auditor` on its provider."""

    tracer_provider: TracerProvider
    audit_log: Path | None
    otlp_endpoint: str | None
    signal_handlers: bool
    _auditor: Auditor | None = field(default=None, repr=False)

    def auditor(self) -> Auditor:
        if self._auditor is None:
            self._auditor = Auditor(self.tracer_provider)
        return self._auditor

    def flush(self, timeout_ms: int = 5000) -> bool:
        """Export everything pending and fsync the local log."""
        return bool(self.tracer_provider.force_flush(timeout_ms))

    def shutdown(self) -> None:
        """Flush and release exporters (also runs at interpreter exit)."""
        self.tracer_provider.shutdown()


def configure(
    *,
    service_name: str = "stepguard",
    audit_log: str | os.PathLike[str] | bool | None = None,
    audit_dir: str | os.PathLike[str] | None = None,
    otlp: bool | None = None,
    otlp_processor: Literal["batch", "simple"] = "batch",
    fsync: FsyncPolicy = "close",
    resource_attributes: Mapping[str, str] | None = None,
    set_global: bool = False,
    install_signal_handlers: bool = True,
) -> AuditSetup:
    """Build an SDK tracer provider for the audit trail.

    * Local log (default on): every span is appended, synchronously, to the hash-chained JSONL
      log (``audit_log`` path; ``None`` = :func:`default_log_path`; ``False`` = off).
    * OTLP over http/protobuf when ``otlp`` is true, or when it is ``None`` and
      ``OTEL_EXPORTER_OTLP_ENDPOINT``/``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set; endpoint,
      headers and timeouts come from the standard ``OTEL_*`` variables. Batched by default
      (flushed at each step's end); ``otlp_processor="simple"`` exports each span as it ends.
    * ``fsync``: when the local log reaches the disk (see :class:`AuditLog`); every record is
      in the kernel when its span ends whatever the policy.
    * SIGTERM force-flushes before the previous handler runs (main thread only).
    * Every exporter sits behind the redaction guard.
    * Audit spans are never sampled out: the sampler is always-on, so neither
      ``OTEL_TRACES_SAMPLER`` nor an unsampled ``traceparent`` can switch the audit off.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> setup = configure(audit_dir=d, otlp=False, install_signal_handlers=False)
    >>> with setup.auditor().step_span("doc-step"):
    ...     pass
    >>> verify_chain(setup.audit_log).records  # genesis + one span
    2
    >>> setup.shutdown()
    """
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    from stepguard.audit._exporters import RedactingSpanExporter

    if otlp_processor not in ("batch", "simple"):
        raise ConfigurationError("unknown OTLP span processor", subject=str(otlp_processor),
                                 hint="use 'batch' or 'simple'")
    attrs: dict[str, str] = {"service.name": service_name, **(resource_attributes or {})}
    provider = TracerProvider(resource=Resource.create(attrs), sampler=ALWAYS_ON)
    log_path: Path | None = None
    if audit_log is not False:
        log_path = (default_log_path(audit_dir) if audit_log in (None, True)
                    else Path(audit_log))  # type: ignore[arg-type]
        provider.add_span_processor(audit_log_processor(log_path, fsync=fsync))
    endpoint = otlp_endpoint_from_env()
    use_otlp = bool(endpoint) if otlp is None else otlp
    if use_otlp:
        exporter = RedactingSpanExporter(_otlp_exporter())
        processor = (BatchSpanProcessor(exporter) if otlp_processor == "batch"
                     else SimpleSpanProcessor(exporter))
        provider.add_span_processor(processor)
        from stepguard.audit._export import register_counter

        register_counter(provider, exporter.counter)
    _signals.register_flush_target(provider)
    handlers = _signals.install_signal_flush() if install_signal_handlers else False
    if set_global:
        from opentelemetry import trace

        trace.set_tracer_provider(provider)
    return AuditSetup(provider, log_path, endpoint if use_otlp else None, handlers)



_cache: dict[tuple[Any, ...], AuditSetup] = {}


def setup_tracing(settings: Any = None, *, service_name: str = "stepguard",
                  install_signal_handlers: bool = True) -> TracerProvider | None:
    """The tracer provider for :class:`stepguard.settings.Settings` (``settings.audit``).

    ``exporter`` ``"jsonl"`` (default): the local log at ``settings.audit_path``, plus OTLP when
    the ``OTEL_*`` variables name an endpoint; ``"otlp"``: OTLP only; ``"both"``: both, OTLP
    required; ``"none"``: returns ``None`` (auditing off). One provider per distinct
    configuration per process: calling it for every step reuses it.

    >>> import tempfile, pathlib
    >>> from stepguard.settings import Settings
    >>> d = tempfile.mkdtemp()
    >>> s = Settings.from_dict({"state_dir": d, "audit": {"exporter": "jsonl"}})
    >>> setup_tracing(s, install_signal_handlers=False) is setup_tracing(s)
    True
    >>> setup_tracing(Settings.from_dict({"audit": {"exporter": "none"}})) is None
    True
    """
    exporter = "jsonl"
    log_path: Path | None = None
    if settings is not None:
        exporter = settings.audit.exporter
        log_path = Path(settings.audit_path).absolute()
    if exporter == "none":
        return None
    if exporter not in ("jsonl", "otlp", "both"):
        raise ConfigurationError("unknown audit exporter", subject=str(exporter),
                                 hint="use jsonl, otlp, both or none")
    otlp: bool | None = {"jsonl": None, "otlp": True, "both": True}[exporter]
    local: Path | bool | None = False if exporter == "otlp" else log_path
    key = (service_name, exporter, str(local), otlp_endpoint_from_env())
    setup = _cache.get(key)
    if setup is None:
        setup = configure(service_name=service_name, audit_log=local, otlp=otlp,
                          install_signal_handlers=install_signal_handlers)
        _cache[key] = setup
    return setup.tracer_provider


__all__ = ["AuditSetup", "audit_log_processor", "configure", "default_log_path",
           "otlp_endpoint_from_env", "setup_tracing", "verify_chain"]
