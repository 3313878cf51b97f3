"""``stepguard lint DAGS_DIR``: the security posture of Airflow DAG files, for CI.

Static (AST) checks, no DAG is imported or run:

* ``SG001`` a stock operator or TaskFlow decorator that has a stepguard counterpart (including
  every amazon-provider S3 transfer, copy and create-object operator);
* ``SG002`` a stock ``KubernetesPodOperator`` without a security context, or any pod or
  container security context that grants privileges (``privileged``, privilege escalation,
  root, added capabilities) or host namespaces (``hostNetwork``/``hostPID``/``hostIPC``);
* ``SG003`` a container image not pinned by digest (``@sha256:``), also when the image is held
  in a module-level constant;
* ``SG004`` a literal secret: a password/token/key-named value, a connection URI with a
  password, a string shaped like a known credential (AWS key id, Vault token, private key...),
  or a URL carrying a token (Slack/Discord/Teams webhooks, ``?token=``, ``sig=``...);
* ``SG005`` a secret from a connection, a Variable or Vault that flows into XCom or is templated
  into a pod's environment (see :mod:`stepguard_airflow._lint_flow`);
* ``SG020`` (with ``--floor FILE``) a breach of the organisation's policy floor: a template
  instance or a stepguard task that weakens it (see :mod:`stepguard_airflow._lint_floor`);
* ``SG000`` a file that does not parse.

Secret *names*, file paths and Vault paths are not secrets: ``password_file="/run/db"``,
``{"secret": "kv/data/train"}``, ``secret_name="db-password"`` are never findings.

Module-level string constants are propagated (``IMAGE = "python:3.11"`` then ``image=IMAGE``),
including ``+`` and f-strings of constants. Every finding names the file and line. A secret's
value is never printed. A deliberate exception is marked on its line with
``# stepguard: ignore[SG001]`` (or a bare ``# stepguard: ignore`` for every rule), so the
exception is visible in review. Output: text (default), ``--json``, or ``--sarif`` (SARIF 2.1.0,
for CI code scanning). Exit status: 0 when clean, 1 when anything was found (``--warn-only``:
always 0), 2 for a usage error.

Adding a rule: give it an id and description in :data:`RULES` and append a check -- a function
``(tree, context) -> iterable of Finding`` -- to :data:`CHECKS`.

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepguard.errors import ConfigurationError
from stepguard_airflow._lint_flow import is_secret_key, secret_flows

if TYPE_CHECKING:
    from stepguard.floor import Floor

__all__ = ["CHECKS", "RULES", "Finding", "LintContext", "lint_paths", "lint_source", "register",
           "to_sarif"]

#: Rule id -> what it finds (the ``--sarif`` rule descriptions, and the docs' table).
RULES: dict[str, str] = {
    "SG000": "file does not parse or cannot be read",
    "SG001": "stock operator or decorator that has a stepguard counterpart",
    "SG002": "pod without a security context, or a context granting privileges or host "
             "namespaces",
    "SG003": "container image not pinned by digest",
    "SG004": "literal secret: secret-named value, credential-shaped string, token-bearing URL",
    "SG005": "secret from a connection, Variable or Vault flows into XCom or a pod's "
             "environment",
    "SG020": "breach of the organisation's policy floor (with --floor)",
}

_S3_WRITE = ("SecureStepOperator with a declared output (uploaded with SHA-256 checksums and a "
             "manifest), or SignAndPublishModelOperator for models")
_S3_READ = "stepguard_airflow.operators.IngestDatasetOperator (verified before use)"
#: Every amazon-provider operator that moves, copies or creates S3 data.
_S3_OPERATORS: dict[str, str] = {
    **dict.fromkeys((
        "AzureBlobStorageToS3Operator", "DynamoDBToS3Operator", "ExasolToS3Operator",
        "FTPToS3Operator", "GCSToS3Operator", "GoogleApiToS3Operator", "HttpToS3Operator",
        "ImapAttachmentToS3Operator", "LocalFilesystemToS3Operator", "MongoToS3Operator",
        "RedshiftToS3Operator", "SalesforceToS3Operator", "SFTPToS3Operator", "SqlToS3Operator",
        "S3CopyObjectOperator", "S3CopyPrefixOperator", "S3CreateObjectOperator"), _S3_WRITE),
    **dict.fromkeys((
        "S3ToDynamoDBOperator", "S3ToFTPOperator", "S3ToRedshiftOperator", "S3ToSFTPOperator",
        "S3ToSqlOperator", "S3ReadObjectOperator", "S3ToLocalFilesystemOperator",
        "S3FileTransformOperator"), _S3_READ),
}

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
    **_S3_OPERATORS,
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
    ("webhook URL with a token", re.compile(
        r"https://(hooks\.slack\.com/(services|workflows|triggers)/[A-Za-z0-9/_-]{20,}|"
        r"(discord|discordapp)\.com/api/webhooks/\d+/[\w-]{20,}|"
        r"[\w.-]*webhook\.office\.com/webhookb2/\S{20,}|"
        r"[\w.-]+\.logic\.azure\.com\S*[?&]sig=[^&\s{]{16,})")),
    ("URL with a token", re.compile(
        r"\bhttps?://[^\s'\"]*[?&](access_token|token|api_?key|apikey|key|sig|signature|"
        r"x-amz-signature|client_secret|password|secret|auth)=(?!\{\{)[^&\s#'\"]{8,}",
        re.IGNORECASE)),
)
#: A value that names or locates a secret instead of being one: a path, a Vault path, a
#: ``scheme:`` reference, or a secret's own name (``db-password``).
_REFERENCE = re.compile(
    r"^(/|\./|~/|(vault|env|file|s3|gs|kv|secret|ssm|arn|aws|k8s|kubernetes):(?!//[^/\s:@]+:)|"
    r"[a-z0-9_.{}-]+(/[a-z0-9_.{}-]+)+/?$)")  # Vault paths are lower case; keys are not
_SECRET_NAME_VALUE = re.compile(r"^[a-z][a-z0-9]*([_.-][a-z0-9]+)+$")
_PRIVILEGE_KEYS = {
    # key (camelCase or snake_case) -> (bad value, what it grants)
    "privileged": (True, "a privileged container (every device, every capability)"),
    "allowPrivilegeEscalation": (True, "privilege escalation (set-uid binaries)"),
    "allow_privilege_escalation": (True, "privilege escalation (set-uid binaries)"),
    "runAsNonRoot": (False, "a container that may run as root"),
    "run_as_non_root": (False, "a container that may run as root"),
    "runAsUser": (0, "a container running as root"),
    "run_as_user": (0, "a container running as root"),
    "hostNetwork": (True, "the host's network namespace"),
    "host_network": (True, "the host's network namespace"),
    "hostnetwork": (True, "the host's network namespace"),
    "hostPID": (True, "the host's process namespace"),
    "host_pid": (True, "the host's process namespace"),
    "hostIPC": (True, "the host's IPC namespace"),
    "host_ipc": (True, "the host's IPC namespace"),
}
_CAPABILITY_KEYS = ("add",)


def _is_reference(value: str) -> bool:
    v = value.strip()
    if _REFERENCE.match(v) and " " not in v:
        return True
    return bool(_SECRET_NAME_VALUE.match(v)) and is_secret_key(v)


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


@dataclass
class LintContext:
    """What a check knows about the file: its path, its imports, its module constants."""

    path: str
    #: local name -> imported name (``from x import A as B``: ``B -> A``).
    aliases: dict[str, str] = field(default_factory=dict)
    #: local names imported from airflow or stepguard_airflow.
    airflow_names: set[str] = field(default_factory=set)
    #: module-level name -> its assigned expression (constant propagation).
    constants: dict[str, ast.expr] = field(default_factory=dict)
    #: the organisation's policy floor, when linting with ``--floor`` (SG020).
    floor: Floor | None = None

    def finding(self, node: ast.AST, rule: str, message: str) -> Finding:
        return Finding(self.path, getattr(node, "lineno", 0),
                       getattr(node, "col_offset", 0) + 1, rule, message)

    def value(self, node: ast.expr, depth: int = 0) -> ast.expr:
        """``node`` with module-level names replaced by what they were assigned."""
        if isinstance(node, ast.Name) and node.id in self.constants and depth < 8:
            return self.value(self.constants[node.id], depth + 1)
        return node

    def string(self, node: ast.expr, depth: int = 0) -> str | None:
        """The string value of ``node`` when it is known statically (constants, ``+``,
        f-strings of constants), else None."""
        node = self.value(node, depth)
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if depth > 8:
            return None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = self.string(node.left, depth + 1), self.string(node.right, depth + 1)
            return left + right if left is not None and right is not None else None
        if isinstance(node, ast.JoinedStr):
            parts = []
            for v in node.values:
                part = self.string(v.value if isinstance(v, ast.FormattedValue) else v,
                                   depth + 1)
                if part is None:
                    return None
                parts.append(part)
            return "".join(parts)
        return None


def _module_context(tree: ast.Module, path: str) -> LintContext:
    ctx = LintContext(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            for alias in node.names:
                local = alias.asname or alias.name
                ctx.aliases[local] = alias.name
                if module.startswith(("airflow", "stepguard_airflow")):
                    ctx.airflow_names.add(local)
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and \
                isinstance(stmt.targets[0], ast.Name):
            ctx.constants[stmt.targets[0].id] = stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and \
                stmt.value is not None:
            ctx.constants[stmt.target.id] = stmt.value
    return ctx


class _Visitor(ast.NodeVisitor):
    def __init__(self, ctx: LintContext) -> None:
        self.ctx = ctx
        self.path = ctx.path
        self.findings: list[Finding] = []
        self.aliases = ctx.aliases
        self.airflow_names = ctx.airflow_names

    def add(self, node: ast.AST, rule: str, message: str) -> None:
        self.findings.append(self.ctx.finding(node, rule, message))

    # -- imports ------------------------------------------------------------------------------

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
            if kw.arg in _PRIVILEGE_KEYS:
                self._privilege(kw.value, kw.arg, node)
            elif kw.arg in ("security_context", "container_security_context",
                            "pod_template_dict", "full_pod_spec", "capabilities") and \
                    isinstance(kw.value, ast.Name):
                # A context held in a module constant: check what it was assigned.
                resolved = self.ctx.value(kw.value)
                if resolved is not kw.value:
                    self._context_of(resolved, node)
        if called in ("V1Capabilities",):
            self._capabilities(node)
        self.generic_visit(node)

    def _privilege(self, value: ast.expr, key: str, where: ast.AST) -> None:
        bad, grants = _PRIVILEGE_KEYS[key]
        resolved = self.ctx.value(value)
        if isinstance(resolved, ast.Constant) and resolved.value == bad and \
                type(resolved.value) is type(bad):
            self.add(where, "SG002", f"security context grants {grants} ({key}="
                     f"{resolved.value!r}): remove it; stepguard pods never need it")

    def _context_of(self, node: ast.expr, where: ast.AST) -> None:
        """Privilege settings inside a context held in a module-level constant."""
        for inner in ast.walk(node):
            if isinstance(inner, ast.Dict):
                for key, value in zip(inner.keys, inner.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value in _PRIVILEGE_KEYS:
                        self._privilege(value, str(key.value), where)
            elif isinstance(inner, ast.Call):
                for kw in inner.keywords:
                    if kw.arg in _PRIVILEGE_KEYS:
                        self._privilege(kw.value, kw.arg, where)

    def _capabilities(self, node: ast.Call | ast.Dict) -> None:
        added: ast.expr | None = None
        if isinstance(node, ast.Call):
            added = next((k.value for k in node.keywords if k.arg == "add"), None)
        else:
            added = next((v for k, v in zip(node.keys, node.values, strict=True)
                          if isinstance(k, ast.Constant) and k.value == "add"), None)
        if isinstance(added, (ast.List, ast.Tuple)) and added.elts:
            caps = [self.ctx.string(e) or "?" for e in added.elts]
            self.add(node, "SG002", f"security context adds capabilities ({', '.join(caps)}): "
                     "drop ALL and add none")

    def _image(self, value: ast.expr) -> None:
        image = self.ctx.string(value)
        if image is not None and "{{" not in image and not _DIGEST.search(image):
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
        if not isinstance(text, str) or _is_templated_or_placeholder(text) or \
                _is_reference(text):
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
                elif key.value in _PRIVILEGE_KEYS:
                    self._privilege(value, key.value, value)
                elif key.value == "capabilities" and isinstance(value, ast.Dict):
                    self._capabilities(value)
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
    ctx = _module_context(tree, path)
    ctx.floor = floor
    found = [f for check in CHECKS for f in check(tree, ctx)]
    ignored = _suppressions(source)
    # One finding per (line, rule): a secret both named and shaped is reported once.
    seen: set[tuple[int, int, str]] = set()
    out: list[Finding] = []
    for f in sorted(found, key=lambda f: (f.line, f.col, f.rule)):
        key = (f.line, f.col, f.rule)
        rules = ignored.get(f.line)
        if rules is not None and (not rules or f.rule in rules):
            continue
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def _node_checks(tree: ast.Module, ctx: LintContext) -> list[Finding]:
    """SG001-SG004: one pass over the tree."""
    visitor = _Visitor(ctx)
    visitor.visit(tree)
    return visitor.findings


def _flow_checks(tree: ast.Module, ctx: LintContext) -> list[Finding]:
    """SG005: secrets flowing into XCom or a pod's environment."""
    tasks = {local for local, name in ctx.aliases.items()
             if name == "task" and local in ctx.airflow_names}
    return [Finding(ctx.path, line, col, rule, message)
            for line, col, rule, message in secret_flows(tree, tasks)]


def _floor_checks(tree: ast.Module, ctx: LintContext) -> list[Finding]:
    """SG020: the DAG file against the organisation's policy floor (``--floor``)."""
    if ctx.floor is None:
        return []
    from stepguard_airflow._lint_floor import RULE, floor_findings

    return [Finding(ctx.path, line, col, RULE, message)
            for line, col, message in floor_findings(tree, ctx.floor)]


#: Every check run on a file: ``(tree, context) -> findings``. A new rule appends its check.
CHECKS: list[Callable[[ast.Module, LintContext], Iterable[Finding]]] = [
    _node_checks, _flow_checks, _floor_checks,
]


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
    if args.sarif:
        print(json.dumps(to_sarif(findings), indent=2))
    elif args.json:
        print(json.dumps({"findings": [asdict(f) for f in findings],
                          "count": len(findings)}, indent=2))
    else:
        for f in findings:
            print(f)
        print(f"{len(findings)} finding{'s' if len(findings) != 1 else ''}", file=sys.stderr)
    return 0 if (not findings or args.warn_only) else 1


def to_sarif(findings: Sequence[Finding], root: Path | None = None) -> dict[str, Any]:
    """Findings as a SARIF 2.1.0 log (one run, every rule described, paths relative to
    ``root``, default the current directory, under ``%SRCROOT%``).

    >>> log = to_sarif([Finding("dags/a.py", 3, 5, "SG003", "image not pinned")],
    ...                root=Path("."))
    >>> log["version"], log["runs"][0]["results"][0]["locations"][0]["physicalLocation"]
    ('2.1.0', {'artifactLocation': {'uri': 'dags/a.py', 'uriBaseId': '%SRCROOT%'}, \
'region': {'startLine': 3, 'startColumn': 5}})
    """
    from stepguard_airflow._lint_sarif import sarif_log

    return sarif_log(findings, RULES, root)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``stepguard lint``."""
    p = sub.add_parser("lint", help="check Airflow DAG files for insecure patterns (CI)",
                       description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("paths", nargs="+", metavar="DAGS_DIR", help="DAG files or directories")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="machine-readable output")
    fmt.add_argument("--sarif", action="store_true",
                     help="SARIF 2.1.0 output, for CI code scanning (e.g. GitHub)")
    p.add_argument("--select", help="only these rules, comma-separated (e.g. SG003,SG004)")
    p.add_argument("--warn-only", action="store_true", help="report, but exit 0")
    p.add_argument("--floor", metavar="FILE",
                   help="also check against this policy floor (SG020): a floor YAML, or a "
                        "template or settings file with a 'floor:' section")
    p.set_defaults(func=_handle)
