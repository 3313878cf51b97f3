"""The step lifecycle's view of auditing: one step span, a child span per control, verdicts.

Uses the OpenTelemetry API only. The tracer provider is the caller's when given; otherwise the
audit settings decide (``none`` disables auditing; other exporters are configured by
:mod:`stepguard.audit`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from stepguard.settings import Settings
from stepguard.spec import RunContext, StepSpec

_TRACER = "stepguard"


class StepAudit:
    """Spans and verdicts for one step run."""

    def __init__(self, settings: Settings, tracer_provider: object | None) -> None:
        self.settings = settings
        self.enabled = tracer_provider is not None or settings.audit.exporter != "none"
        self._provider: Any = tracer_provider
        self._auditor: Any = None
        self._span: Any = None
        self.trace_id: str | None = None

    def _get_auditor(self) -> Any:
        if self._auditor is None:
            from stepguard.audit import Auditor, setup_tracing

            provider = self._provider
            if provider is None:
                provider = setup_tracing(self.settings)
            self._provider = provider
            self._auditor = Auditor(tracer_provider=provider)
        return self._auditor

    @contextlib.contextmanager
    def step(self, spec: StepSpec, ctx: RunContext) -> Iterator[None]:
        """The ``stepguard.step`` span around the whole lifecycle."""
        if not self.enabled:
            yield
            return
        from stepguard.audit import pipeline_attributes, stepguard_attributes

        attrs = pipeline_attributes(
            pipeline=ctx.pipeline, run_id=ctx.run_id, task=ctx.step,
        )
        attrs.update(stepguard_attributes(
            step=spec.name, isolation_mode=spec.isolation.mode, try_number=ctx.try_number,
            orchestrator=ctx.orchestrator, inputs=len(spec.inputs), outputs=len(spec.outputs),
            credentials=len(spec.credentials),
        ))
        with self._get_auditor().step_span(spec.name, attrs) as span:
            self._span = span
            sc = span.get_span_context()
            if sc.is_valid:
                self.trace_id = format(sc.trace_id, "032x")
            yield

    @contextlib.contextmanager
    def control(self, control: str, operation: str, **attrs: Any) -> Iterator[None]:
        """A child span for one control (``integrity.verify``, ``credentials.revoke`` ...)."""
        if not self.enabled:
            yield
            return
        from stepguard.audit import stepguard_attributes

        with self._get_auditor().control_span(control, operation, stepguard_attributes(**attrs)):
            yield

    def verdict(self, name: str, passed: bool, **attrs: Any) -> None:
        """Record the verdict of a check as an event on the current span."""
        if self.enabled:
            self._get_auditor().verdict(name, passed, **attrs)

    def artifact(self, name: str, digest: str) -> None:
        """Record an artifact digest on the current span."""
        if self.enabled:
            self._get_auditor().verdict("integrity.hashed", True, output=name, digest=digest)

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

        head = read_head(self.settings.audit_path.absolute())
        return f"{head.seq}:{head.digest}" if head is not None else None

    def position(self) -> Any:
        """The local log's :class:`~stepguard.audit.ChainHead` now (None: no local log)."""
        if not self.enabled or self.settings.audit.exporter not in ("jsonl", "both"):
            return None
        from stepguard.audit import read_head

        return read_head(self.settings.audit_path.absolute())

    def segment(self, before: Any) -> tuple[str, bytes] | None:
        """``(name, bytes)``: the records the local log gained since ``before`` (a
        :meth:`position`), byte for byte, named as :func:`stepguard.audit.segment_name` says."""
        after = self.position()
        if after is None or (before is not None and after.seq <= before.seq):
            return None
        import json

        from stepguard.audit import segment_name

        start = before.size if before is not None else 0
        with open(self.settings.audit_path.absolute(), "rb") as fh:
            genesis = json.loads(fh.readline() or b"{}")
            fh.seek(start)
            data = fh.read(after.size - start)
        log_id = str(genesis.get("log_id") or "log")
        first = before.seq + 1 if before is not None else 0
        return segment_name(log_id, first, after.seq), data

    def flush(self) -> None:
        """Push every finished span out before the process may end."""
        if self.enabled and self._provider is not None:
            flush = getattr(self._provider, "force_flush", None)
            if callable(flush):
                flush()
