"""stepguard for Apache Airflow 3: secure operators, ``@task.stepguard``, a listener plugin.

Importing this package is cheap: it defines :func:`get_provider_info` (read by Airflow's
providers manager through the ``apache_airflow_provider`` entry point) and nothing else. The
operators live in :mod:`stepguard_airflow.operators`, the decorator in
:mod:`stepguard_airflow.decorators`, the listener plugin in :mod:`stepguard_airflow.plugin`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["__version__", "get_provider_info"]

__version__ = "0.1.0"


def _opt(description: str, default: str | None, *, kind: str = "string",
         example: str | None = None, sensitive: bool = False) -> dict[str, Any]:
    opt: dict[str, Any] = {
        "description": description,
        "version_added": "0.1.0",
        "type": kind,
        "example": example,
        "default": default,
    }
    if sensitive:
        opt["sensitive"] = True
    return opt


def get_provider_info() -> dict[str, Any]:
    """Describe the provider to Airflow's providers manager (no I/O, no heavy imports).

    >>> info = get_provider_info()
    >>> info["package-name"], info["task-decorators"][0]["name"]
    ('stepguard', 'stepguard')
    >>> sorted(info["config"]["stepguard"]["options"])[:3]
    ['audit_exporter', 'audit_path', 'conn_id']
    """
    return {
        "package-name": "stepguard",
        "name": "stepguard",
        "description": (
            "Secured ML pipeline steps: just-in-time Vault credentials, data integrity "
            "manifests, isolated execution, signed models and audit spans."
        ),
        "versions": [__version__],
        "hook-class-names": [],
        "integrations": [
            {
                "integration-name": "stepguard",
                "external-doc-url": "https://github.com/stepguard/stepguard",
                "tags": ["software"],
            }
        ],
        "hooks": [
            {
                "integration-name": "stepguard",
                "python-modules": ["stepguard_airflow.hooks"],
            }
        ],
        "operators": [
            {
                "integration-name": "stepguard",
                "python-modules": [
                    "stepguard_airflow.operators",
                    "stepguard_airflow.operators.kubernetes",
                ],
            }
        ],
        "connection-types": [
            {
                "hook-class-name": "stepguard_airflow.hooks.StepguardHook",
                "hook-name": "stepguard (Vault/OpenBao)",
                "connection-type": "stepguard",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "extra"],
                    "relabeling": {
                        "host": "Vault address (https://vault:8200)",
                        "login": "AppRole role_id",
                        "password": "AppRole secret_id or token",
                    },
                    "placeholders": {
                        "host": "https://vault.example:8200",
                        "auth_method": "approle",
                    },
                },
                "conn-fields": {
                    "auth_method": {
                        "label": "Auth method",
                        "schema": {
                            "type": ["string", "null"],
                            "default": "approle",
                            "enum": ["approle", "token", "kubernetes", "jwt"],
                        },
                        "description": "How the worker authenticates to Vault.",
                    },
                    "auth_mount": {"label": "Auth mount", "schema": {"type": ["string", "null"]}},
                    "role": {
                        "label": "Role (kubernetes/jwt)",
                        "schema": {"type": ["string", "null"]},
                    },
                    "namespace": {"label": "Vault namespace",
                                  "schema": {"type": ["string", "null"]}},
                    "ca_cert": {"label": "CA bundle path", "schema": {"type": ["string", "null"]}},
                    "registry": {
                        "label": "Registry URL (file:///dir or s3://bucket/prefix)",
                        "schema": {"type": ["string", "null"]},
                    },
                },
            }
        ],
        "task-decorators": [
            {"name": "stepguard", "class-name": "stepguard_airflow.decorators.stepguard_task"}
        ],
        "plugins": [
            {"name": "stepguard", "plugin-class": "stepguard_airflow.plugin.StepguardPlugin"}
        ],
        "config": {
            "stepguard": {
                "description": (
                    "Defaults for stepguard secured steps. Values here are overridden by the "
                    "STEPGUARD_* environment and by each operator's arguments."
                ),
                "options": {
                    "conn_id": _opt("Airflow connection holding the Vault address and auth.",
                                    "stepguard_default"),
                    "vault_addr": _opt("Vault/OpenBao address when no connection is used.", "",
                                       example="https://vault.example:8200"),
                    "vault_auth": _opt("Vault auth method: approle, token, kubernetes or jwt.",
                                       "approle"),
                    "settings_file": _opt("A stepguard settings YAML file read by every step.",
                                          "", example="/etc/stepguard/settings.yaml"),
                    "registry": _opt("Default artifact registry for published outputs.", "",
                                     example="file:///srv/registry"),
                    "audit_exporter": _opt("Where spans go: jsonl (the local tamper-evident "
                                           "log), otlp, both or none.", "jsonl"),
                    "audit_path": _opt("The JSON-lines audit log (jsonl/both).", "",
                                       example="/var/log/stepguard/audit.jsonl"),
                    "listener_enabled": _opt("Record an audit span for every task instance.",
                                             "True", kind="boolean"),
                },
            }
        },
    }
