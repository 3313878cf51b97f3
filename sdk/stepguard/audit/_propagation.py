"""W3C trace context across process boundaries (subprocess, sandbox, pod, KFP container), and
the run root every task of one pipeline run shares.

Only the W3C ``traceparent``/``tracestate`` pair travels, never baggage: baggage can carry
arbitrary values and the environment of a sandbox or pod spec is not a place for them.

One trace per pipeline run needs nothing to travel at all: :func:`run_trace_ids` derives the
trace id and the run root's span id from the run's identity (orchestrator, pipeline, run id), so
every task -- on any worker, in any pod, with no shared disk -- computes the same parent.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.context import Context

_ENV = {"traceparent": "TRACEPARENT", "tracestate": "TRACESTATE"}


def inject_env(context: Context | None = None) -> dict[str, str]:
    """Environment variables carrying the current (or given) trace context to a child process.

    Merge them into the child's environment; the child's step span then joins this trace.
    Empty when there is no valid current span.

    >>> from opentelemetry.sdk.trace import TracerProvider
    >>> tracer = TracerProvider().get_tracer("doc")
    >>> with tracer.start_as_current_span("parent") as span:
    ...     env = inject_env()
    >>> sorted(env)
    ['TRACEPARENT']
    >>> env["TRACEPARENT"].split("-")[1] == f"{span.get_span_context().trace_id:032x}"
    True
    """
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=context)
    return {_ENV[k]: v for k, v in carrier.items() if k in _ENV and v}


def extract_env(environ: Mapping[str, str] | None = None) -> Context:
    """The trace context named by ``TRACEPARENT``/``TRACESTATE`` in ``environ`` (default
    ``os.environ``); an empty context when absent or malformed."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    env = os.environ if environ is None else environ
    carrier = {k: env[v] for k, v in _ENV.items() if env.get(v)}
    return TraceContextTextMapPropagator().extract(carrier)


@contextlib.contextmanager
def attach_env(environ: Mapping[str, str] | None = None) -> Iterator[Context]:
    """Make the trace context from ``environ`` current for the duration of the block."""
    from opentelemetry import context

    ctx = extract_env(environ)
    token = context.attach(ctx)
    try:
        yield ctx
    finally:
        context.detach(token)


_RUN_DOMAIN = b"stepguard.run.v1"


def run_trace_ids(orchestrator: str, pipeline: str, run_id: str) -> tuple[str, str]:
    """``(trace_id, root_span_id)`` of a pipeline run, in hex: the first 16 and the next 8 bytes
    of SHA-256 over ``stepguard.run.v1``, the orchestrator, the pipeline and the run id, each
    NUL-terminated. The same run gives the same ids wherever it is computed.

    >>> trace_id, span_id = run_trace_ids("airflow", "secure_training", "manual__2026-12-05")
    >>> len(trace_id), len(span_id)
    (32, 16)
    >>> run_trace_ids("airflow", "secure_training", "manual__2026-12-05")[0] == trace_id
    True
    >>> run_trace_ids("kfp", "secure_training", "manual__2026-12-05")[0] == trace_id
    False
    """
    h = hashlib.sha256(_RUN_DOMAIN + b"\0" + b"\0".join(
        v.encode() for v in (orchestrator, pipeline, run_id)) + b"\0").digest()
    trace_id, span_id = h[:16], h[16:24]
    # All-zero ids are invalid in W3C trace context; SHA-256 will not give them, but be exact.
    if not any(trace_id):
        trace_id = b"\x00" * 15 + b"\x01"
    if not any(span_id):
        span_id = b"\x00" * 7 + b"\x01"
    return trace_id.hex(), span_id.hex()


def run_traceparent(orchestrator: str, pipeline: str, run_id: str) -> str:
    """The W3C ``traceparent`` naming the run root of a pipeline run as parent (sampled).

    >>> run_traceparent("kfp", "p", "r1").startswith("00-") and run_traceparent(
    ...     "kfp", "p", "r1").endswith("-01")
    True
    """
    trace_id, span_id = run_trace_ids(orchestrator, pipeline, run_id)
    return f"00-{trace_id}-{span_id}-01"


def run_context(orchestrator: str, pipeline: str, run_id: str) -> Context:
    """An OpenTelemetry context whose (remote) parent is the run root of a pipeline run: a span
    started in it joins the run's one trace as a child of the root."""
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    trace_id, span_id = run_trace_ids(orchestrator, pipeline, run_id)
    parent = SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(parent))
