"""Airflow Assets as a chain of custody across DAGs.

**Producing.** A stepguard operator's output becomes an Airflow 3 Asset with ``asset=``
(one Asset for the step's output, or ``{"output name": Asset}``), or with plain
``outlets=[Asset(...)]`` when the step has exactly one output. When the step succeeds, the
asset event carries, under the ``extra`` key ``"stepguard"`` (:func:`event_extra`): the
output's location, manifest root digest and manifest location, the signer and bundle digest of
a published model, the receipt's digest and location, and the receipt itself.

**Consuming.** A DAG scheduled on the asset (``schedule=[asset]``) passes the *Asset* where a
stepguard operator takes an upstream receipt -- ``VerifyDatasetOperator(dataset=asset)``,
``SecureStepOperator(receipts={"data": asset})``, ``SignAndPublishModelOperator(model=asset)``,
``VerifyModelOperator(model=asset)``. The receipt then comes from the event that triggered the
run (``context["triggering_asset_events"]``, the latest one when several did), and the input
is verified against it before anything reads it: data changed between the two DAGs is an
``IntegrityError`` naming the file; a run without such an event, or an event without stepguard
metadata (e.g. posted through the REST API), or one whose summary and receipt disagree, is
refused with a typed error -- never a silent pass. With ``receipts.policy`` set, the receipt
must also carry a valid signature, so an edited event is refused too.

Importing this module loads nothing heavy (no Airflow, no stepguard controls).

>>> sorted(event_keys())[:4]
['bundle_digest', 'bytes', 'digest', 'files']
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stepguard.receipt import OutputRecord, Receipt

__all__ = [
    "EVENT_SCHEMA",
    "EXTRA_KEY",
    "announce",
    "asset_outlets",
    "event_extra",
    "event_keys",
    "is_asset",
    "receipt_from_event",
    "resolve_receipt",
    "task_receipt",
]

#: The key of an asset event's ``extra`` that holds stepguard's record.
EXTRA_KEY = "stepguard"
#: ``schema`` of that record.
EVENT_SCHEMA = "https://stepguard.dev/asset-event/v1"
#: Operator attribute: output name (``None``: the step's only output) -> Asset.
ASSETS_ATTR = "stepguard_assets"


def is_asset(value: object) -> bool:
    """Whether ``value`` is an Airflow Asset (checked by type, without importing Airflow)."""
    return any(c.__name__ == "Asset" and c.__module__.startswith("airflow.")
               for c in type(value).__mro__)


def asset_outlets(asset: Any, outlets: Any) -> tuple[dict[str | None, Any], list[Any]]:
    """Normalize an operator's ``asset=`` argument: the output -> Asset map it declares, and
    the task's ``outlets`` with those Assets added (each once)."""
    from stepguard.errors import ConfigurationError

    if asset is None:
        mapping: dict[str | None, Any] = {}
    elif isinstance(asset, Mapping):
        mapping = {str(k): v for k, v in asset.items()}
    else:
        mapping = {None: asset}
    for name, value in mapping.items():
        if not is_asset(value):
            raise ConfigurationError("expected an airflow.sdk.Asset",
                                     subject=f"asset.{name}" if name else "asset")
    merged = list(outlets) if isinstance(outlets, (list, tuple)) else (
        [outlets] if outlets is not None else [])
    merged += [a for a in mapping.values() if a not in merged]
    return mapping, merged


def event_keys() -> tuple[str, ...]:
    """The keys of the record :func:`event_extra` writes."""
    return ("schema", "output", "uri", "path", "digest", "manifest", "files", "bytes",
            "signer", "bundle_digest", "registry", "name", "version", "step", "pipeline",
            "run_id", "receipt_uri", "receipt_digest", "receipt")


def event_extra(receipt: Receipt, output: OutputRecord, receipt_uri: str | None) -> dict[str, Any]:
    """The ``"stepguard"`` record of an asset event for ``output`` of ``receipt``."""
    pub = output.published
    return {
        "schema": EVENT_SCHEMA, "output": output.name,
        "uri": pub.uri if pub is not None else output.path, "path": output.path,
        "digest": output.digest, "manifest": output.manifest,
        "files": output.files, "bytes": output.bytes,
        "signer": pub.signer if pub is not None else None,
        "bundle_digest": pub.bundle_digest if pub is not None else None,
        "registry": pub.registry if pub is not None else None,
        "name": pub.name if pub is not None else None,
        "version": pub.version if pub is not None else None,
        "step": receipt.step, "pipeline": receipt.context.pipeline,
        "run_id": receipt.context.run_id,
        "receipt_uri": receipt_uri, "receipt_digest": receipt.digest,
        "receipt": json.loads(receipt.to_json()),
    }


def announce(context: Mapping[str, Any], receipt: Receipt, receipt_uri: str | None) -> None:
    """Attach each declared output's record to its Asset's event (``outlet_events``)."""
    task = context.get("task")
    events = context.get("outlet_events")
    if task is None or events is None or receipt.status != "succeeded":
        return
    declared: Mapping[str | None, Any] = getattr(task, ASSETS_ATTR, None) or {}
    plan: list[tuple[Any, OutputRecord]] = []
    for name, asset in declared.items():
        out = receipt.output(name) if name is not None else _sole(receipt, "asset")
        plan.append((asset, out))
    if len(receipt.outputs) == 1:
        named = list(declared.values())
        plan += [(a, receipt.outputs[0]) for a in getattr(task, "outlets", None) or ()
                 if is_asset(a) and a not in named]
    for asset, out in plan:
        events[asset].extra[EXTRA_KEY] = event_extra(receipt, out, receipt_uri)


def _sole(receipt: Receipt, subject: str) -> OutputRecord:
    from stepguard.errors import ConfigurationError

    if len(receipt.outputs) != 1:
        raise ConfigurationError(
            "an Asset without an output name needs a step with exactly one output",
            subject=subject, hint="pass asset={'<output>': Asset(...)}")
    return receipt.outputs[0]


def receipt_from_event(context: Mapping[str, Any], asset: Any) -> tuple[dict[str, Any], str]:
    """The producer's receipt (plain data, as XCom carries it) from the event of ``asset``
    that triggered this run, checked against the event's own summary, and the name of the
    output the event announced."""
    from stepguard.errors import ConfigurationError, IntegrityError, VerificationError
    from stepguard.receipt import Receipt

    subject = f"asset {getattr(asset, 'name', None) or getattr(asset, 'uri', asset)}"
    triggering = context.get("triggering_asset_events") or {}
    try:
        events = list(triggering[asset]) if triggering else []
    except KeyError:
        events = []
    if not events:
        raise ConfigurationError(
            "this run was not triggered by an event of the asset, so there is no receipt to "
            "verify its data against", subject=subject,
            hint="schedule the DAG on the asset (schedule=[asset]); a manual run has no event")
    event = max(events, key=lambda e: e.timestamp)
    source = f"{subject} (event of {event.source_dag_id}/{event.source_run_id})"
    record = (event.extra or {}).get(EXTRA_KEY)
    if not isinstance(record, Mapping) or record.get("schema") != EVENT_SCHEMA \
            or not isinstance(record.get("receipt"), Mapping):
        raise VerificationError(
            "the triggering asset event carries no stepguard record; its data has no chain of "
            "custody", subject=source,
            hint="produce the asset with a stepguard operator (asset=... or outlets=[...])")
    data = dict(record["receipt"])
    receipt = Receipt.from_dict(data)
    out = next((o for o in receipt.outputs if o.name == record.get("output")), None)
    problems = []
    if out is None:
        problems.append(f"the receipt has no output {record.get('output')!r}")
    elif out.digest != record.get("digest"):
        problems.append(f"event digest {record.get('digest')}, receipt digest {out.digest}")
    if receipt.digest != record.get("receipt_digest"):
        problems.append("the receipt's digest is not the one the event announced")
    if problems:
        raise IntegrityError("the asset event's summary and its receipt disagree",
                             subject=source, details=problems)
    return data, str(record["output"])


def task_receipt(context: Mapping[str, Any], value: Any) -> tuple[Any, str | None]:
    """For an operator: ``(value, None)`` when ``value`` is a receipt; for an Asset, the
    triggering event's receipt and announced output (:func:`receipt_from_event`), a refusal
    ending the task like any failed step."""
    if not is_asset(value):
        return value, None
    from stepguard.errors import StepguardError
    from stepguard_airflow._failures import step_name, task_failure

    try:
        return receipt_from_event(context, value)
    except StepguardError as err:
        task = context.get("task")
        raise task_failure(step_name(getattr(task, "task_id", "step")), err) from None


def resolve_receipt(context: Mapping[str, Any], value: Any) -> Any:
    """``value`` when it is a receipt; the triggering event's receipt when it is an Asset."""
    return task_receipt(context, value)[0]
