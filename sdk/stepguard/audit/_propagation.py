"""W3C trace context across process boundaries (subprocess, sandbox, pod, KFP container).

Only the W3C ``traceparent``/``tracestate`` pair travels, never baggage: baggage can carry
arbitrary values and the environment of a sandbox or pod spec is not a place for them.
"""

from __future__ import annotations

import contextlib
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
