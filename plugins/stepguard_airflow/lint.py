"""``stepguard lint DAGS_DIR``: the security posture of Airflow DAG files, for CI.

Static (AST) checks, no DAG is imported or run:

* ``SG001`` a stock operator or TaskFlow decorator that has a stepguard counterpart;
* ``SG002`` a stock ``KubernetesPodOperator`` without a security context;
* ``SG003`` a container image not pinned by digest (``@sha256:``);
* ``SG004`` a literal secret: a password/token/key-named value, a connection URI with a
  password, or a string shaped like a known credential (AWS key id, Vault token, private key...);
* ``SG020`` (with ``--floor FILE``) a breach of the organisation's policy floor: a template
  instance or a stepguard task that weakens it (see :mod:`stepguard_airflow._lint_floor`);
* ``SG000`` a file that does not parse.

Every finding names the file and line. A secret's value is never printed. A deliberate
exception is marked on its line with ``# stepguard: ignore[SG001]`` (or a bare
``# stepguard: ignore`` for every rule), so the exception is visible in review. Exit status: 0 when
clean, 1 when anything was found (``--warn-only``: always 0), 2 for a usage error.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "dag.py").write_text(
...     "from airflow.providers.standard.operators.bash import BashOperator\\n"
...     "t = BashOperator(task_id='t', bash_command='echo hi')\\n")
>>> [f.rule for f in lint_paths([d])]
['SG001']
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stepguard.errors import ConfigurationError

if TYPE_CHECKING:
    from stepguard.floor import Floor

__all__ = ["Finding", "lint_paths", "lint_source", "register"]

#: Stock operator class -> the stepguard counterpart to use instead.
COUNTERPARTS: dict[str, str] = {
    "KubernetesPodOperator": "stepguard_airflow.operators.SecureKubernetesPodOperator",
    "PythonOperator": "stepguard_airflow.operators.SecureStepOperator (python_callable=...)",
    "PythonVirtualenvOperator": "stepguard_airflow.operators.SecureStepOperator "
                                "(command=..., isolation='sandbox')",
    "ExternalPythonOperator": "stepguard_airflow.operators.SecureStepOperator "
                              "(command=..., isolation='sandbox')",
    "BashOperator": "stepguard_airflow.operators.SecureStepOperator (command=...)",
    "DockerOperator": "stepguard_airflow.operators.SecureKubernetesPodOperator, or "
                      "SecureStepOperator(isolation='sandbox')",
    "S3ToLocalFilesystemOperator": "stepguard_airflow.operators.IngestDatasetOperator",
    "S3FileTransformOperator": "stepguard_airflow.operators.IngestDatasetOperator",
}
#: TaskFlow decorators (``@task``, ``@task.<name>``) with a stepguard counterpart.
DECORATORS: dict[str, str] = {
    "task": "@task.stepguard",
    "python": "@task.stepguard",
    "bash": "@task.stepguard(shell=True)",
    "virtualenv": "@task.stepguard(shell=True, isolation='sandbox')",
    "external_python": "@task.stepguard(shell=True, isolation='sandbox')",
    "docker": "@task.stepguard(shell=True, isolation='sandbox') or SecureKubernetesPodOperator",
    "kubernetes": "SecureKubernetesPodOperator",
    "kubernetes_cmd": "SecureKubernetesPodOperator",
}
_KPO_CONTEXT_ARGS = ("security_context", "container_security_context", "pod_template_file",
                     "pod_template_dict", "full_pod_spec")
_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
_SECRET_NAME = re.compile(
    r"(^|_)(pass(word|wd)?|pwd|secret|token|api_?key|access_?key|private_?key|credentials?|"
    r"auth)($|_)", re.IGNORECASE)
_NOT_SECRET_NAME = re.compile(r"(_id|_path|_file|_env|_var|_name|_conn_id|_mount|_role|_url|"
                              r"_ttl(_s)?|_type|_field)$", re.IGNORECASE)
_SHAPES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("AWS access key id", re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("Vault token", re.compile(r"\b(hvs|hvb|hvr)\.[A-Za-z0-9_-]{20,}")),
    ("private key", re.compile(r"-----BEGIN ([A-Z]+ )?PRIVATE KEY-----")),
    ("GitHub token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b")),
    ("Slack token", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}")),
    ("connection URI with a password", re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^@\s/]+@")),
)


@dataclass(frozen=True)
class Finding:
    """One finding: file, line, column, rule id and message (never a secret value)."""

    path: str
    line: int
    col: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}: {self.rule} {self.message}"


def _is_templated_or_placeholder(value: str) -> bool:
    v = value.strip()
    return (not v or "{{" in v or v.startswith(("$", "<", "changeme", "CHANGEME"))
            or v in ("***", "xxx", "XXX", "..."))


def _name_of(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


class _Visitor(ast.NodeVisitor):
    def __init__(self, path: str) -> None:
        self.path = path
        self.findings: list[Finding] = []
        self.aliases: dict[str, str] = {}  # local name -> imported class name
        self.airflow_names: set[str] = set()

    def add(self, node: ast.AST, rule: str, message: str) -> None:
        self.findings.append(Finding(self.path, getattr(node, "lineno", 0),
                                     getattr(node, "col_offset", 0) + 1, rule, message))

    # -- imports ------------------------------------------------------------------------------

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        for alias in node.names:
            local = alias.asname or alias.name
            self.aliases[local] = alias.name
            if module.startswith(("airflow", "stepguard_airflow")):
                self.airflow_names.add(local)
        self.generic_visit(node)

    # -- operators ----------------------------------------------------------------------------

    def visit_Call(self, node: ast.Call) -> None:
        called = _name_of(node.func)
        original = self.aliases.get(called or "", called or "")
        if original in COUNTERPARTS and (called in self.airflow_names or
                                         isinstance(node.func, ast.Attribute)):
            self.add(node, "SG001", f"stock {original}: use {COUNTERPARTS[original]}")
            if original == "KubernetesPodOperator":
                given = {k.arg for k in node.keywords if k.arg}
                if not given & set(_KPO_CONTEXT_ARGS) and \
                        not any(k.arg is None for k in node.keywords):
                    self.add(node, "SG002", "KubernetesPodOperator without a security context "
                             "(pod runs with the image's user, privileges and capabilities)")
        for kw in node.keywords:
            if kw.arg == "image":
                self._image(kw.value)
            if kw.arg and isinstance(kw.value, ast.Constant) and \
                    isinstance(kw.value.value, str):
                self._named_value(kw.value, kw.arg)
        self.generic_visit(node)

    def _image(self, value: ast.expr) -> None:
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            image = value.value
            if "{{" not in image and not _DIGEST.search(image):
                self.add(value, "SG003", f"image not pinned by digest: {image} "
                         "(a tag can be moved to other bytes; use name@sha256:<digest>)")

    # -- decorators ---------------------------------------------------------------------------

    def _decorators(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for deco in node.decorator_list:
            target = deco.func if isinstance(deco, ast.Call) else deco
            kind: str | None = None
            if isinstance(target, ast.Name) and self.aliases.get(target.id) == "task" and \
                    target.id in self.airflow_names:
                kind = "task"
            elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and \
                    self.aliases.get(target.value.id) == "task" and \
                    target.value.id in self.airflow_names:
                kind = target.attr
            if kind in DECORATORS:
                shown = "@task" if kind == "task" else f"@task.{kind}"
                self.add(deco, "SG001", f"stock {shown}: use {DECORATORS[kind]}")

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._decorators(node)
        self.generic_visit(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._decorators(node)
        self.generic_visit(node)

    # -- literal secrets ----------------------------------------------------------------------

    def _named_value(self, value: ast.Constant, name: str) -> None:
        text = value.value
        if not isinstance(text, str) or _is_templated_or_placeholder(text):
            return
        if _SECRET_NAME.search(name) and not _NOT_SECRET_NAME.search(name):
            self.add(value, "SG004", f"literal secret in '{name}' (value not shown): use a "
                     "JIT credential (credentials=...) or an Airflow connection")

    def visit_Assign(self, node: ast.Assign) -> None:
        if isinstance(node.value, ast.Constant):
            for target in node.targets:
                name = _name_of(target) if not isinstance(target, ast.Subscript) else None
                if isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant):
                    name = str(target.slice.value)
                if name:
                    self._named_value(node.value, name)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        name = _name_of(node.target)
        if name and isinstance(node.value, ast.Constant):
            self._named_value(node.value, name)
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for key, value in zip(node.keys, node.values, strict=True):
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                if key.value == "image":
                    self._image(value)
                elif isinstance(value, ast.Constant):
                    self._named_value(value, key.value)
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str):
            for what, pattern in _SHAPES:
                if pattern.search(node.value):
                    if what.startswith("connection URI") and "{{" in node.value:
                        continue
                    self.add(node, "SG004", f"literal secret: looks like a {what} "
                             "(value not shown)")
                    break


def lint_source(source: str, path: str = "<string>", floor: Floor | None = None
                ) -> list[Finding]:
    """Findings for one file's source text (``floor``: also check it against that floor).

    >>> finding, = lint_source("password = 'hunter2'\\n", "d.py")
    >>> str(finding).split(" (")[0]
    "d.py:1:12: SG004 literal secret in 'password'"
    >>> "hunter2" in str(finding)
    False
    """
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as exc:
        return [Finding(path, exc.lineno or 0, exc.offset or 0, "SG000",
                        "file does not parse as Python")]
    visitor = _Visitor(path)
    visitor.visit(tree)
    if floor is not None:
        _floor_rule(visitor, tree, floor)
    ignored = _suppressions(source)
    # One finding per (line, rule): a secret both named and shaped is reported once.
    seen: set[tuple[int, int, str]] = set()
    out: list[Finding] = []
    for f in sorted(visitor.findings, key=lambda f: (f.line, f.col, f.rule)):
        key = (f.line, f.col, f.rule)
        rules = ignored.get(f.line)
        if rules is not None and (not rules or f.rule in rules):
            continue
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def _floor_rule(visitor: _Visitor, tree: ast.AST, floor: Floor) -> None:
    """SG020: the DAG file against the organisation's policy floor."""
    from stepguard_airflow._lint_floor import RULE, floor_findings

    for line, col, message in floor_findings(tree, floor):
        visitor.findings.append(Finding(visitor.path, line, col, RULE, message))


_IGNORE = re.compile(r"#\s*stepguard:\s*ignore(?:\[(?P<rules>[A-Z0-9, ]+)\])?")


def _suppressions(source: str) -> dict[int, set[str]]:
    """line -> rules ignored there (empty set: all rules)."""
    out: dict[int, set[str]] = {}
    for number, line in enumerate(source.splitlines(), 1):
        m = _IGNORE.search(line)
        if m:
            rules = m.group("rules")
            out[number] = {r.strip() for r in rules.split(",")} if rules else set()
    return out


def _files(paths: Iterable[Path]) -> Iterator[Path]:
    for p in paths:
        if p.is_dir():
            yield from sorted(q for q in p.rglob("*.py")
                              if not any(part.startswith(".") or part == "__pycache__"
                                         for part in q.relative_to(p).parts))
        elif p.is_file():
            yield p
        else:
            raise ConfigurationError("no such file or directory", subject=str(p))


def lint_paths(paths: Sequence[Path], floor: Floor | None = None) -> list[Finding]:
    """Findings for every ``*.py`` file under ``paths`` (directories are walked); ``floor``
    adds the SG020 check against that policy floor."""
    findings: list[Finding] = []
    for f in _files(paths):
        try:
            source = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            findings.append(Finding(str(f), 0, 0, "SG000",
                                    f"cannot read file ({type(exc).__name__})"))
            continue
        findings.extend(lint_source(source, str(f), floor))
    return findings


def _handle(args: argparse.Namespace) -> int:
    floor = None
    if args.floor:
        from stepguard_airflow._lint_floor import load_floor

        floor = load_floor(args.floor)
    findings = lint_paths([Path(p) for p in args.paths], floor)
    if args.select:
        wanted = {s.strip() for s in args.select.split(",")}
        findings = [f for f in findings if f.rule in wanted]
    if args.json:
        print(json.dumps({"findings": [asdict(f) for f in findings],
                          "count": len(findings)}, indent=2))
    else:
        for f in findings:
            print(f)
        print(f"{len(findings)} finding{'s' if len(findings) != 1 else ''}", file=sys.stderr)
    return 0 if (not findings or args.warn_only) else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``stepguard lint``."""
    p = sub.add_parser("lint", help="check Airflow DAG files for insecure patterns (CI)",
                       description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("paths", nargs="+", metavar="DAGS_DIR", help="DAG files or directories")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--select", help="only these rules, comma-separated (e.g. SG003,SG004)")
    p.add_argument("--warn-only", action="store_true", help="report, but exit 0")
    p.add_argument("--floor", metavar="FILE",
                   help="also check against this policy floor (SG020): a floor YAML, or a "
                        "template or settings file with a 'floor:' section")
    p.set_defaults(func=_handle)
