"""The step lifecycle's view of auditing: one step span, a child span per control, verdicts.

Uses the OpenTelemetry API only. The tracer provider is the caller's when given; otherwise the
audit settings decide (``none`` disables auditing; other exporters are configured by
:mod:`stepguard.audit`).

The step span's parent is the current span (an orchestrator's task span), else ``TRACEPARENT``,
else the run root :func:`stepguard.audit.run_context` derives from the run's identity, so every
step of one pipeline run shares one trace with no state passed between them. While a step runs,
:func:`current_audit` returns its :class:`StepAudit`, so the wiring that signs, verifies and
gates (called from inside the lifecycle or a step body) adds its spans and verdicts to it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any

from stepguard.receipt import ExportRecord, VerificationRecord
from stepguard.settings import Settings
from stepguard.spec import RunContext, StepSpec

_TRACER = "stepguard"
_current: contextvars.ContextVar[StepAudit | None] = contextvars.ContextVar(
    "stepguard_step_audit", default=None)


#: The provider of the last settings object seen, with the OTLP endpoint it was built for:
#: a worker running many steps with one Settings skips the lookup (it costs tens of µs).
_last_provider: tuple[Any, str | None, Any] | None = None
#: Run root contexts by run identity (a few runs per process at most).
_run_roots: dict[tuple[str, str, str], Any] = {}


def _run_root(orchestrator: str, pipeline: str, run_id: str) -> Any:
    key = (orchestrator, pipeline, run_id)
    ctx = _run_roots.get(key)
    if ctx is None:
        from stepguard.audit import run_context

        if len(_run_roots) > 64:
            _run_roots.clear()
        ctx = _run_roots[key] = run_context(orchestrator, pipeline, run_id)
    return ctx


def current_audit() -> StepAudit | None:
    """The :class:`StepAudit` of the step running in this context, if any."""
    return _current.get()


class StepAudit:
    """Spans and verdicts for one step run."""

    def __init__(self, settings: Settings, tracer_provider: object | None) -> None:
        self.settings = settings
        self.enabled = tracer_provider is not None or settings.audit.exporter != "none"
        self._provider: Any = tracer_provider
        self._auditor: Any = None
        self._span: Any = None
        self.trace_id: str | None = None
        #: Signature verifications made during the step (the receipt's ``verifications``).
        self.verifications: list[VerificationRecord] = []
        #: Whether the step's spans reached the OTLP collector (set by :meth:`flush`).
        self.export: ExportRecord | None = None
        self._export_before: tuple[int, int] | None = None
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._log: Any = None

    def _get_auditor(self) -> Any:
        global _last_provider  # noqa: PLW0603 - a one-entry cache
        if self._auditor is None:
            from stepguard.audit import Auditor, otlp_endpoint_from_env, setup_tracing

            provider = self._provider
            if provider is None:
                endpoint = otlp_endpoint_from_env()
                last = _last_provider
                if last is not None and last[0] is self.settings and last[1] == endpoint:
                    provider = last[2]
                else:
                    provider = setup_tracing(self.settings)
                    _last_provider = (self.settings, endpoint, provider)
            self._provider = provider
            self._auditor = Auditor(tracer_provider=provider)
        return self._auditor

    @contextlib.contextmanager
    def step(self, spec: StepSpec, ctx: RunContext, *, name: str | None = None
             ) -> Iterator[None]:
        """The ``stepguard.step`` span around the whole lifecycle. ``name``: the instance's name
        (``ingest.0`` for a mapped task instance), else the spec's."""
        token = _current.set(self)
        try:
            if not self.enabled:
                yield
                return
            from stepguard.audit import (
                Attr,
                export_counter,
                pipeline_attributes,
                stepguard_attributes,
            )

            attrs = pipeline_attributes(
                pipeline=ctx.pipeline, run_id=ctx.run_id, task=ctx.step,
            )
            attrs.update(stepguard_attributes(
                step=spec.name, isolation_mode=spec.isolation.mode, try_number=ctx.try_number,
                orchestrator=ctx.orchestrator, inputs=len(spec.inputs),
                outputs=len(spec.outputs), credentials=len(spec.credentials),
            ))
            instance = name or spec.name
            suffix = instance[len(spec.name) + 1:]
            if instance != spec.name and suffix.isdigit():
                attrs[Attr.MAP_INDEX] = int(suffix)
            auditor = self._get_auditor()
            counter = export_counter(self._provider)
            self._export_before = counter.snapshot() if counter is not None else None
            parent = _run_root(ctx.orchestrator, ctx.pipeline, ctx.run_id)
            with auditor.step_span(instance, attrs, parent=parent) as span:
                self._span = span
                sc = span.get_span_context()
                if sc.is_valid:
                    self.trace_id = format(sc.trace_id, "032x")
                try:
                    yield
                finally:
                    digests: dict[str, Any] = {}
                    if self._inputs:
                        digests[Attr.INPUT_DIGESTS] = list(self._inputs)
                    if self._outputs:
                        digests[Attr.OUTPUT_DIGESTS] = list(self._outputs)
                    if digests:
                        span.set_attributes(digests)
        finally:
            _current.reset(token)

    @contextlib.contextmanager
    def control(self, control: str, operation: str, **attrs: Any) -> Iterator[None]:
        """A child span for one control (``integrity.verify``, ``credentials.revoke`` ...)."""
        if not self.enabled:
            yield
            return
        from stepguard.audit import stepguard_attributes

        with self._get_auditor().control_span(control, operation, stepguard_attributes(**attrs)):
            yield

    def attributes(self, attributes: Mapping[str, Any]) -> None:
        """Set attributes (``artifact.*``, ``stepguard.*``) on the current span."""
        if self.enabled and attributes:
            self._get_auditor().set_attributes(attributes)

    def verdict(self, name: str, passed: bool, **attrs: Any) -> None:
        """Record the verdict of a check as an event on the current span."""
        if self.enabled:
            self._get_auditor().verdict(name, passed, **attrs)

    def input_verified(self, name: str, digest: str | None, where: str) -> None:
        """An input matched its manifest: ``artifact.*`` on the current span (the verify span),
        the digest listed on the step span, and the ``integrity.verified`` verdict."""
        if not self.enabled:
            return
        from stepguard.audit import Attr, artifact_attributes

        if digest:
            self._inputs.append(digest)
            self.attributes({**artifact_attributes(hash=digest, filename=where),
                             Attr.MANIFEST_DIGEST: digest})
        self.verdict("integrity.verified", digest is not None, input=name, digest=digest or "")

    def artifact(self, name: str, digest: str, where: str | None = None) -> None:
        """An output was hashed: ``artifact.*`` on the current span (the hash span), the digest
        listed on the step span, and the ``integrity.hashed`` verdict."""
        if self.enabled:
            from stepguard.audit import artifact_attributes

            self._outputs.append(digest)
            self.attributes(artifact_attributes(hash=digest, filename=where))
            self._get_auditor().verdict("integrity.hashed", True, output=name, digest=digest)

    def verified(self, record: VerificationRecord) -> None:
        """A signature verification's outcome: kept for the receipt, and on the current span
        (the ``signing.verify`` span) as attributes and the ``signing.verified`` verdict."""
        if record.verified:
            self.verifications.append(record)
        if not self.enabled:
            return
        from stepguard.audit import Attr

        attrs = {Attr.POLICY: record.policy}
        if record.signer:
            attrs[Attr.SIGNER] = record.signer
        if record.policy_kind:
            attrs[Attr.POLICY_KIND] = record.policy_kind
        self.attributes(attrs)
        self.verdict("signing.verified", record.verified, policy=record.policy,
                     signer=record.signer or None, subject=record.subject, kind=record.kind)

    def trace_env(self) -> dict[str, str]:
        """W3C trace context for a child process (TRACEPARENT/TRACESTATE)."""
        if not self.enabled:
            return {}
        from stepguard.audit import inject_env

        return dict(inject_env())

    def head(self) -> str | None:
        """``seq:digest`` of the local audit log's last record: an anchor kept outside the log
        (``stepguard audit verify --anchor``) that catches a truncated tail."""
        if not self.enabled or self.settings.audit.exporter not in ("jsonl", "both"):
            return None
        from stepguard.audit import read_head

        head = read_head(self._log_path())
        return f"{head.seq}:{head.digest}" if head is not None else None

    def position(self) -> Any:
        """The local log's :class:`~stepguard.audit.ChainHead` now (None: no local log)."""
        if not self.enabled or self.settings.audit.exporter not in ("jsonl", "both"):
            return None
        from stepguard.audit import read_head

        return read_head(self._log_path())

    def _log_path(self) -> Any:
        if self._log is None:
            self._log = self.settings.audit_path.absolute()
        return self._log

    def segment(self, before: Any, after: Any = None) -> tuple[str, bytes] | None:
        """``(name, bytes)``: the records the local log gained since ``before`` (a
        :meth:`position`) up to ``after`` (default: now), byte for byte, named as
        :func:`stepguard.audit.segment_name` says."""
        if after is None:
            after = self.position()
        if after is None or (before is not None and after.seq <= before.seq):
            return None
        import json

        from stepguard.audit import segment_name

        start = before.size if before is not None else 0
        with open(self._log_path(), "rb") as fh:
            genesis = json.loads(fh.readline() or b"{}")
            fh.seek(start)
            data = fh.read(after.size - start)
        log_id = str(genesis.get("log_id") or "log")
        first = before.seq + 1 if before is not None else 0
        return segment_name(log_id, first, after.seq), data

    def flush(self) -> None:
        """Push every finished span out before the process may end, and note whether the
        remote collector got them (:attr:`export`; a loss is also appended to the local log as
        an ``export`` record naming the step span)."""
        if not self.enabled or self._provider is None:
            return
        flushed = True
        flush = getattr(self._provider, "force_flush", None)
        if callable(flush):
            flushed = bool(flush())
        from stepguard.audit import export_counter, export_status

        status = export_status(export_counter(self._provider), self._export_before,
                               flushed=flushed)
        self.export = ExportRecord(**status)
        if status["status"] in ("lost", "unconfirmed") and self._span is not None \
                and self.settings.audit.exporter in ("jsonl", "both"):
            self._note_export(status)

    def _note_export(self, status: Mapping[str, Any]) -> None:
        from stepguard.audit import AuditLog
        from stepguard.errors import AuditError

        log = AuditLog(self._log_path())
        try:
            log.append("export", {"trace_id": self._span.trace_id,
                                  "span_id": self._span.span_id, **status})
        except AuditError:
            import logging

            logging.getLogger("stepguard.audit").warning(
                "stepguard: could not note the lost spans in the local audit log")
        finally:
            log.release()
