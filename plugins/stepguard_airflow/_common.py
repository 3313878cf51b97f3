"""Shared plumbing of the operators: spec building, run context, running a step, failures.

Nothing here runs at DAG-parse time except :func:`coerce_spec` (pure data, cheap).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stepguard.receipt import Receipt
    from stepguard.settings import Settings
    from stepguard.spec import RunContext, StepSpec

from stepguard_airflow._failures import task_failure

log = logging.getLogger("stepguard.airflow")

#: Marker read by the listener: tasks of these classes are stepguard-secured.
SECURED_ATTR = "_stepguard_secured"


def coerce_spec(spec: Any, default_name: str,
                receipt_inputs: Collection[str] = ()) -> StepSpec | Mapping[str, Any] | str:
    """Keep the spec as given (templating may still change it); validate what can be validated.

    A :class:`~stepguard.spec.StepSpec` or a mapping without templates is checked now, at parse
    time, so a malformed spec is a DAG import error instead of a task failure at 3 a.m.
    Inputs named in ``receipt_inputs`` get their path and receipt when the task runs.
    """
    from stepguard.spec import StepSpec

    if spec is None:
        return {"name": default_name}
    if isinstance(spec, StepSpec):
        return spec
    if isinstance(spec, Mapping):
        data = dict(spec)
        data.setdefault("name", default_name)
        if "{{" not in json.dumps(data, default=str):
            StepSpec.from_dict(_fill_inputs(data, dict.fromkeys(receipt_inputs)))
        return data
    if isinstance(spec, (str, Path)):
        return str(spec)
    from stepguard.errors import ConfigurationError

    raise ConfigurationError("spec must be a StepSpec, a mapping or a path to a YAML file",
                             subject=type(spec).__name__)


def spec_data(spec: StepSpec | Mapping[str, Any] | str) -> StepSpec | Mapping[str, Any]:
    """A spec given as a YAML/JSON file path, read (once) into its mapping; others as given."""
    from stepguard.spec import StepSpec

    if isinstance(spec, (StepSpec, Mapping)):
        return spec
    from stepguard.spec import load_spec_data

    data: Mapping[str, Any] = load_spec_data(spec)
    return data


def resolve_spec(spec: StepSpec | Mapping[str, Any] | str, isolation: str | None,
                 env: Mapping[str, str] | None,
                 receipts: Mapping[str, Any] | None = None) -> StepSpec:
    """The final spec at run time: loaded, with the operator's overrides applied.

    An input named in ``receipts`` may leave out ``path`` (taken from the producer's output
    record) and ``manifest``/``receipt`` (the receipt is attached when the step runs).
    """
    from stepguard.spec import StepSpec

    data = spec_data(spec)
    if isinstance(data, StepSpec):
        resolved = data
    else:
        resolved = StepSpec.from_dict(_fill_inputs(data, receipts or {}))
    if isolation:
        resolved = replace(resolved, isolation=replace(resolved.isolation,
                                                       mode=isolation))  # type: ignore[arg-type]
    if env:
        resolved = replace(resolved, env={**resolved.env, **{k: str(v) for k, v in env.items()}})
    return resolved


def _fill_inputs(spec: Mapping[str, Any], receipts: Mapping[str, Any]) -> dict[str, Any]:
    data = dict(spec)
    inputs = []
    for item in data.get("inputs") or ():
        inp = dict(item) if isinstance(item, Mapping) else item
        if isinstance(inp, dict) and inp.get("name") in receipts:
            receipt = _as_data(receipts[inp["name"]])
            if "path" not in inp:
                rec = _output_record(receipt, inp.get("receipt_output") or inp["name"])
                # Before the run (parse-time validation) the producer's path is not known yet.
                inp["path"] = str(rec["path"]) if rec is not None else "(from receipt)"
            if not (inp.get("manifest") or inp.get("receipt")):
                inp["receipt"] = "(from XCom)"
        inputs.append(inp)
    if inputs:
        data["inputs"] = inputs
    return data


def _is_file(value: Any) -> bool:
    """``value`` names a receipt file (JSON text, however long, never does)."""
    text = str(value)
    if not isinstance(value, (str, Path)) or text.lstrip().startswith("{"):
        return False
    try:
        return Path(text).is_file()
    except OSError:  # e.g. a name too long to be a path
        return False


def _as_data(receipt: Any) -> Any:
    if isinstance(receipt, (str, Path)):
        try:
            p = Path(str(receipt))
            return json.loads(p.read_text(encoding="utf-8") if _is_file(p) else str(receipt))
        except (OSError, ValueError):
            return None
    return receipt


def _output_record(receipt: Any, name: str) -> Mapping[str, Any] | None:
    outputs = receipt.get("outputs") if isinstance(receipt, Mapping) else None
    if not isinstance(outputs, list):
        return None
    recs = [o for o in outputs if isinstance(o, Mapping)]
    named = [o for o in recs if o.get("name") == name]
    if named:
        return named[0]
    return recs[0] if len(recs) == 1 else None


def run_context(context: Mapping[str, Any], step: str) -> RunContext:
    """The stepguard run context of the Airflow task instance being executed."""
    from stepguard.spec import RunContext

    ti = context.get("ti") or context.get("task_instance")
    dag_id = getattr(ti, "dag_id", None) or "airflow"
    run_id = str(context.get("run_id") or getattr(ti, "run_id", "") or "manual")
    try_number = int(getattr(ti, "try_number", 1) or 1)
    map_index = getattr(ti, "map_index", -1)
    if isinstance(map_index, int) and map_index >= 0:
        # Not shortened: labels and session names shorten it themselves, and a cut here
        # would give task.1 and task.12 of a long task id one run directory.
        step = f"{step}.{map_index}"
    return RunContext(pipeline=dag_id, run_id=run_id, step=step, try_number=try_number,
                      orchestrator="airflow")


@contextmanager
def receipts_as_inputs(spec: StepSpec, receipts: Mapping[str, Any] | None) -> Iterator[StepSpec]:
    """Point inputs at upstream receipts pulled from XCom (chain of custody across tasks).

    ``receipts`` maps an input name to a receipt (dict from XCom, JSON text or a path). Each is
    written to a private temporary file for the duration of the step and set as that input's
    ``receipt``; the input is then verified against the digest the producer recorded.
    """
    if not receipts:
        yield spec
        return
    from stepguard.errors import ConfigurationError

    known = {i.name: i for i in spec.inputs}
    with tempfile.TemporaryDirectory(prefix="stepguard-receipts-") as tmp:
        inputs = list(spec.inputs)
        for name, receipt in receipts.items():
            if _is_file(receipt):
                path = str(receipt)
            else:
                text = receipt if isinstance(receipt, str) else json.dumps(receipt)
                p = Path(tmp) / f"{name}.receipt.json"
                p.write_text(text, encoding="utf-8")
                path = str(p)
            if name not in known:
                raise ConfigurationError(
                    "a receipt is given for an input the step does not declare",
                    subject=f"receipts.{name}",
                    hint=f"declared inputs: {', '.join(known) or 'none'}",
                )
            old = known[name]
            output = old.receipt_output or _sole_output(receipt, name)
            inputs[inputs.index(old)] = replace(old, receipt=path, manifest=None,
                                                receipt_output=output)
        yield replace(spec, inputs=tuple(inputs))


def _sole_output(receipt: Any, name: str) -> str | None:
    """The producer's output to verify against when the names differ and there is only one."""
    rec = _output_record(_as_data(receipt), name)
    if rec is None or rec.get("name") == name:
        return None
    return str(rec.get("name"))


def execute_step(
    *,
    context: Mapping[str, Any],
    spec: StepSpec | Callable[[Settings], StepSpec],
    command: Sequence[str] | None = None,
    body: Callable[[Any], object] | None = None,
    conn_id: str | None,
    settings_file: str | None = None,
    receipts: Mapping[str, Any] | None = None,
    gate: dict[str, Any] | None = None,
    pod: Mapping[str, Any] | None = None,
) -> Receipt:
    """Run ``spec`` through :func:`stepguard.step.run_step` for an Airflow task instance.

    ``pod``: keyword arguments for :func:`stepguard.pods.run_in_pod` (``kube_api``,
    ``volumes``, ``volume_mounts``) of a ``mode: pod`` step, plus ``wrap_ttl_s`` (overrides
    ``pods.wrap_ttl_s``) -- what ``SecureKubernetesPodOperator`` brings from its arguments.

    Settings come from the ``stepguard`` connection (when defined) on top of the settings
    file/environment; ``spec`` may be a function of those settings. Relative output paths are
    anchored in a fresh per-try directory under the state dir. Every stepguard error ends the
    task with one message naming the step, what failed and the subject; security verdicts and
    caller mistakes are not retried. A failed step's receipt (no secrets) is pushed to XCom
    under ``stepguard_failed_receipt`` for forensics.

    The receipt (a failed step's too) stays on the operator for its OpenLineage facets
    (:mod:`stepguard_airflow.lineage`; ``gate`` holds a deployment gate's facts); a succeeded
    step's outputs are announced on the task's Asset outlets (:mod:`stepguard_airflow.assets`).
    """
    from stepguard.errors import StepguardError
    from stepguard.step import Step, run_step
    from stepguard_airflow.assets import announce
    from stepguard_airflow.hooks import StepguardHook
    from stepguard_airflow.lineage import forget, remember

    task = context.get("task")
    forget(task)

    try:
        hook = StepguardHook(conn_id)
        settings: Settings = hook.get_settings(settings_file)
        if pod is not None and pod.get("wrap_ttl_s"):
            pod = dict(pod)
            settings = replace(settings, pods=replace(settings.pods,
                                                      wrap_ttl_s=int(pod.pop("wrap_ttl_s"))))
        elif pod is not None:
            pod = {k: v for k, v in pod.items() if k != "wrap_ttl_s"}
        if callable(spec):
            spec = spec(settings)
    except StepguardError as err:
        raise task_failure(context["task"].task_id if "task" in context else "step",
                           err) from None
    ctx = run_context(context, spec.name)
    try:
        spec = anchor_outputs(spec, settings, ctx)
        with receipts_as_inputs(spec, receipts) as final, hook.login_env(settings):
            if pod is not None and command is not None:
                from stepguard.pods import run_in_pod

                receipt = run_in_pod(Step(final, settings=settings, context=ctx), command,
                                     **pod)
            else:
                receipt = run_step(final, command=command, body=body, context=ctx,
                                   settings=settings)
    except StepguardError as err:
        failed = getattr(err, "receipt", None)
        if failed is not None:
            remember(task, failed, receipt_location(failed, Step(spec, settings=settings,
                                                                 context=ctx).run_dir), gate)
        ti = context.get("ti")
        if failed is not None and ti is not None:
            try:
                ti.xcom_push(key="stepguard_failed_receipt", value=receipt_xcom(failed))
            except Exception:  # forensics must not mask the real failure
                log.warning("could not push the failed step's receipt to XCom")
        raise task_failure(spec.name, err) from None
    where = receipt_location(receipt, Step(spec, settings=settings, context=ctx).run_dir)
    remember(task, receipt, where, gate)
    try:
        announce(context, receipt, where)
    except StepguardError as err:  # an asset= naming an output the step does not have
        raise task_failure(spec.name, err) from None
    return receipt


def receipt_location(receipt: Receipt, run_dir: Path) -> str:
    """Where a step's receipt is stored: next to its first object-store output (as the step
    hands it off), else ``receipt.json`` in the run directory on this machine."""
    for out in receipt.outputs:
        if out.path.startswith("s3://"):
            from stepguard.integrity.s3 import S3Location

            base = S3Location.parse(out.path)
            return f"s3://{base.bucket}/{base.prefix}receipt.json"
    return str(run_dir / "receipt.json")


def anchor_outputs(spec: StepSpec, settings: Settings, ctx: RunContext) -> StepSpec:
    """Relative output paths go to ``<state_dir>/airflow/<dag>/<run>/<step>/try-<n>/``.

    A retry gets a fresh directory, so a half-written output of a failed try is never
    published as the retry's result.
    """
    def local(path: str) -> bool:  # object-store locations are not anchored
        return not Path(path).is_absolute() and not path.startswith("s3://")

    if not any(local(o.path) for o in spec.outputs):
        return spec
    safe = [re.sub(r"[^A-Za-z0-9_.-]", "_", v) for v in (ctx.pipeline, ctx.run_id, ctx.step)]
    root = Path(settings.state_dir).absolute().joinpath("airflow", *safe,
                                                        f"try-{ctx.try_number}")
    outputs = tuple(replace(o, path=str(root / o.path)) if local(o.path) else o
                    for o in spec.outputs)
    return replace(spec, outputs=outputs)


def receipt_xcom(receipt: Receipt) -> dict[str, Any]:
    """The XCom value of a receipt: plain JSON data (never a credential)."""
    data: dict[str, Any] = json.loads(receipt.to_json())
    return data


def revoke_on_kill() -> None:
    """``on_kill`` for operators whose step mints credentials in the task process.

    Airflow 3's task runner answers SIGTERM by calling ``on_kill()`` without raising, so the
    step's ``finally`` blocks may never run: revoke every open credential session now rather
    than leave the leases alive until their TTL.
    """
    from stepguard.credentials import revoke_open_sessions

    revoke_open_sessions()
