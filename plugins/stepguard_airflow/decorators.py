"""``@task.stepguard``: a TaskFlow function run as a secured step.

Registered with Airflow through ``get_provider_info()["task-decorators"]``, so after installing
stepguard it is available as ``@task.stepguard(...)``; :func:`stepguard_task` is the same thing
importable directly.

::

    @task.stepguard(spec={"outputs": [{"name": "model", "path": "model"}]})
    def train(data_path: str, step_env=None):
        (step_env.outputs["model"] / "weights.bin").write_bytes(fit(data_path))

    @task.stepguard(shell=True, isolation="sandbox")
    def score() -> str:
        return "python -m score --in $STEPGUARD_INPUT_DATA"

A Python body runs in the worker process (isolation ``process``): it gets just-in-time
credentials, verified inputs and hashed outputs, but no sandbox. A shell body (``shell=True``:
the function returns the command) runs in the local sandbox by default.

It behaves like ``@task``: the Airflow context is injected by parameter name (``ds``,
``params``, ``ti``, ...) or to ``**context``; the task's value (``return_value``, what a
downstream task receives) is what the function returns, unrolled with ``multiple_outputs``. The
step receipt goes to the XCom key ``stepguard_receipt`` (a shell body's value is its receipt).
Chaining keeps working: ``receipts={"data": produce()}`` reads the producer's receipt from that
key, so the input is verified against what the producer recorded::

    @task.stepguard(spec={"outputs": [{"name": "data", "path": "data"}]})
    def produce(ds=None, step_env=None) -> int:
        (step_env.outputs["data"] / f"{ds}.csv").write_text("a,b\\n1,2\\n")
        return 1                     # downstream tasks get 1

    rows = produce()

    @task.stepguard(spec={"inputs": [{"name": "data"}]}, receipts={"data": rows})
    def consume(n: int, step_env=None) -> None: ...

    consume(rows)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.bases.decorator import DecoratedOperator, task_decorator_factory

from stepguard_airflow.operators._step import STEP_ENV_PARAM, SecureStepOperator

if TYPE_CHECKING:
    from airflow.sdk import Context
    from airflow.sdk.bases.decorator import TaskDecorator

__all__ = ["stepguard_task"]


class _StepguardDecoratedOperator(DecoratedOperator, SecureStepOperator):
    """The operator behind ``@task.stepguard``."""

    custom_operator_name: str = "@task.stepguard"
    # The task's value is the function's; the receipt is under ``stepguard_receipt``.
    _stepguard_returns_value = True
    # Both bases set it; here it is always the decorated function, never None.
    python_callable: Callable[..., Any]
    template_fields: Sequence[str] = SecureStepOperator.template_fields
    template_fields_renderers = SecureStepOperator.template_fields_renderers
    _stepguard_body_later = True

    def __init__(
        self,
        *,
        python_callable: Callable[..., Any],
        op_args: Collection[Any] | None = None,
        op_kwargs: Mapping[str, Any] | None = None,
        shell: bool = False,
        **kwargs: Any,
    ) -> None:
        self.shell = shell
        if shell:
            kwargs.setdefault("isolation", "sandbox")
        inferred = _inferred_receipts(python_callable, op_args or (), op_kwargs or {},
                                      kwargs.get("spec"), kwargs.get("receipts"))
        if inferred:
            kwargs["receipts"] = {**inferred, **(kwargs.get("receipts") or {})}
        super().__init__(
            kwargs_to_upstream={"python_callable": python_callable, "op_args": op_args,
                                "op_kwargs": op_kwargs},
            python_callable=python_callable,
            op_args=op_args,
            op_kwargs=op_kwargs,
            **kwargs,
        )

    def execute(self, context: Context) -> Any:
        if self.shell:
            from stepguard.errors import ConfigurationError

            command = self.python_callable(*self.op_args, **self.op_kwargs)
            if isinstance(command, str) and command.strip():
                self.command = command
            elif isinstance(command, (list, tuple)) and command:
                self.command = [str(a) for a in command]
            else:
                raise ConfigurationError("a shell body must return a command (str or argv list)",
                                         subject=self.task_id)
            self.python_callable = None  # type: ignore[assignment]
        return super().execute(context)

    def _returned(self, receipt: dict[str, Any], box: dict[str, Any], context: Context) -> Any:
        if self.shell:
            return receipt
        return box.get("result")


def _inferred_receipts(fn: Callable[..., Any], args: Collection[Any], kwargs: Mapping[str, Any],
                       spec: Any, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """Input name -> producer receipt, for each input the spec declares without a receipt
    whose name is a parameter bound to a secured task's value (``validate(raw)`` with
    ``raw = extract()``): that input is verified against the producer's receipt."""
    from airflow.sdk.definitions.xcom_arg import PlainXComArg

    if not isinstance(spec, Mapping):
        return {}
    names = [i.get("name") for i in spec.get("inputs") or () if isinstance(i, Mapping)
             and not (i.get("manifest") or i.get("receipt"))]
    wanted = [n for n in names if isinstance(n, str) and n not in (given or {})]
    if not wanted:
        return {}
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return {}
    out: dict[str, Any] = {}
    for name in wanted:
        value = bound.get(name)
        if isinstance(value, PlainXComArg):
            op = value.operator
            cls = getattr(op, "operator_class", None) or type(op)
            if getattr(cls, "_stepguard_secured", False):
                out[name] = value
    return out


def _hide_step_env(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Hide the ``step_env`` parameter from Airflow's parse-time signature binding.

    The value only exists while the step runs; the operator passes it in at execution.
    """
    sig = inspect.signature(fn)
    if STEP_ENV_PARAM not in sig.parameters:
        return fn

    @functools.wraps(fn)
    def shim(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    shim.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[p for p in sig.parameters.values() if p.name != STEP_ENV_PARAM])
    shim.__stepguard_wrapped__ = fn  # type: ignore[attr-defined]
    return shim


def stepguard_task(
    python_callable: Callable[..., Any] | None = None,
    multiple_outputs: bool | None = None,
    **kwargs: Any,
) -> TaskDecorator:
    """Wrap a function into a :class:`~stepguard_airflow.operators.SecureStepOperator` task.

    Accepts the operator's arguments (``spec``, ``isolation``, ``receipts``, ``env``,
    ``conn_id``) plus ``shell=True`` for functions that return a command, and ``@task``'s own
    (``multiple_outputs``, ``retries``, ...). The task's value is the function's return value;
    the receipt is under the XCom key ``stepguard_receipt``.
    """
    if python_callable is not None:
        python_callable = _hide_step_env(python_callable)
        return task_decorator_factory(python_callable=python_callable,
                                      multiple_outputs=multiple_outputs,
                                      decorated_operator_class=_StepguardDecoratedOperator,
                                      **kwargs)

    factory = task_decorator_factory(multiple_outputs=multiple_outputs,
                                     decorated_operator_class=_StepguardDecoratedOperator,
                                     **kwargs)

    def decorate(fn: Callable[..., Any]) -> Any:
        return factory(_hide_step_env(fn))

    return decorate  # type: ignore[return-value]
