"""Secret-flow checks of ``stepguard lint`` (rule ``SG005``): where a secret read from a
connection, a Variable or Vault ends up somewhere it is stored and shown.

A value is a *secret* when it comes from ``conn.password`` / ``.extra`` / ``.extra_dejson``,
``get_password()``, ``get_uri()``, ``get_connection()``, ``get_credentials()``, a Vault hook's
``get_secret()``, or ``Variable.get("<secret-named key>")`` -- or from a name, item or
attribute of such a value, or a container or f-string holding one. Calls on it (``len(secret)``,
``hash(secret)``) are not secrets. Sinks:

* XCom: ``return <secret>`` from a task (``@task...`` or a ``python_callable=``), and
  ``xcom_push(..., <secret>)`` anywhere; XCom lives in the metadata database and the UI.
* a pod's environment: a Jinja template that renders a connection's password/extra, a
  secret-named Variable, or (for a secret-named variable) an ``xcom_pull`` into
  ``env_vars=`` of a pod operator or ``V1EnvVar(value=...)``: rendered values land in the pod
  spec (etcd, ``kubectl get pod -o yaml``) and in Airflow's rendered fields.

The *names* of secrets, their paths and Vault paths are not secrets: ``Variable.get("db_path")``,
``{"DB_PASSWORD_FILE": "/vault/secrets/db"}``, ``"{{ var.value.bucket }}"`` are fine.

>>> import ast
>>> src = "@task\\ndef f():\\n    c = BaseHook.get_connection('db')\\n    return c.password\\n"
>>> [(line, rule) for line, _col, rule, _msg in secret_flows(ast.parse(src), {"task"})]
[(4, 'SG005')]
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator

__all__ = ["is_secret_key", "secret_flows"]

_SECRET_KEY = re.compile(
    r"(^|[_.-])(pass(word|wd)?|pwd|secret|token|api_?key|access_?key|private_?key|"
    r"credentials?|auth)($|[_.-])", re.IGNORECASE)
_NOT_SECRET_KEY = re.compile(r"([_.-](id|path|file|env|var|name|conn_id|mount|role|url|ttl|type|"
                             r"field|dir|uri_name))$", re.IGNORECASE)
_SOURCE_ATTRS = frozenset({"password", "extra", "extra_dejson", "secret_key", "session_token"})
_SOURCE_METHODS = frozenset({"get_password", "get_uri", "get_connection", "get_credentials",
                             "get_frozen_credentials", "get_secret",
                             "get_secret_including_metadata", "get_secret_value"})
#: Attributes of a connection that are not secret.
_PUBLIC_ATTRS = frozenset({"host", "login", "port", "schema", "conn_id", "conn_type",
                           "description"})
_PASS_THROUGH = frozenset({"get", "copy", "items", "values", "format", "strip", "decode"})
_POD_OPERATORS = re.compile(r"KubernetesPodOperator$")
_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_CONN_SECRET = re.compile(r"\bconn\.\w+\.(password|extra|extra_dejson|get_uri)\b")
_VAR_SECRET = re.compile(r"\bvar\.(?:value|json)\.([A-Za-z0-9_]+)")


def is_secret_key(name: str) -> bool:
    """Whether a key/variable name says it holds a secret value (not its path, id or name).

    >>> [is_secret_key(n) for n in ("db_password", "api-token", "db_password_path", "bucket")]
    [True, True, False, False]
    """
    return bool(_SECRET_KEY.search(name)) and not _NOT_SECRET_KEY.search(name)


def _is_variable_get(node: ast.Call) -> bool:
    f = node.func
    return (isinstance(f, ast.Attribute) and f.attr == "get" and isinstance(f.value, ast.Name)
            and f.value.id == "Variable")


def _tainted(node: ast.AST | None, names: set[str]) -> bool:
    if node is None:
        return False
    if isinstance(node, ast.Name):
        return node.id in names
    if isinstance(node, ast.Attribute):
        if node.attr in _PUBLIC_ATTRS:
            return False
        return node.attr in _SOURCE_ATTRS or _tainted(node.value, names)
    if isinstance(node, ast.Subscript):
        return _tainted(node.value, names)
    if isinstance(node, ast.Call):
        f = node.func
        if _is_variable_get(node):
            key = node.args[0] if node.args else next(
                (k.value for k in node.keywords if k.arg == "key"), None)
            return isinstance(key, ast.Constant) and isinstance(key.value, str) and \
                is_secret_key(key.value)
        if isinstance(f, ast.Attribute):
            return f.attr in _SOURCE_METHODS or (f.attr in _PASS_THROUGH
                                                 and _tainted(f.value, names))
        return False
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return any(_tainted(e, names) for e in node.elts)
    if isinstance(node, ast.Dict):
        return any(_tainted(v, names) for v in node.values)
    if isinstance(node, ast.JoinedStr):
        return any(_tainted(v.value, names) for v in node.values
                   if isinstance(v, ast.FormattedValue))
    if isinstance(node, ast.BinOp):
        return _tainted(node.left, names) or _tainted(node.right, names)
    if isinstance(node, (ast.IfExp,)):
        return _tainted(node.body, names) or _tainted(node.orelse, names)
    return False


def _secret_names(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Names that hold a secret somewhere in ``fn`` (flow-insensitive, to a fixpoint)."""
    assigns: list[tuple[list[ast.expr], ast.expr]] = []
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign):
            assigns.append((node.targets, node.value))
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.NamedExpr)) and \
                node.value is not None:
            assigns.append(([node.target], node.value))
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                if item.optional_vars is not None:
                    assigns.append(([item.optional_vars], item.context_expr))
    names: set[str] = set()
    changed = True
    while changed:
        changed = False
        for targets, value in assigns:
            if not _tainted(value, names):
                continue
            for target in targets:
                for n in ast.walk(target):
                    if isinstance(n, ast.Name) and n.id not in names:
                        names.add(n.id)
                        changed = True
    return names


def _is_task(fn: ast.FunctionDef | ast.AsyncFunctionDef, task_names: set[str],
             callables: set[str]) -> bool:
    if fn.name in callables:
        return True
    for deco in fn.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        while isinstance(target, ast.Attribute):
            target = target.value
        if isinstance(target, ast.Name) and target.id in task_names:
            return True
    return False


def _template_secret(text: str, env_name: str | None) -> str | None:
    """What secret a templated string renders, or None."""
    for expr in _TEMPLATE.findall(text):
        if _CONN_SECRET.search(expr):
            return "a connection's password/extra"
        var = _VAR_SECRET.search(expr)
        if var and is_secret_key(var.group(1)):
            return f"the secret Variable {var.group(1)!r}"
        if "xcom_pull" in expr and env_name and is_secret_key(env_name):
            return "a secret pulled from XCom"
    return None


def _pod_env(node: ast.Call) -> Iterator[tuple[ast.AST, str]]:
    """(node, why) for each pod environment value that renders a secret."""
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    if name == "V1EnvVar":
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        value, env = kw.get("value"), kw.get("name")
        env_name = env.value if isinstance(env, ast.Constant) and isinstance(env.value,
                                                                              str) else None
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            why = _template_secret(value.value, env_name)
            if why:
                yield value, why
        return
    if not _POD_OPERATORS.search(name):
        return
    for arg in node.keywords:
        if arg.arg != "env_vars" or not isinstance(arg.value, ast.Dict):
            continue
        for key, value in zip(arg.value.keys, arg.value.values, strict=True):
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                env_name = key.value if isinstance(key, ast.Constant) and \
                    isinstance(key.value, str) else None
                why = _template_secret(value.value, env_name)
                if why:
                    yield value, why


def secret_flows(tree: ast.Module, task_names: set[str]) -> Iterator[tuple[int, int, str, str]]:
    """(line, column, rule, message) for every secret that flows into XCom or a pod's env.

    ``task_names``: the local names bound to Airflow's ``task`` decorator.
    """
    callables = {kw.value.id for node in ast.walk(tree) if isinstance(node, ast.Call)
                 for kw in node.keywords
                 if kw.arg == "python_callable" and isinstance(kw.value, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for where, why in _pod_env(node):
                yield (getattr(where, "lineno", 0), getattr(where, "col_offset", 0) + 1,
                       "SG005", f"{why} is templated into a pod's environment (rendered into "
                       "the pod spec and the task's rendered fields): request it as a JIT "
                       "credential (credentials=...)")
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        names = _secret_names(node)
        is_task = _is_task(node, task_names, callables)
        for inner in ast.walk(node):
            if is_task and isinstance(inner, ast.Return) and _tainted(inner.value, names):
                yield (inner.lineno, inner.col_offset + 1, "SG005",
                       f"task {node.name!r} returns a secret: it is stored in XCom (database, "
                       "UI); return a reference, or use a JIT credential inside the step")
            if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute) and \
                    inner.func.attr == "xcom_push":
                values = list(inner.args[1:2]) + [k.value for k in inner.keywords
                                                   if k.arg == "value"]
                if any(_tainted(v, names) for v in values):
                    yield (inner.lineno, inner.col_offset + 1, "SG005",
                           "a secret is pushed to XCom (database, UI)")
