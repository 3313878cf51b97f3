"""A throwaway PostgreSQL cluster on loopback, owned by the dev stack."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stepguard.errors import ServiceError
from stepguard.testing.devstack._info import PostgresInfo
from stepguard.testing.devstack._procs import ProcessTable, log_tail, redact_in_logs

DATABASE = "stepguard"
ADMIN_USER = "postgres"
#: Role Vault's database engine connects as: may create roles, not a superuser.
VAULT_PG_USER = "stepguard_vault"
#: Group role every dynamic user joins; it holds SELECT on public tables.
READERS_ROLE = "stepguard_readers"


@dataclass(frozen=True)
class PgBinaries:
    initdb: Path
    postgres: Path


def find_binaries() -> PgBinaries | None:
    """initdb and postgres from PATH or the Debian layout, or None when not installed."""
    candidates: list[Path] = []
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for directory in candidates:
        i, p = directory / "initdb", directory / "postgres"
        if i.is_file() and p.is_file() and os.access(i, os.X_OK):
            return PgBinaries(i, p)
    return None


def driver_available() -> bool:
    """Whether psycopg2 (used to prepare the cluster) can be imported."""
    import importlib.util

    return importlib.util.find_spec("psycopg2") is not None


def _service_user() -> str | None:
    """initdb refuses root: run the cluster as the ``postgres`` system user then."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise ServiceError(
            "PostgreSQL cannot run as root and there is no 'postgres' system user",
            subject="postgresql",
            hint="install the Debian 'postgresql' package or run without root",
        ) from exc
    return "postgres"


def _run_as(
    argv: list[str], user: str | None, log: Path, *, cwd: Path, stdin: bytes | None = None
) -> int:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as out:
        return subprocess.run(
            argv, input=stdin, stdout=out, stderr=subprocess.STDOUT,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            user=user, group=user, extra_groups=[] if user else None,
            cwd=cwd, timeout=120, check=False,
        ).returncode


def _initdb(bins: PgBinaries, base: Path, user: str | None, password: str, log: Path) -> Path:
    """initdb into ``base/data`` (``base`` must be writable by ``user``)."""
    data_dir = base / "data"
    pwfile = base / "pwfile"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    if user is not None:
        pw = pwd.getpwnam(user)
        os.chown(pwfile, pw.pw_uid, pw.pw_gid)
    try:
        code = _run_as(
            [
                str(bins.initdb), "-D", str(data_dir), "-U", ADMIN_USER,
                "--pwfile", str(pwfile), "--auth=scram-sha-256", "-E", "UTF8",
                "--locale=C", "--no-sync", "--no-instructions",
                # 1 MiB WAL segments instead of 16: a throwaway cluster, copied per stack.
                "--wal-segsize=1",
            ],
            user, log, cwd=base,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ServiceError("initdb failed", subject="postgresql", details=log_tail(log)) from exc
    finally:
        pwfile.unlink(missing_ok=True)
    if code != 0:
        raise ServiceError(
            f"initdb failed (status {code})", subject="postgresql", details=log_tail(log)
        )
    return data_dir


def _scratch_root() -> str | None:
    """tmpfs when there is one: the cluster is throwaway, and memory makes it faster."""
    shm = "/dev/shm"  # noqa: S108 -- a private mkdtemp inside it
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


def _cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "stepguard"


def _template(bins: PgBinaries, user: str | None, log: Path) -> Path:
    """A pristine initdb output for these binaries, built once and cached.

    initdb costs seconds on a busy machine; copying its output costs a fraction of that. The
    template's superuser password is random and discarded: every copy gets its own.
    """
    st = bins.postgres.resolve().stat()
    key = hashlib.sha256(
        f"v2:{bins.postgres.resolve()}:{st.st_size}:{st.st_mtime_ns}:{user}".encode()
    ).hexdigest()[:16]
    cache = _cache_dir()
    template = cache / f"pg-template-{key}"
    if (template / "PG_VERSION").is_file():
        return template
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    work = Path(tempfile.mkdtemp(prefix="stepguard-pgtpl-"))
    staging = cache / f".{template.name}.{secrets.token_hex(4)}"
    try:
        if user is not None:
            pw = pwd.getpwnam(user)
            os.chown(work, pw.pw_uid, pw.pw_gid)
        data = _initdb(bins, work, user, secrets.token_urlsafe(24), log)
        shutil.copytree(data, staging, symlinks=True)
        # Built concurrently by another 'up'? Theirs is as good as ours.
        with contextlib.suppress(OSError):
            os.rename(staging, template)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return template


def _chown_tree(path: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid, follow_symlinks=False)


def _from_template(
    bins: PgBinaries, base: Path, user: str | None, password: str, log: Path
) -> Path:
    template = _template(bins, user, log)
    data_dir = base / "data"
    shutil.copytree(template, data_dir, symlinks=True)
    os.chmod(data_dir, 0o700)
    if user is not None:
        _chown_tree(data_dir, user)
    # Single-user mode sets this cluster's own password before it ever listens; the statement
    # travels on stdin, never on a command line.
    code = _run_as(
        [str(bins.postgres), "--single", "-D", str(data_dir), "postgres"],
        user, log, cwd=base,
        stdin=f"ALTER ROLE {ADMIN_USER} WITH PASSWORD '{password}'\n".encode(),
    )
    if code != 0:
        raise ServiceError(
            f"could not set the PostgreSQL password (status {code})", subject="postgresql",
            details=log_tail(log),
        )
    return data_dir


def prepare_cluster(
    state_dir: Path,
    bins: PgBinaries,
    port: int,
    record_dir: Callable[[Path], None] | None = None,
) -> tuple[PostgresInfo, str | None]:
    """Create a fresh cluster directory; returns the cluster info and the service user.

    ``record_dir`` is told at once about a directory created outside ``state_dir``, so that
    ``down`` removes it even if start-up fails later.
    """
    user = _service_user()
    if user is None:
        base = state_dir / "postgres"
        base.mkdir(mode=0o700)
    else:
        # The state dir may sit under a root-only 0700 tree (pytest's tmp); the service user
        # needs its own directory it can reach.
        base = Path(tempfile.mkdtemp(prefix="stepguard-pg-", dir=_scratch_root()))
        if record_dir is not None:
            record_dir(base)
        pw = pwd.getpwnam(user)
        os.chown(base, pw.pw_uid, pw.pw_gid)
    password = secrets.token_urlsafe(24)
    redact_in_logs(password)
    log = state_dir / "logs" / "initdb.log"
    try:
        data_dir = _from_template(bins, base, user, password, log)
    except (OSError, ServiceError, subprocess.SubprocessError):
        # The cache is an optimisation only: a plain initdb always works.
        shutil.rmtree(base / "data", ignore_errors=True)
        data_dir = _initdb(bins, base, user, password, log)
    socket_dir = base / "run"
    socket_dir.mkdir(mode=0o700)
    if user is not None:
        pw = pwd.getpwnam(user)
        os.chown(socket_dir, pw.pw_uid, pw.pw_gid)
    info = PostgresInfo(
        host="127.0.0.1", port=port, database=DATABASE, admin_user=ADMIN_USER,
        admin_password=password, data_dir=str(data_dir), socket_dir=str(socket_dir),
    )
    return info, user


def start_cluster(
    table: ProcessTable, state_dir: Path, bins: PgBinaries, info: PostgresInfo, user: str | None
) -> None:
    table.start(
        "postgresql",
        [
            str(bins.postgres), "-D", info.data_dir, "-p", str(info.port),
            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={info.socket_dir}",
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=100", "-c", "password_encryption=scram-sha-256",
        ],
        port=info.port,
        log=state_dir / "logs" / "postgresql.log",
        # Unique to this cluster: a recycled pid is never mistaken for it.
        marker=f"-D {info.data_dir} -p {info.port}",
        cwd=Path(info.data_dir).parent,
        user=user,
        # SIGINT is PostgreSQL's "fast" shutdown; TERM would wait for clients to leave.
        stop_signal=signal.SIGINT,
    )


def _connect(info: PostgresInfo, dbname: str) -> object:
    import psycopg2

    return psycopg2.connect(
        host=info.host, port=info.port, dbname=dbname, user=info.admin_user,
        password=info.admin_password, connect_timeout=3, sslmode="disable",
    )


def wait_and_bootstrap(table: ProcessTable, info: PostgresInfo, timeout: float) -> str:
    """Wait until the cluster accepts logins, create the database and roles.

    Returns the generated password of the Vault connection role.
    """
    try:
        import psycopg2
    except ImportError as exc:
        raise ServiceError(
            "psycopg2 is required for the dev PostgreSQL", subject="postgresql",
            hint="pip install 'stepguard[dev]'",
        ) from exc

    def probe() -> bool:
        try:
            conn = _connect(info, "postgres")
        except psycopg2.OperationalError:
            return False
        conn.close()  # type: ignore[attr-defined]
        return True

    table.wait_ready("postgresql", probe, timeout=timeout, what="accepting logins")
    vault_password = secrets.token_urlsafe(24)
    try:
        conn = _connect(info, "postgres")
        conn.autocommit = True  # type: ignore[attr-defined]
        with conn.cursor() as cur:  # type: ignore[attr-defined]
            cur.execute(f"CREATE DATABASE {DATABASE}")
            cur.execute(
                f"CREATE ROLE {VAULT_PG_USER} WITH LOGIN CREATEROLE PASSWORD %s",
                (vault_password,),
            )
            cur.execute(f"CREATE ROLE {READERS_ROLE} NOLOGIN")
            cur.execute(f"GRANT {READERS_ROLE} TO {VAULT_PG_USER} WITH ADMIN OPTION")
            # Lets Vault end a dynamic user's sessions before dropping it.
            cur.execute(f"GRANT pg_signal_backend TO {VAULT_PG_USER}")
        conn.close()  # type: ignore[attr-defined]
        conn = _connect(info, DATABASE)
        conn.autocommit = True  # type: ignore[attr-defined]
        with conn.cursor() as cur:  # type: ignore[attr-defined]
            cur.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            cur.execute(f"GRANT USAGE ON SCHEMA public TO {READERS_ROLE}")
            cur.execute(
                f"ALTER DEFAULT PRIVILEGES FOR ROLE {ADMIN_USER} IN SCHEMA public "
                f"GRANT SELECT ON TABLES TO {READERS_ROLE}"
            )
            cur.execute(
                "CREATE TABLE public.features (id serial PRIMARY KEY, name text NOT NULL)"
            )
            cur.execute("INSERT INTO public.features (name) VALUES ('length'), ('width')")
        conn.close()  # type: ignore[attr-defined]
    except psycopg2.Error as exc:
        raise ServiceError(
            "could not prepare the dev PostgreSQL cluster", subject="postgresql",
            details=(type(exc).__name__, *log_tail(table.procs["postgresql"].log, 5)),
        ) from exc
    return vault_password


def remove_cluster_dir(path: str) -> None:
    """Remove a cluster directory created outside the state dir (retrying briefly)."""
    for _ in range(20):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    shutil.rmtree(path, ignore_errors=True)
