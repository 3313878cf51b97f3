"""A throwaway PostgreSQL cluster on loopback, owned by the dev stack."""

from __future__ import annotations

import glob
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

from stepguard.devstack._info import PostgresInfo
from stepguard.devstack._procs import ProcessTable, log_tail
from stepguard.errors import ServiceError

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


def prepare_cluster(
    state_dir: Path,
    bins: PgBinaries,
    port: int,
    record_dir: Callable[[Path], None] | None = None,
) -> tuple[PostgresInfo, str | None]:
    """Run initdb into a fresh directory; returns the cluster info and the service user.

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
        base = Path(tempfile.mkdtemp(prefix="stepguard-pg-"))
        if record_dir is not None:
            record_dir(base)
        pw = pwd.getpwnam(user)
        os.chown(base, pw.pw_uid, pw.pw_gid)
    data_dir, socket_dir = base / "data", base / "run"
    password = secrets.token_urlsafe(24)
    pwfile = base / "pwfile"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    if user is not None:
        pw = pwd.getpwnam(user)
        os.chown(pwfile, pw.pw_uid, pw.pw_gid)
    log = state_dir / "logs" / "initdb.log"
    try:
        with open(log, "wb") as out:
            result = subprocess.run(
                [
                    str(bins.initdb), "-D", str(data_dir), "-U", ADMIN_USER,
                    "--pwfile", str(pwfile), "--auth=scram-sha-256", "-E", "UTF8",
                    "--locale=C", "--no-sync", "--no-instructions",
                ],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                user=user, group=user, extra_groups=[] if user else None,
                cwd=base, timeout=120, check=False,
            )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ServiceError(
            "initdb failed", subject="postgresql", details=log_tail(log)
        ) from exc
    finally:
        pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        raise ServiceError(
            f"initdb failed (status {result.returncode})", subject="postgresql",
            details=log_tail(log),
        )
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
        marker="postgres",
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
            hint="install stepguard[dev]",
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
