"""The chain-of-custody UI in a real browser: Debian's headless ``chromium`` against a real
``airflow api-server`` serving the metadata DB of a real run of the secured example.

The example DAG runs once (``dag.test()`` on the dev stack); two api-servers then read its
metadata DB: one with the simple auth manager's ``all_admins`` (no login, as a private instance)
for the browser, one that requires a login, for the auth tests. Screenshots go to the test's
tmp dir; with ``STEPGUARD_UI_SCREENSHOTS=<dir>`` (e.g. ``docs/img``) a copy goes there too.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stepguard_airflow._ui._chain import receipt_digest

pytestmark = [pytest.mark.airflow, pytest.mark.services, pytest.mark.sandbox, pytest.mark.slow,
              pytest.mark.browser]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "dags_examples" / "secure_training.py"
TASKS = ("ingest", "verify_dataset", "train", "sign_and_publish", "gate", "deploy")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars")
VIEWER_PASSWORD = "stepguard-ui-test-viewer"  # a throwaway login of a loopback test server


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """Headless chromium, one process per page, a private profile."""

    def __init__(self, exe: str, tmp: Path) -> None:
        self.exe, self.tmp = exe, tmp

    def _argv(self, *extra: str) -> list[str]:
        return [self.exe, *CHROMIUM_FLAGS, f"--user-data-dir={self.tmp / 'profile'}", *extra]

    def dom(self, url: str, *, budget_ms: int | None = None) -> str:
        extra = [f"--virtual-time-budget={budget_ms}"] if budget_ms else []
        r = subprocess.run(self._argv(*extra, "--dump-dom", url), capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    def screenshot(self, url: str, name: str, *, size: str = "1500,1000",
                   budget_ms: int | None = None) -> Path:
        path = self.tmp / name
        extra = [f"--virtual-time-budget={budget_ms}"] if budget_ms else []
        r = subprocess.run(self._argv(*extra, f"--window-size={size}", f"--screenshot={path}",
                                      url), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and path.is_file(), r.stderr[-2000:]
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if out := os.environ.get("STEPGUARD_UI_SCREENSHOTS"):
            dest = Path(out) if Path(out).is_absolute() else REPO / out
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / name)
        return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Browser:
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    tmp = tmp_path_factory.mktemp("browser")
    b = Browser(exe, tmp)
    try:
        dom = b.dom("data:text/html,<p id=probe>ok</p>")
    except (OSError, subprocess.SubprocessError, AssertionError) as exc:
        pytest.skip(f"chromium cannot run here: {str(exc)[-300:]}")
    if 'id="probe"' not in dom:
        pytest.skip("chromium runs but renders nothing here")
    return b


@pytest.fixture(scope="module")
def example_run(airflow_db: Path, dev_stack: Any,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The secured example, run once through ``dag.test()``; its run id and receipts."""
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed")
    pg = dev_stack.postgres
    if pg is None:
        pytest.skip("PostgreSQL not installed; the example reads from it")
    from stepguard.testing.examples import seed_customers

    seed_customers(host=pg.host, port=pg.port, dbname=pg.database, user=pg.admin_user,
                   password=pg.admin_password)
    root = tmp_path_factory.mktemp("ui-example")
    cfg = root / "stepguard.yaml"
    cfg.write_text(f"""
vault: {{addr: "{dev_stack.vault_addr}", auth: approle}}
registry: {{url: "file://{root / 'registry'}"}}
policies:
  release: {{kind: transit, key: stepguard-signing, min_version: 1}}
""")
    with pytest.MonkeyPatch.context() as mp:
        for var in list(os.environ):
            if var.startswith("STEPGUARD_") or var in ("VAULT_ADDR", "VAULT_TOKEN", "BAO_ADDR"):
                mp.delenv(var, raising=False)
        mp.setenv("STEPGUARD_STATE_DIR", str(root / "state"))
        mp.setenv("STEPGUARD_AUDIT_EXPORTER", "jsonl")
        mp.setenv("STEPGUARD_AUDIT_PATH", str(root / "audit.jsonl"))
        mp.setenv("STEPGUARD_CONFIG", str(cfg))
        mp.setenv("VAULT_ADDR", dev_stack.vault_addr)
        mp.setenv("VAULT_ROLE_ID", dev_stack.approle_role_id)
        mp.setenv("VAULT_SECRET_ID_FILE", str(dev_stack.approle_secret_id_file))
        mp.setenv("STEPGUARD_SERVING_DIR", str(root / "serving"))
        mp.setenv("AIRFLOW_CONN_CHURN_DB", f"postgresql://{pg.host}:{pg.port}/{pg.database}")
        mp.chdir(root)
        module = _load_example(airflow_db)
        dr = module.secure_training.test()
        receipts = {t: xcom(dr, t) for t in TASKS}
        gate = xcom(dr, "gate", "gate")
    assert all(receipts.values()), {t: bool(r) for t, r in receipts.items()}
    yield {"dag_id": dr.dag_id, "run_id": dr.run_id, "receipts": receipts, "gate": gate}


def _load_example(home: Path) -> Any:
    """The example, as tests/plugins/test_example_dag.py loads it (same file in the session's
    dags folder: ``dag.test()`` parses that bundle, and one DAG id lives in one file)."""
    import importlib.util

    path = home / "dags" / "secure_training_example.py"
    path.write_text(EXAMPLE.read_text())
    spec = importlib.util.spec_from_file_location("dagfile_secure_training_ui", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def xcom(dag_run: Any, task_id: str, key: str = "return_value") -> Any:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        row = session.scalars(select(XComModel).where(
            XComModel.dag_id == dag_run.dag_id, XComModel.run_id == dag_run.run_id,
            XComModel.task_id == task_id, XComModel.key == key)).first()
        return None if row is None else XComModel.deserialize_value(row)


def _start_api_server(home: Path, tmp: Path, name: str, *, all_admins: bool) -> Any:
    from stepguard.testing.devstack import ProcessTable, free_port, http_responds

    port = free_port()
    state = tmp / name
    state.mkdir()
    passwords = state / "passwords.json"
    passwords.write_text(json.dumps({"viewer": VIEWER_PASSWORD}))
    env = {k: v for k, v in os.environ.items() if k != "AIRFLOW__CORE__UNIT_TEST_MODE"}
    env |= {
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": str(all_admins),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "viewer:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__API__SECRET_KEY": os.urandom(16).hex(),
        "AIRFLOW__API_AUTH__JWT_SECRET": os.urandom(16).hex(),
        "AIRFLOW__API__EXPOSE_CONFIG": "False",
    }
    table = ProcessTable(state)
    table.start(name, [sys.executable, "-m", "airflow", "api-server", "--host", "127.0.0.1",
                       "--port", str(port), "--workers", "1"],
                port=port, log=state / "api-server.log", marker=str(port), env=env, cwd=home)
    url = f"http://127.0.0.1:{port}"
    try:
        table.wait_ready(name, http_responds(f"{url}/api/v2/version", ok_only=True),
                         timeout=180, what="answering")
    except BaseException:
        table.stop_all()
        raise
    return table, url, state / "api-server.log"


@pytest.fixture(scope="module")
def servers(example_run: dict[str, Any], airflow_db: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An ``all_admins`` api-server (for the browser) and one that requires a login."""
    tmp = tmp_path_factory.mktemp("api-servers")
    started = []
    try:
        for name, admins in (("open", True), ("login", False)):
            started.append(_start_api_server(airflow_db, tmp, name, all_admins=admins))
        yield {"open": started[0][1], "login": started[1][1],
               "logs": [s[2] for s in started]}
    finally:
        for table, _, _ in started:
            table.stop_all()


def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _run_path(run: dict[str, Any]) -> str:
    return f"/stepguard/dags/{_q(run['dag_id'])}/runs/{_q(run['run_id'])}"


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                 if token else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _attrs(dom: str, tag: str, attr: str) -> list[str]:
    return [html.unescape(m) for m in re.findall(rf'<{tag}\b[^>]*\b{attr}="([^"]*)"', dom)]


def test_plugin_is_listed_with_its_app_views_and_link(servers):
    status, body = _get(f"{servers['open']}/api/v2/plugins")
    assert status == 200, body
    [plugin] = [p for p in json.loads(body)["plugins"] if p["name"] == "stepguard"]
    assert [a["url_prefix"] for a in plugin["fastapi_apps"]] == ["/stepguard"]
    assert {v["destination"] for v in plugin["external_views"]} == {"nav", "dag_run",
                                                                    "task_instance"}
    assert plugin["operator_extra_links"] == [
        "<stepguard_airflow._ui.ReceiptLink object>"]
    assert plugin["listeners"] == ["stepguard_airflow.listener"]


def test_chain_view_in_chromium(servers, example_run, browser):
    run, receipts = example_run, example_run["receipts"]
    url = servers["open"] + _run_path(run)
    dom = browser.dom(url)
    # every secured task is a node, each with its status
    assert set(_attrs(dom, "g", "data-task")) >= set(TASKS)
    for task in TASKS:
        assert f'data-task="{task}" data-status="succeeded" data-secured="true"' in dom
    # edges: producer output -> consumer input, by the digest the consumer verified
    dataset = receipts["ingest"]["outputs"][0]["digest"]
    model = receipts["sign_and_publish"]["outputs"][0]["digest"]
    edges = set(re.findall(r'<g class="edge" data-producer="([^"]+)" data-consumer="([^"]+)" '
                           r'data-digest="([^"]+)"', dom))
    assert ("ingest", "verify_dataset", dataset) in edges
    assert ("sign_and_publish", "gate", model) in edges
    assert ("gate", "deploy", receipts["gate"]["outputs"][0]["digest"]) in edges
    # the checks' verdicts, with the signer and the gate's policy
    signer = receipts["sign_and_publish"]["outputs"][0]["published"]["signer"]
    assert signer.startswith("transit:")
    assert re.search(r'<tr class="check-row" data-check="gate" data-verdict="pass">.*?'
                     rf"policy release: accepted signer {re.escape(signer)}", dom)
    assert f"signed by {signer}" in dom
    assert re.search(r'data-check="credentials" data-verdict="pass">.*?1 issued, 1 revoked', dom)
    assert re.search(r'data-check="isolation" data-verdict="pass">.*?sandbox', dom)
    assert 'data-verdict="fail"' not in dom
    # no editing surface
    assert not re.search(r"<(form|input|textarea|button|script)\b", dom)
    shot = browser.screenshot(url, "airflow-ui-chain.png", size="1720,1250")
    assert shot.stat().st_size > 20_000


def test_receipt_view_and_extra_link_in_chromium(servers, example_run, browser):
    run, receipts = example_run, example_run["receipts"]
    links = {}
    for task in TASKS:  # every secured operator of the example has the link
        status, body = _get(f"{servers['open']}/api/v2/dags/{_q(run['dag_id'])}/dagRuns/"
                            f"{_q(run['run_id'])}/taskInstances/{task}/links")
        assert status == 200, body
        links[task] = json.loads(body)["extra_links"].get("stepguard receipt")
    assert links == {t: f"{_run_path(run)}/tasks/{t}" for t in TASKS}
    link = links["sign_and_publish"]
    dom = browser.dom(servers["open"] + link)
    pub = receipts["sign_and_publish"]
    out = pub["outputs"][0]
    assert f'<td data-field="receipt digest"><span class="digest">{receipt_digest(pub)}' in dom
    assert out["digest"] in dom and out["published"]["bundle_digest"] in dom
    assert out["published"]["signer"] in dom
    assert pub["inputs"][0]["digest"] in dom and pub["trace_id"] in dom
    # the whole document, read-only, parses back to the XCom value
    [doc] = re.findall(r'<pre class="json" id="receipt-json">(.*?)</pre>', dom, re.S)
    assert json.loads(html.unescape(doc)) == pub
    assert not re.search(r"<(form|input|textarea|button|script)\b", dom)
    browser.screenshot(servers["open"] + link, "airflow-ui-receipt.png", size="1300,1400")
    # the ingest task's credential, by its hashed lease id, revoked
    dom = browser.dom(servers["open"] + f"{_run_path(run)}/tasks/ingest")
    lease = receipts["ingest"]["credentials"][0]
    assert lease["lease"].startswith("sha256:") and lease["lease"] in dom
    assert re.search(r'<td data-field="revoked">yes</td>', dom)


def test_the_airflow_ui_shows_the_view_as_a_dag_run_tab(servers, example_run, browser):
    run = example_run
    page = (f"{servers['open']}/dags/{_q(run['dag_id'])}/runs/{_q(run['run_id'])}"
            "/plugin/stepguard-run")
    dom = browser.dom(page, budget_ms=15000)
    srcs = _attrs(dom, "iframe", "src")
    assert any(s.startswith("stepguard/dags/") and s.endswith(_q(run["run_id"]))
               for s in srcs), srcs or dom[-1500:]
    browser.screenshot(page, "airflow-ui-dag-run-tab.png", size="1500,1000", budget_ms=15000)


def test_receipts_are_not_served_without_a_login(servers, example_run, browser):
    base, run = servers["login"], example_run
    paths = ["/stepguard/", _run_path(run), f"{_run_path(run)}/tasks/sign_and_publish"]
    digest = run["receipts"]["sign_and_publish"]["outputs"][0]["digest"]
    for path in paths:
        status, body = _get(base + path)
        assert status == 401, (path, status)
        assert digest not in body and "sign_and_publish" not in body
        status, _ = _get(base + path, token="not-a-token")
        assert status in (401, 403)
    dom = browser.dom(base + _run_path(run))
    assert "Not authenticated" in dom and digest not in dom and "data-task" not in dom
    # with a login, the same pages are served
    req = urllib.request.Request(f"{base}/auth/token", method="POST", headers={
        "Content-Type": "application/json"}, data=json.dumps(
        {"username": "viewer", "password": VIEWER_PASSWORD}).encode())
    with urllib.request.urlopen(req, timeout=60) as resp:
        token = json.loads(resp.read())["access_token"]
    status, body = _get(base + paths[2], token)
    assert status == 200 and digest in body
    status, body = _get(base + paths[0], token)
    assert status == 200 and html.escape(run["run_id"]) in body
