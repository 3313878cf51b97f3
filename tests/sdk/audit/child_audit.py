"""Child process for the exit-path and propagation tests: ``python child_audit.py MODE LOG_DIR``.

Exports over OTLP (the ``OTEL_*`` variables the parent sets) and to the local log in LOG_DIR.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def main(mode: str, log_dir: str) -> None:
    from stepguard import audit

    if mode == "sigterm_chain":
        def previous(signum, frame):  # what an orchestrator's own handler does
            print("PREVIOUS-HANDLER-RAN", flush=True)
            raise SystemExit(143)

        signal.signal(signal.SIGTERM, previous)
    setup = audit.configure(audit_dir=log_dir, service_name=f"child-{mode}")
    auditor = setup.auditor()
    if mode == "propagate":
        with auditor.step_span("child-step") as span:
            print(span.trace_id, span.span_id, flush=True)
        return
    with auditor.step_span("exit-test", audit.pipeline_attributes("p", mode)):
        for control in ("credentials", "integrity", "signing"):
            with auditor.control_span(control, "check"):
                auditor.verdict(f"{control}-ok", True)
        if mode == "os_exit_midstep":
            os._exit(0)
        if mode.startswith("sigterm"):
            with auditor.control_span("isolation", "run"):
                print("READY", flush=True)
                time.sleep(30)
    if mode == "os_exit":
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
