"""``SG020``: DAG files checked against the organisation's policy floor (``lint --floor``).

The same :class:`~stepguard.floor.Floor` that templates enforce at parse time and the step
runner at run time, read statically (nothing is imported or run) from literal values:

* template instances -- ``template.instantiate(...)``, ``instantiate_all([{...}])``,
  ``Instance(...)`` -- whose ``isolation``, ``signature_policy`` or ``deadline_s`` weaken the
  floor of the training step;
* hand-written stepguard tasks -- ``SecureStepOperator`` (its ``spec``, ``isolation`` and
  ``python_callable``), ``@task.stepguard`` (a Python body runs in the task process),
  ``VerifyModelOperator(policy=...)`` -- matched to the floor's step patterns by task id;
* any ``"unsafe_unverified": True`` when the floor needs every input verified.

Each finding's message starts with the floor rule's name. Values held in variables are not
followed.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stepguard.floor import DEFAULT_TTL_MARGIN_S, Floor, step_matches

RULE = "SG020"

_UNKNOWN = object()
_TEMPLATE_CALLS = ("instantiate", "Instance")
_STEP_OPERATORS = ("SecureStepOperator",)


def load_floor(path: str | Path) -> Floor:
    """The floor in a YAML file: a floor mapping, or any file with a ``floor:`` section (a
    pipeline template, stepguard settings)."""
    return Floor.from_file(path)


def _literal(node: ast.AST | None) -> Any:
    if node is None:
        return _UNKNOWN
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _UNKNOWN


def _keywords(node: ast.Call) -> dict[str, ast.expr]:
    return {k.arg: k.value for k in node.keywords if k.arg}


def _callee(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


class FloorVisitor(ast.NodeVisitor):
    """Collects ``(node, floor rule, message)`` for every literal breach of ``floor``."""

    def __init__(self, floor: Floor) -> None:
        self.floor = floor
        self.found: list[tuple[ast.AST, str, str]] = []

    def add(self, node: ast.AST, rule: str, message: str) -> None:
        self.found.append((node, rule, f"floor rule {rule!r}: {message}"))

    # -- the training step's settings, wherever they are given -------------------------------

    def _isolation(self, node: ast.AST, step: str, iso: Any, mode: Any = _UNKNOWN) -> None:
        floor = self.floor
        if isinstance(iso, Mapping):
            mode = iso.get("mode", mode)
        if step_matches(step, floor.isolated_steps) and isinstance(mode, str) and \
                mode not in ("sandbox", "pod"):
            self.add(node, "isolated", f"step {step!r} runs in isolation mode {mode!r} (the "
                     "floor needs sandbox or pod)")
        if step_matches(step, floor.no_egress_steps) and isinstance(iso, Mapping):
            network = iso.get("network", "none")
            if iso.get("unsafe_host_network") is True or (
                    network != "none" and network is not _UNKNOWN):
                self.add(node, "no-egress", f"step {step!r} has network egress (the floor "
                         "allows none)")

    def _deadline(self, node: ast.AST, step: str, deadline: Any) -> None:
        limit = self.floor.max_credential_ttl_s
        if limit is not None and isinstance(deadline, (int, float)) and \
                deadline + DEFAULT_TTL_MARGIN_S > limit:
            self.add(node, "credential-ttl", f"step {step!r} would hold credentials for "
                     f"{deadline + DEFAULT_TTL_MARGIN_S:g} s (the floor allows {limit:g} s)")

    def _policy(self, node: ast.AST, policy: Any) -> None:
        wanted = self.floor.signature_policy
        if wanted is not None and isinstance(policy, str) and policy != wanted and \
                "{{" not in policy:
            self.add(node, "signed", f"the gate verifies under policy {policy!r} (the floor "
                     f"needs {wanted!r})")

    # -- template instances ----------------------------------------------------------------

    def _instance(self, node: ast.AST, values: Mapping[str, ast.expr | None]) -> None:
        # Each finding points at the value that breaches the floor.
        self._isolation(values.get("isolation") or node, "train",
                        _literal(values.get("isolation")))
        self._policy(values.get("signature_policy") or node,
                     _literal(values.get("signature_policy")))
        self._deadline(values.get("deadline_s") or node, "train",
                       _literal(values.get("deadline_s")))

    def _instance_dict(self, node: ast.Dict) -> None:
        values = {k.value: v for k, v in zip(node.keys, node.values, strict=True)
                  if isinstance(k, ast.Constant) and isinstance(k.value, str)}
        self._instance(node, values)

    # -- hand-written tasks ----------------------------------------------------------------

    def _step_operator(self, node: ast.Call, kw: Mapping[str, ast.expr]) -> None:
        spec = _literal(kw.get("spec"))
        spec = spec if isinstance(spec, Mapping) else {}
        task_id = _literal(kw.get("task_id"))
        step = spec.get("name") or (task_id if isinstance(task_id, str) else None)
        if not isinstance(step, str):
            return
        mode = _literal(kw.get("isolation"))
        if mode is _UNKNOWN or mode is None:
            mode = "process" if "python_callable" in kw else _UNKNOWN
        given = spec.get("isolation")
        iso: dict[str, Any] = dict(given) if isinstance(given, Mapping) else {}
        if isinstance(mode, str):
            iso = {**iso, "mode": mode}
        self._isolation(node, step, iso)
        if spec.get("credentials"):
            self._deadline(node, step, spec.get("deadline_s", 3600.0))

    def visit_Call(self, node: ast.Call) -> None:
        name = _callee(node.func)
        kw = _keywords(node)
        if name in _TEMPLATE_CALLS:
            self._instance(node, kw)
            for arg in node.args:
                if isinstance(arg, ast.Dict):
                    self._instance_dict(arg)
        elif name == "instantiate_all":
            for arg in node.args:
                items = [arg.elt] if isinstance(arg, (ast.ListComp, ast.GeneratorExp)) else \
                    getattr(arg, "elts", ())
                for elt in items:
                    if isinstance(elt, ast.Dict):
                        self._instance_dict(elt)
        elif name in _STEP_OPERATORS:
            self._step_operator(node, kw)
        elif name == "VerifyModelOperator":
            self._policy(node, _literal(kw.get("policy")))
        self.generic_visit(node)

    def _decorated(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for deco in node.decorator_list:
            target = deco.func if isinstance(deco, ast.Call) else deco
            if _callee(target) not in ("stepguard", "stepguard_task"):
                continue
            kw = _keywords(deco) if isinstance(deco, ast.Call) else {}
            task_id = _literal(kw.get("task_id"))
            step = task_id if isinstance(task_id, str) else node.name
            mode = _literal(kw.get("isolation"))
            if not isinstance(mode, str):
                mode = "sandbox" if _literal(kw.get("shell")) is True else "process"
            spec = _literal(kw.get("spec"))
            iso = dict(spec.get("isolation") or {}) if isinstance(spec, Mapping) else {}
            self._isolation(deco, step, {**iso, "mode": mode})

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._decorated(node)
        self.generic_visit(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._decorated(node)
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        if self.floor.inputs_verified:
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "unsafe_unverified" and \
                        _literal(value) is True:
                    self.add(value, "inputs-verified", "an input is used unverified (the "
                             "floor needs every input verified)")
        self.generic_visit(node)


def floor_findings(tree: ast.AST, floor: Floor) -> list[tuple[int, int, str]]:
    """``(line, column, message)`` of every literal breach of ``floor`` in a parsed file."""
    visitor = FloorVisitor(floor)
    visitor.visit(tree)
    out = []
    for node, _rule, message in visitor.found:
        out.append((getattr(node, "lineno", 0), getattr(node, "col_offset", 0) + 1, message))
    return out
