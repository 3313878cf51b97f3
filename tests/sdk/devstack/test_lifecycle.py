"""dev up / down lifecycle: nothing left behind, no duplicates, clean failure."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stepguard.errors import ConfigurationError, ServiceError
from stepguard.testing import devstack
from stepguard.testing.devstack._procs import free_port

pytestmark = pytest.mark.services

def run_cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real entry point (``stepguard ...``), in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "stepguard.cli", *argv], capture_output=True, text=True,
        timeout=timeout,
    )


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


def live(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and live(int(entry.name)):
            found.append(int(entry.name))
    return found


@pytest.fixture
def need_bao() -> None:
    if devstack.find_bao() is None:
        pytest.skip("OpenBao 'bao' binary not available")


def test_cli_up_survives_cli_exit_and_down_leaves_nothing(tmp_path: Path, need_bao: None) -> None:
    state = tmp_path / "dev"
    result = run_cli("dev", "up", "--no-postgres", "--json", "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    pids, ports = summary["pids"], summary["ports"]
    assert set(pids) == {"moto", "openbao"} and summary["postgres"] is None
    try:
        # The CLI process has exited; the services it started keep running.
        assert all(live(pid) for pid in pids.values())
        assert not any(refused(port) for port in ports.values())
        env_file = Path(summary["env_file"])
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        env = devstack.load_env(state)
        for secret in (env["VAULT_TOKEN"], env["AWS_SECRET_ACCESS_KEY"]):
            assert secret not in result.stdout and secret not in result.stderr
        shown = run_cli("dev", "status", "--state-dir", str(state))
        assert shown.returncode == 0 and summary["vault_addr"] in shown.stdout
        assert run_cli("dev", "env", "--state-dir", str(state)).stdout.strip() == str(env_file)
        again = run_cli("dev", "up", "--no-postgres", "--state-dir", str(state))
        assert again.returncode == 2
        assert again.stderr.startswith("stepguard: error: a dev stack is already running")
        assert json.loads(run_cli("dev", "status", "--json", "--state-dir", str(state)).stdout)[
            "pids"
        ] == pids  # no duplicate was started
    finally:
        down = run_cli("dev", "down", "--state-dir", str(state))
    assert down.returncode == 0, down.stderr
    assert not any(live(pid) for pid in pids.values())
    assert all(refused(port) for port in ports.values())
    assert not state.exists()
    gone = run_cli("dev", "status", "--state-dir", str(state))
    assert gone.returncode == 1 and "no dev stack" in gone.stdout


def test_api_up_down_with_postgres_leaves_nothing(tmp_path: Path, need_bao: None) -> None:
    state = tmp_path / "dev"
    info = devstack.up(state, owner_pid=os.getpid())
    watchdog = int((state / "watchdog.pid").read_text())
    assert live(watchdog)
    try:
        assert devstack.status(state) == info
        extra = [Path(d) for d in info.extra_dirs]
        assert all(d.is_dir() for d in extra)
        if info.postgres is not None:
            assert set(info.pids) == {"moto", "openbao", "postgresql"}
        # One service dies: status says so, up still refuses, down still cleans everything.
        os.kill(info.pids["moto"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while live(info.pids["moto"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(ServiceError, match="not fully running") as caught:
            devstack.status(state)
        assert "down: moto" in caught.value.details
        with pytest.raises(ConfigurationError, match="already running"):
            devstack.up(state)
    finally:
        devstack.down(state)
    assert not any(live(pid) for pid in info.pids.values())
    assert all(refused(port) for port in info.ports.values())
    if info.postgres is not None:
        assert not processes_mentioning(f"-p {info.postgres.port}")
    assert not any(Path(d).exists() for d in info.extra_dirs)
    assert not live(watchdog)  # down() stops the watchdog too
    assert not processes_mentioning(str(state))
    assert not state.exists()
    assert devstack.status(state) is None
    devstack.down(state)  # idempotent
    # Every child's exit status was collected: no zombie, no Popen left to warn at exit.
    from stepguard.testing.devstack import _procs

    assert not set(_procs._CHILDREN) & {*info.pids.values(), watchdog}


def test_stack_stops_when_its_owner_dies(tmp_path: Path, need_bao: None) -> None:
    """A killed test session (no teardown) must not leave its services running."""
    state = tmp_path / "dev"
    code = textwrap.dedent(
        f"""
        import json, os, signal
        from stepguard.testing import devstack
        info = devstack.up({str(state)!r}, postgres=False, owner_pid=os.getpid())
        print(json.dumps({{"pids": info.pids, "ports": info.ports}}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no teardown, no atexit
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    started = json.loads(proc.stdout)
    deadline = time.monotonic() + 30
    while state.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not state.exists()
    assert not any(live(pid) for pid in started["pids"].values())
    assert all(refused(port) for port in started["ports"].values())
    # The watchdog itself exits right after its down().
    while processes_mentioning(str(state)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_mentioning(str(state))


def test_second_up_on_running_stack_refused(dev_stack: devstack.DevStackInfo) -> None:
    with pytest.raises(ConfigurationError, match="already running") as caught:
        devstack.up(dev_stack.state_dir)
    assert caught.value.hint and "dev down" in caught.value.hint
    assert devstack.status(dev_stack.state_dir) == dev_stack


def _assert_nothing_left(state: Path, ports: dict[str, int]) -> None:
    for name, port in ports.items():
        assert refused(port), name
        assert not processes_mentioning(f"-p {port}"), name
        assert not processes_mentioning(f"127.0.0.1:{port}"), name
    assert not (state / "processes.json").exists()
    assert not (state / "state.json").exists()
    assert devstack.status(state) is None


def test_port_taken_stops_what_started(tmp_path: Path, need_bao: None) -> None:
    state = tmp_path / "dev"
    ports = {"moto": free_port(), "postgresql": free_port()}
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        with pytest.raises(ServiceError) as caught:
            devstack.up(state, ports={**ports, "vault": taken}, timeout=30)
    err = caught.value
    assert err.subject == "openbao"
    assert any("address already in use" in d for d in err.details), err.details
    assert err.hint and str(state / "logs") in err.hint
    assert "address already in use" in (state / "logs" / "openbao.log").read_text()
    _assert_nothing_left(state, ports)


def test_bad_binary_stops_what_started(tmp_path: Path, need_bao: None) -> None:
    state = tmp_path / "dev"
    ports = {"moto": free_port(), "postgresql": free_port(), "vault": free_port()}
    with pytest.raises(ServiceError, match="could not start openbao"):
        devstack.up(state, bao_path=tmp_path / "no-such-bao", ports=ports, postgres=False)
    _assert_nothing_left(state, ports)


def test_failing_service_log_tail_never_shows_secrets(tmp_path: Path, need_bao: None) -> None:
    fake = tmp_path / "bao"
    fake.write_text(
        "#!/bin/sh\n"
        'echo "Root Token: canary-root-0123456789"\n'
        'echo "token=$BAO_DEV_ROOT_TOKEN_ID"\n'
        'echo "using $BAO_DEV_ROOT_TOKEN_ID now"\n'
        "echo 'boom: cannot serve'\nexit 3\n"
    )
    fake.chmod(0o755)
    ports = {"moto": free_port(), "vault": free_port()}
    with pytest.raises(ServiceError) as caught:
        devstack.up(tmp_path / "dev", bao_path=fake, ports=ports, postgres=False)
    err = caught.value
    text = err.diagnostics()
    assert "boom: cannot serve" in text and "status 3" in text
    assert "canary-root" not in text
    # The generated root token (48 hex chars) is passed by environment and redacted.
    assert "using [redacted] now" in text
    _assert_nothing_left(tmp_path / "dev", ports)


def test_unknown_port_name_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="unknown service"):
        devstack.up(tmp_path / "dev", ports={"redis": 1234})


def test_load_env_without_stack(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="no dev stack env file"):
        devstack.load_env(tmp_path)


def test_state_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STEPGUARD_DEV_DIR", str(tmp_path / "x"))
    assert devstack.resolve_state_dir() == tmp_path / "x"
    monkeypatch.delenv("STEPGUARD_DEV_DIR")
    monkeypatch.chdir(tmp_path)
    assert devstack.resolve_state_dir() == tmp_path / ".stepguard" / "dev"
