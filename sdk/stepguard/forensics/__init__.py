"""Forensics: after an incident, answer "which data trained this model, who signed it, which
credentials touched it, what did every check say, and is the record intact".

Part of the composition layer: it reads what the lifecycle left behind -- receipts (local state
dirs or object-store prefixes), the registry's signature bundle and SLSA provenance, and the
hash-chained audit log or the segments of it stored beside the receipts -- and builds one
:class:`Trace`. ``stepguard trace`` is its command line (text, ``--json``, ``--html``).

* Starting points: a model (``name@version`` in a registry), a run id, or a receipt.
* The walk goes from the publishing receipt back through every input to the receipt of the step
  that produced it, and forward to the steps of the run after publishing (gate, deployment).
* Audit chains are verified with :mod:`stepguard.audit`'s verifiers; a tampered log or segment
  is reported with the record that breaks it and makes :attr:`Trace.intact` False.
* What the record does not hold is reported as "not recorded", never guessed. Older receipts and
  audit logs (without signer or policy spans) trace as well as newer ones.
* Nothing secret is read or shown: receipts and audit records hold none (lease ids are hashed).

>>> import tempfile, pathlib
>>> from stepguard.settings import Settings
>>> from stepguard.spec import RunContext, StepSpec
>>> from stepguard.step import run_step
>>> tmp = pathlib.Path(tempfile.mkdtemp())
>>> settings = Settings.from_dict({"state_dir": str(tmp / "state"),
...                                "audit": {"exporter": "jsonl"}})
>>> spec = StepSpec.from_dict({"name": "ingest", "isolation": {"mode": "process"},
...                            "outputs": [{"name": "data", "path": str(tmp / "data")}]})
>>> r = run_step(spec, body=lambda env: (env.outputs["data"] / "a.csv").write_text("x\\n"),
...              settings=settings, context=RunContext(run_id="r1", step="ingest"))
>>> t = trace(run_id="r1", receipts=[str(tmp / "state")], audit_logs=[str(settings.audit_path)])
>>> [s.step for s in t.steps], t.intact
(['ingest'], True)
>>> [(c.name, c.passed, c.source) for c in t.checks]
[('integrity.hashed', True, 'audit')]
>>> trace(run_id="nope", receipts=[str(tmp / "state")])
Traceback (most recent call last):
...
stepguard.errors.EvidenceNotFound: no receipts of this run were found: nope
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from stepguard.forensics._collect import collect, parse_model
from stepguard.forensics._evidence import Store
from stepguard.forensics._model import (
    STAGES,
    TRACE_SCHEMA,
    Artifact,
    Check,
    Credential,
    CredentialState,
    Gate,
    Model,
    Segment,
    Signature,
    Source,
    Stage,
    Step,
    Trace,
)
from stepguard.forensics._render import render_html, render_svg, render_text

if TYPE_CHECKING:
    from stepguard.receipt import Receipt
    from stepguard.settings import Settings

__all__ = [
    "STAGES",
    "TRACE_SCHEMA",
    "Artifact",
    "Check",
    "Credential",
    "CredentialState",
    "Gate",
    "Model",
    "Segment",
    "Signature",
    "Source",
    "Stage",
    "Step",
    "Store",
    "Trace",
    "parse_model",
    "render_html",
    "render_svg",
    "render_text",
    "trace",
]


def trace(*, model: str | None = None, registry: str | None = None, run_id: str | None = None,
          receipt: str | None = None, receipts: Sequence[str] = (),
          audit_logs: Sequence[str] = (), store: Store | None = None,
          settings: Settings | None = None) -> Trace:
    """The :class:`Trace` of a ``model`` (``name@version`` in ``registry``), a ``run_id`` or a
    ``receipt`` (path or ``s3://`` URI). ``receipts``: directories (a state dir) and ``s3://``
    prefixes holding receipts; ``audit_logs``: local audit logs (segments named by receipts are
    read from where they are). Raises :class:`~stepguard.errors.EvidenceNotFound` when what was
    named is not there; a damaged record is not an error but a finding (:attr:`Trace.intact`).
    With ``settings`` naming a receipts policy (``receipts.policy``), every receipt's signature
    is verified under it (:attr:`Step.receipt_verified`); a refused one is a problem.
    """
    from stepguard.errors import ConfigurationError

    coords = None
    if model is not None:
        coords = parse_model(model)
        if coords is None:
            raise ConfigurationError("a model is NAME@VERSION", subject=model)
    check = None
    if settings is not None and settings.receipts.policy:
        from stepguard.wiring import check_receipt

        def check(r: Receipt) -> object:
            return check_receipt(r, settings)

    return collect(model=coords, registry=registry, run_id=run_id, receipt=receipt,
                   receipts=receipts, audit_logs=audit_logs, store=store, check_receipt=check)
