"""Settings strictness, CLI error lines, and the import weight of the core package."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from stepguard.errors import ConfigurationError
from stepguard.settings import Settings

STEPGUARD = [sys.executable, "-m", "stepguard.cli"]


def _run(args, tmp_path, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "STEPGUARD_", "BAO_"))}
    env.update(env_extra or {})
    return subprocess.run(STEPGUARD + args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)


def test_yaml_settings_and_env_override(tmp_path):
    cfg = tmp_path / "sg.yaml"
    cfg.write_text("vault:\n  addr: http://127.0.0.1:1\n  auth: approle\n  role: etl\naudit:\n  exporter: otlp\n")
    s = Settings.load(cfg, environ={"VAULT_ADDR": "http://127.0.0.1:2", "STEPGUARD_VAULT_ROLE": "train"})
    assert (s.vault.addr, s.vault.auth, s.vault.role, s.audit.exporter) == ("http://127.0.0.1:2", "approle", "train", "otlp")


@pytest.mark.parametrize(
    ("yaml_text", "subject"),
    [
        ("vault:\n  adress: http://x\n", "vault.adress"),
        ("vault:\n  timeout_s: soon\n", "vault.timeout_s"),
        ("vault:\n  auth: password\n", "vault.auth"),
        ("audit:\n  exporter: [jsonl]\n", "audit.exporter"),
        ("registry:\n  url: ftp://models\n", "registry.url"),
        ("colour: blue\n", "colour"),
    ],
)
def test_bad_settings_name_the_setting(tmp_path, yaml_text, subject):
    cfg = tmp_path / "sg.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigurationError) as info:
        Settings.load(cfg, environ={})
    assert info.value.subject == subject


def test_unknown_stepguard_env_setting_is_refused():
    with pytest.raises(ConfigurationError) as info:
        Settings.load(None, environ={"STEPGUARD_VAULT_ADRESS": "http://x"})
    assert info.value.subject == "STEPGUARD_VAULT_ADRESS"


def test_cli_bad_settings_is_one_line_not_a_traceback(tmp_path):
    (tmp_path / "stepguard.yaml").write_text("vault:\n  timeout_s: soon\n")
    proc = _run(["config", "check", "--no-probe"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == "stepguard: error: expected a number, got 'soon': vault.timeout_s"
    assert "Traceback" not in proc.stderr


def test_cli_unreachable_vault_is_one_clear_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    proc = _run(["config", "check"], tmp_path, {"VAULT_ADDR": f"http://127.0.0.1:{port}", "STEPGUARD_VAULT_TIMEOUT_S": "2"})
    assert proc.returncode == 5, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith(f"stepguard: error: cannot reach Vault at http://127.0.0.1:{port}")
    assert first.endswith(": vault.addr")
    assert "Traceback" not in proc.stderr


def test_cli_config_show_is_json(tmp_path):
    proc = _run(["config", "show"], tmp_path, {"STEPGUARD_REGISTRY_URL": "s3://models/prod"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["registry"]["url"] == "s3://models/prod"


def test_exec_spec_error_names_the_key(tmp_path):
    spec = tmp_path / "step.yaml"
    spec.write_text("name: train\nisolation:\n  mode: sandbox\n  networ: none\n")
    proc = _run(["exec", "--spec", str(spec), "--", "true"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == "stepguard: error: unknown setting: step.isolation.networ"


HEAVY = ("boto3", "botocore", "hvac", "kubernetes", "model_signing", "kfp", "airflow", "sigstore",
         "opentelemetry.sdk")


def test_import_stepguard_is_light_and_works_without_airflow_or_kfp(tmp_path):
    # airflow and kfp made unimportable: stepguard must still import, and load nothing heavy.
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nclass _B:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('airflow', 'kfp'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, _B())\n"
    )
    code = (
        "import sys, stepguard, stepguard.spec, stepguard.step, stepguard.settings, stepguard.receipt\n"
        "import stepguard.errors\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(heavy))\n"
        "try:\n    import airflow\nexcept ImportError:\n    print('airflow-blocked')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(blocker))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "", f"heavy modules imported: {lines[0]}"
    assert lines[1] == "airflow-blocked"


def test_every_cli_command_group_is_present():
    import importlib

    from stepguard import cli

    for module in cli._CORE_GROUPS.values():
        assert callable(importlib.import_module(module).register), module
    added = {ep.name: ep for ep in cli._entry_points(cli._GROUPS_ENTRY_POINT)}
    assert {"lint", "dev"} <= set(added)
    for name, ep in added.items():
        assert callable(ep.load()), name
