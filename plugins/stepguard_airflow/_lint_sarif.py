"""SARIF 2.1.0 output of ``stepguard lint`` (``--sarif``), for CI code scanning.

:func:`stepguard_airflow.lint.to_sarif` is the public entry; this module only lays findings
out as one SARIF run with every rule described.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


class _Finding(Protocol):
    @property
    def path(self) -> str: ...
    @property
    def line(self) -> int: ...
    @property
    def col(self) -> int: ...
    @property
    def rule(self) -> str: ...
    @property
    def message(self) -> str: ...


def sarif_log(findings: Sequence[_Finding], rules: Mapping[str, str],
              root: Path | None = None) -> dict[str, Any]:
    """The SARIF log of ``findings``; ``rules`` maps rule ids to their descriptions."""
    from stepguard import __version__

    base = (root or Path.cwd()).absolute()
    ids = sorted(rules)
    results = []
    for f in findings:
        p = Path(f.path).absolute()
        try:
            uri = p.relative_to(base).as_posix()
        except ValueError:
            uri = p.as_uri()
        results.append({
            "ruleId": f.rule,
            "ruleIndex": ids.index(f.rule) if f.rule in ids else -1,
            "level": "error",
            "message": {"text": f.message},
            "locations": [{"physicalLocation": {
                "artifactLocation": {"uri": uri, "uriBaseId": "%SRCROOT%"},
                "region": {"startLine": max(f.line, 1), "startColumn": max(f.col, 1)},
            }}],
        })
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "stepguard-lint",
                "version": __version__,
                "rules": [{"id": rid, "name": rid,
                           "shortDescription": {"text": rules[rid]},
                           "defaultConfiguration": {"level": "error"}} for rid in ids],
            }},
            "columnKind": "unicodeCodePoints",
            "results": results,
        }],
    }
