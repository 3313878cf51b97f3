"""``stepguard lint`` rules beyond the basics: constants, S3 operators, privileged contexts,
secret flows, token-bearing URLs -- and no findings on secret names, paths and Vault paths."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from stepguard_airflow.lint import RULES, lint_source

CANARY = "Zq9-canary-Pw-71x-0000"


def _rules(source: str) -> list[tuple[str, int]]:
    return [(f.rule, f.line) for f in lint_source(textwrap.dedent(source), "dag.py")]


def _line(source: str, text: str) -> int:
    lines = textwrap.dedent(source).splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


def test_image_tag_in_a_module_constant_is_found():
    src = '''
        from stepguard_airflow.operators.kubernetes import SecureKubernetesPodOperator
        REGISTRY = "registry.example/ml"
        IMAGE = "python:3.11"
        TRAIN = f"{REGISTRY}/train:latest"
        PINNED = REGISTRY + "/train@sha256:''' + "ab" * 32 + '''"
        a = SecureKubernetesPodOperator(task_id="a", image=IMAGE)
        b = SecureKubernetesPodOperator(task_id="b", image=TRAIN)
        c = SecureKubernetesPodOperator(task_id="c", image=PINNED)
    '''
    got = _rules(src)
    assert ("SG003", _line(src, "task_id=\"a\"")) in got
    assert ("SG003", _line(src, "task_id=\"b\"")) in got
    assert ("SG003", _line(src, "task_id=\"c\"")) not in got
    assert [f.message for f in lint_source(textwrap.dedent(src)) if f.rule == "SG003"][1] \
        .startswith("image not pinned by digest: registry.example/ml/train:latest")


AMAZON_S3 = [
    ("airflow.providers.amazon.aws.transfers.local_to_s3", "LocalFilesystemToS3Operator"),
    ("airflow.providers.amazon.aws.transfers.sql_to_s3", "SqlToS3Operator"),
    ("airflow.providers.amazon.aws.transfers.s3_to_sftp", "S3ToSFTPOperator"),
    ("airflow.providers.amazon.aws.transfers.http_to_s3", "HttpToS3Operator"),
    ("airflow.providers.amazon.aws.operators.s3", "S3CopyObjectOperator"),
    ("airflow.providers.amazon.aws.operators.s3", "S3CopyPrefixOperator"),
    ("airflow.providers.amazon.aws.operators.s3", "S3CreateObjectOperator"),
    ("airflow.providers.amazon.aws.operators.s3", "S3FileTransformOperator"),
]


def test_every_amazon_s3_transfer_copy_create_operator_is_known():
    """The list is checked against the installed provider's source: no S3 transfer, copy or
    create-object operator is missed (bucket management moves no data and is not listed)."""
    import ast
    import importlib.util
    from pathlib import Path

    from stepguard_airflow.lint import COUNTERPARTS

    spec = importlib.util.find_spec("airflow.providers.amazon.aws")
    assert spec and spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations)))
    found = set()
    for path in [*sorted((root / "transfers").glob("*s3*.py")), root / "operators" / "s3.py"]:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Operator") and \
                    "S3" in node.name and (path.parent.name == "transfers" or
                                           node.name.startswith(("S3Copy", "S3CreateObject"))):
                found.add(node.name)
    assert len(found) >= 20
    assert found <= set(COUNTERPARTS), sorted(found - set(COUNTERPARTS))


@pytest.mark.parametrize("module, name", AMAZON_S3)
def test_amazon_s3_operators_are_sg001(module, name):
    src = f'''
        from {module} import {name}
        t = {name}(task_id="t")
    '''
    assert ("SG001", _line(src, "task_id")) in _rules(src)


def test_privileged_and_host_settings_in_security_contexts():
    src = '''
        from kubernetes.client import models as k8s
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from stepguard_airflow.operators.kubernetes import SecureKubernetesPodOperator
        CTX = {"runAsNonRoot": True, "allowPrivilegeEscalation": True}
        a = KubernetesPodOperator(task_id="a", image="x@sha256:''' + "ab" * 32 + '''",
            container_security_context={"privileged": True})
        b = KubernetesPodOperator(task_id="b", image="x@sha256:''' + "ab" * 32 + '''",
            security_context={"runAsUser": 0}, hostnetwork=True)
        c = SecureKubernetesPodOperator(task_id="c", container_security_context=CTX)
        d = k8s.V1SecurityContext(privileged=True,
                                  capabilities=k8s.V1Capabilities(add=["SYS_ADMIN"]))
        e = k8s.V1PodSpec(host_pid=True, containers=[])
        ok = KubernetesPodOperator(task_id="ok", image="x@sha256:''' + "ab" * 32 + '''",
            security_context={"runAsNonRoot": True, "runAsUser": 1000},
            container_security_context={"privileged": False,
                                        "allowPrivilegeEscalation": False,
                                        "capabilities": {"drop": ["ALL"]}})
    '''
    got = [(r, line) for r, line in _rules(src) if r == "SG002"]
    assert ("SG002", _line(src, '"privileged": True')) in got
    assert ("SG002", _line(src, "runAsUser\": 0")) in got
    assert ("SG002", _line(src, "b = KubernetesPodOperator")) in got  # hostnetwork=True
    assert ("SG002", _line(src, "c = SecureKubernetesPodOperator")) in got  # via CTX
    assert ("SG002", _line(src, "V1SecurityContext(privileged=True")) in got
    assert ("SG002", _line(src, 'add=["SYS_ADMIN"]')) in got
    assert ("SG002", _line(src, "host_pid=True")) in got
    ok_lines = range(_line(src, "ok = KubernetesPodOperator"), _line(src, '"capabilities"') + 1)
    assert not [line for _r, line in got if line in ok_lines], got


def test_secrets_flowing_into_xcom_and_pod_env():
    src = '''
        from airflow.sdk import task, Variable, BaseHook
        from airflow.providers.hashicorp.hooks.vault import VaultHook
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from kubernetes.client import models as k8s

        @task
        def db_login():
            conn = BaseHook.get_connection("warehouse")
            return {"user": conn.login, "password": conn.password}

        @task
        def api_key():
            return Variable.get("openai_api_key")

        @task
        def from_vault():
            secret = VaultHook(vault_conn_id="vault").get_secret(secret_path="ml/db")
            return secret["password"]

        def push(ti):
            token = BaseHook.get_connection("slack").get_password()
            ti.xcom_push(key="t", value=token)

        pod = KubernetesPodOperator(task_id="pod", image="x@sha256:''' + "ab" * 32 + '''",
            security_context={"runAsNonRoot": True},
            env_vars={"DB_PASSWORD": "{{ conn.warehouse.password }}",
                      "API_KEY": "{{ var.value.openai_api_key }}",
                      "DB_TOKEN": "{{ ti.xcom_pull(task_ids='db_login') }}"})
        env = k8s.V1EnvVar(name="PW", value="{{ conn.db.password }}")
    '''
    got = [(r, line) for r, line in _rules(src) if r == "SG005"]
    for text in ('return {"user": conn.login', 'return Variable.get("openai_api_key")',
                 'return secret["password"]', "ti.xcom_push", "conn.warehouse.password",
                 "var.value.openai_api_key", "xcom_pull(task_ids=", "conn.db.password"):
        assert ("SG005", _line(src, text)) in got, (text, got)


def test_no_findings_on_secret_names_paths_and_vault_paths():
    """Names, paths and Vault paths of secrets, and non-secret connection fields, are clean."""
    src = '''
        from airflow.sdk import task, Variable, BaseHook
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from stepguard_airflow.operators import SecureStepOperator

        DB_PASSWORD_PATH = "secret/data/ml/db"
        TOKEN_FILE = "/var/run/secrets/tokens/vault"
        VAULT_SECRET = "kv/data/train/api"
        PASSWORD_NAME = "db-password"
        SECRET = "database/creds/train"
        API_TOKEN = "vault:secret/data/slack#token"
        config = {"secret": "kv/data/train/api", "password": "db_password",
                  "token_path": "/run/secrets/token", "credentials": "secret/data/aws/ml"}

        @task
        def settings():
            conn = BaseHook.get_connection("warehouse")
            bucket = Variable.get("model_bucket")
            path = Variable.get("db_password_path")
            return {"host": conn.host, "login": conn.login, "bucket": bucket, "path": path,
                    "length": len(conn.password)}

        pod = KubernetesPodOperator(task_id="pod", image="x@sha256:''' + "ab" * 32 + '''",
            security_context={"runAsNonRoot": True},
            env_vars={"DB_PASSWORD_FILE": "/vault/secrets/db-password",
                      "VAULT_SECRET_PATH": "secret/data/ml/db",
                      "BUCKET": "{{ var.value.model_bucket }}",
                      "RUN": "{{ ti.xcom_pull(task_ids='settings') }}"})
        notify = "https://hooks.example.com/notify?channel=ml-alerts"
        docs = "https://api.example.com/v1/models?page=2&key={{ var.value.key_name }}"
    '''
    found = lint_source(textwrap.dedent(src), "dag.py")
    assert [f for f in found if f.rule in ("SG004", "SG005")] == []


def test_secret_with_slashes_is_not_taken_for_a_path():
    src = '''
        aws_secret_access_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
        vault_secret = "secret/data/ml/aws"
    '''
    assert _rules(src) == [("SG004", 2)]


def test_token_bearing_urls_are_secrets():
    slack = "https://hooks.slack.com/services/T0000AAAA/B0000BBBB/" + "x" * 24
    src = f'''
        ALERTS = "{slack}"
        DISCORD = "https://discord.com/api/webhooks/123456789/{"y" * 40}"
        FEED = "https://api.example.com/v1/feed?token={CANARY}"
        SAS = "https://acct.blob.core.windows.net/c/f?sv=2024&sig={CANARY}"
    '''
    got = lint_source(textwrap.dedent(src), "dag.py")
    assert sorted(f.line for f in got if f.rule == "SG004") == [2, 3, 4, 5]
    text = "\n".join(str(f) for f in got)
    assert CANARY not in text and "x" * 24 not in text


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stepguard.cli", "lint", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_sarif_output_for_code_scanning(tmp_path, monkeypatch):
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "a.py").write_text(f'IMAGE = "python:3.11"\npassword = "{CANARY}"\n'
                               'from x import KubernetesPodOperator\n'
                               'KubernetesPodOperator(task_id="t", image=IMAGE,'
                               ' security_context={})\n')
    monkeypatch.chdir(tmp_path)
    r = _cli("--sarif", "dags")
    assert r.returncode == 1, r.stderr
    assert CANARY not in r.stdout
    log = json.loads(r.stdout)
    assert log["version"] == "2.1.0" and log["$schema"].endswith("sarif-2.1.0.json")
    run = log["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    assert [rule["id"] for rule in rules] == sorted(RULES)
    results = {(res["ruleId"], res["locations"][0]["physicalLocation"]["region"]["startLine"])
               for res in run["results"]}
    assert ("SG003", 4) in results and ("SG004", 2) in results
    for res in run["results"]:
        assert rules[res["ruleIndex"]]["id"] == res["ruleId"]
        loc = res["locations"][0]["physicalLocation"]["artifactLocation"]
        assert loc == {"uri": "dags/a.py", "uriBaseId": "%SRCROOT%"}
    r = _cli("--json", "dags")
    data = json.loads(r.stdout)
    assert data["count"] == len(run["results"])
    assert {f["rule"] for f in data["findings"]} == {res["ruleId"] for res in run["results"]}
