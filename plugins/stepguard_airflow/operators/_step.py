"""``SecureStepOperator``: a command or a Python callable run as a stepguard step."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperator

from stepguard.errors import ConfigurationError
from stepguard_airflow._common import (
    coerce_spec,
    execute_step,
    receipt_xcom,
    resolve_spec,
    revoke_on_kill,
    spec_data,
)
from stepguard_airflow._failures import step_name, task_failure
from stepguard_airflow.assets import asset_outlets, resolve_receipt
from stepguard_airflow.lineage import LineageMixin

if TYPE_CHECKING:
    from airflow.sdk import Context

    from stepguard.spec import StepSpec

#: Name of the parameter through which a Python body receives its :class:`stepguard.step.StepEnv`.
STEP_ENV_PARAM = "step_env"
#: XCom key of every secured task's receipt (``return_value`` too, except for ``@task.stepguard``).
RECEIPT_KEY = "stepguard_receipt"


class SecureStepOperator(LineageMixin, BaseOperator):
    """Run a command or a Python callable as a secured step; push the receipt to XCom.

    The lifecycle is :func:`stepguard.step.run_step`: just-in-time credentials, inputs verified
    before the body starts, the body isolated, outputs hashed (and signed and published when the
    spec says so), credentials revoked, a receipt. The receipt is the task's return value (XCom
    ``return_value``); a credential never is.

    :param spec: the step: a :class:`~stepguard.spec.StepSpec`, a mapping in the same shape, or
        the path of a YAML file (templated). Default: a step named after the task.
    :param command: argv list, or a string run with ``/bin/sh -c`` (templated).
    :param python_callable: a Python body, run in this process (isolation mode ``process``). A
        parameter named ``step_env`` receives the :class:`~stepguard.step.StepEnv` (verified
        input paths, output dirs, credentials).
    :param op_args: positional arguments for ``python_callable`` (templated).
    :param op_kwargs: keyword arguments for ``python_callable`` (templated).
    :param isolation: override of the spec's isolation mode: ``process``, ``sandbox`` or
        ``pod``.
    :param receipts: input name -> upstream receipt (e.g. ``other_task.output``): the input is
        verified against the digest its producer recorded (templated). An Airflow ``Asset``
        instead of a receipt: the receipt of the asset event that triggered this run
        (:mod:`stepguard_airflow.assets`).
    :param asset: an ``Asset`` the step's output is announced as (the step must have one
        output), or ``{"output name": Asset}``; the asset event carries the output's manifest
        digest and the receipt. Plain ``outlets=[Asset(...)]`` do the same for a one-output
        step.
    :param env: extra, non-secret environment for a command body (templated).
    :param conn_id: the ``stepguard`` connection with Vault address/login (optional).
    :param templates_dict: as ``PythonOperator``'s: rendered, and handed to the callable as the
        context key ``templates_dict`` (templated).
    :param show_return_value_in_logs: as ``PythonOperator``'s: log the callable's return value.
    """

    template_fields: Sequence[str] = ("spec", "command", "op_args", "op_kwargs", "receipts",
                                      "env", "templates_dict")
    template_fields_renderers: ClassVar[dict[str, str]] = {
        "spec": "json", "receipts": "json", "env": "json", "command": "bash",
    }
    ui_color = "#d6f5e3"
    _stepguard_secured = True
    # Templated, so rendering may hand back any collection / mapping (as Airflow's own
    # DecoratedOperator declares them, which @task.stepguard also inherits).
    op_args: Collection[Any]
    op_kwargs: Mapping[str, Any]

    def __init__(
        self,
        *,
        spec: StepSpec | Mapping[str, Any] | str | None = None,
        command: str | Sequence[str] | None = None,
        python_callable: Callable[..., Any] | None = None,
        op_args: Collection[Any] | None = None,
        op_kwargs: Mapping[str, Any] | None = None,
        isolation: str | None = None,
        receipts: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        conn_id: str | None = "stepguard_default",
        templates_dict: Mapping[str, Any] | None = None,
        show_return_value_in_logs: bool = True,
        asset: Any = None,
        **kwargs: Any,
    ) -> None:
        self.stepguard_assets, outlets = asset_outlets(asset, kwargs.pop("outlets", None))
        super().__init__(outlets=outlets, **kwargs)
        if (command is None) == (python_callable is None) and not getattr(
                self, "_stepguard_body_later", False):
            from stepguard.errors import ConfigurationError

            raise ConfigurationError("give exactly one of 'command' or 'python_callable'",
                                     subject=self.task_id)
        if python_callable is not None and not callable(python_callable):
            from stepguard.errors import ConfigurationError

            raise ConfigurationError("python_callable is not callable", subject=self.task_id)
        if isolation is not None and isolation not in ("process", "sandbox", "pod"):
            from stepguard.errors import ConfigurationError

            raise ConfigurationError("must be process, sandbox or pod",
                                     subject=f"{self.task_id}.isolation")
        self.spec = coerce_spec(spec, step_name(self.task_id), tuple(receipts or ()))
        self.command = command
        self.python_callable = python_callable
        self.op_args = list(op_args or [])
        self.op_kwargs = dict(op_kwargs or {})
        self.isolation = isolation
        self.receipts = {k: receipt_arg(v) for k, v in receipts.items()} if receipts else None
        self.env = dict(env) if env else None
        self.conn_id = conn_id
        self.templates_dict = dict(templates_dict) if templates_dict else None
        self.show_return_value_in_logs = show_return_value_in_logs

    def _argv(self) -> list[str] | None:
        if self.command is None:
            return None
        if isinstance(self.command, str):
            return ["/bin/sh", "-c", self.command]
        return [str(a) for a in self.command]

    def _body(self, box: dict[str, Any], context: Context) -> Callable[[Any], None] | None:
        fn = self.python_callable
        if fn is None:
            return None
        wants_env = _accepts(fn, STEP_ENV_PARAM)
        args = list(self.op_args)
        kwargs = dict(_with_context(fn, self.op_args, self.op_kwargs,
                                    {**context, "templates_dict": self.templates_dict}))
        shown = self.show_return_value_in_logs

        def body(step_env: Any) -> None:
            extra = {STEP_ENV_PARAM: step_env} if wants_env else {}
            box["result"] = fn(*args, **kwargs, **extra)
            if shown:
                self.log.info("Done. Returned value was: %s", box["result"])
            else:
                self.log.info("Done. Returned value not shown")

        return body

    def on_kill(self) -> None:
        revoke_on_kill()

    def execute(self, context: Context) -> Any:
        isolation = self.isolation
        spec_in = spec_data(self.spec)  # a spec file is read once, here
        if self.python_callable is not None and isolation is None:
            asked = _asked_mode(spec_in)
            if asked not in (None, "process"):
                # Never run a body with less isolation than its spec asks for.
                raise task_failure(step_name(self.task_id), ConfigurationError(
                    f"the spec asks for isolation mode {asked!r}, but a Python callable runs "
                    "in the task process", subject=f"{self.task_id}.isolation.mode",
                    hint="pass command=... to run it isolated, or set isolation='process'"))
            isolation = "process"
        receipts = ({k: resolve_receipt(context, v) for k, v in self.receipts.items()}
                    if self.receipts else None)
        spec = resolve_spec(spec_in, isolation, self.env, receipts)
        box: dict[str, Any] = {}
        receipt = execute_step(context=context, spec=spec, command=self._argv(),
                               body=self._body(box, context), conn_id=self.conn_id,
                               receipts=receipts)
        data = receipt_xcom(receipt)
        context["ti"].xcom_push(key=RECEIPT_KEY, value=data)
        return self._returned(data, box, context)

    def _returned(self, receipt: dict[str, Any], box: dict[str, Any], context: Context) -> Any:
        """The task's ``return_value``: the receipt; a Python body's value also goes to
        ``result``. (``@task.stepguard`` returns the function's value instead.)"""
        result = box.get("result")
        if result is not None:
            context["ti"].xcom_push(key="result", value=_jsonable(result))
        return receipt


def receipt_arg(value: Any) -> Any:
    """A producer's receipt for ``receipts=``: ``task()`` of a ``@task.stepguard`` function is
    its *value*, so its receipt is read from the ``stepguard_receipt`` key instead."""
    from airflow.sdk.definitions.xcom_arg import PlainXComArg, XComArg

    if isinstance(value, PlainXComArg) and value.key == "return_value":
        op = value.operator
        cls = getattr(op, "operator_class", None) or type(op)
        if getattr(cls, "_stepguard_returns_value", False):
            return XComArg(op, key=RECEIPT_KEY)
    return value


def _with_context(fn: Callable[..., Any], args: Collection[Any], kwargs: Mapping[str, Any],
                  context: Context) -> Mapping[str, Any]:
    """The keyword arguments of a Python body, with the Airflow context injected exactly as
    ``@task``/``PythonOperator`` do: by parameter name (``ds``, ``params``, ``ti``...) or all of
    it to ``**kwargs``."""
    from airflow.sdk.bases.decorator import KeywordParameters

    merged = {**context, **kwargs}
    return KeywordParameters.determine(fn, args, merged).unpacking()


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    target = getattr(fn, "__stepguard_wrapped__", fn)
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    try:
        json.dumps(value)
    except TypeError:
        return repr(value)
    return value


def _asked_mode(spec: Any) -> str | None:
    """The isolation mode a spec states explicitly (None when it leaves it to the default)."""
    from stepguard.spec import StepSpec

    if isinstance(spec, StepSpec):
        return spec.isolation.mode
    if isinstance(spec, Mapping):
        iso = spec.get("isolation")
        if isinstance(iso, Mapping) and iso.get("mode") is not None:
            return str(iso["mode"])
    return None
