"""The per-step credential session: one child token, every lease under it, revoked on exit.

:func:`open_session` logs in, creates the step's child token, mints each requested credential
under it (:mod:`._kinds`) into the session's :class:`~stepguard.credentials.CredentialSet`
(delivery: mapping, env, files -- :mod:`._set`), records one
:class:`~stepguard.receipt.LeaseRecord` per credential, and has the process's renewal thread
(:mod:`._renewal`) keep token and leases alive until the step ends. On every exit path --
success, exception, SIGTERM, :func:`revoke_open_sessions` -- it removes written files, revokes
each revocable lease, then the token.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepguard._private.signals import unwind_on
from stepguard.credentials._renewal import RENEWALS
from stepguard.credentials._secret import SecretMapping, guard, hashed_id
from stepguard.credentials._set import CredentialSet, env_prefix, filesystem_type
from stepguard.errors import (
    ConfigurationError,
    CredentialDenied,
    CredentialError,
    StepguardError,
)

if TYPE_CHECKING:
    from stepguard.credentials._api import VaultApi
    from stepguard.credentials._config import Login, VaultConfig
    from stepguard.credentials._kinds import Issued
    from stepguard.receipt import LeaseRecord
    from stepguard.spec import CredentialRequest, RunContext

__all__ = ["CredentialSession", "TokenRecord", "filesystem_type", "open_session",
           "revoke_open_sessions"]

log = logging.getLogger("stepguard.credentials")

@dataclass(frozen=True)
class TokenRecord:
    """The step token, described without revealing it (the accessor is hashed)."""

    accessor_hash: str
    child: bool
    policies: tuple[str, ...]
    ttl_s: int
    explicit_max_ttl_s: int
    metadata: Mapping[str, str] = field(default_factory=dict)
    renewals: int = 0
    revoked: bool = False
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "accessor_hash": self.accessor_hash, "child": self.child,
            "policies": list(self.policies), "ttl_s": self.ttl_s,
            "explicit_max_ttl_s": self.explicit_max_ttl_s, "metadata": dict(self.metadata),
            "renewals": self.renewals, "revoked": self.revoked, "error": self.error,
        }


class CredentialSession:
    """The credentials of one step run, under one step token. Made by :func:`open_session`.

    ``values``/``env()``/``file_payloads()``/``write_files()`` deliver them (from the
    :class:`CredentialSet` the session holds); ``leases`` and ``token`` describe them for the
    receipt (hashed ids only); :meth:`revoke` (run by the context manager on every exit path)
    removes the files written, then revokes the leases, then the token.
    """

    def __init__(self, config: VaultConfig, context: RunContext, api: VaultApi, login: Login,
                 *, ttl_s: float, policies: tuple[str, ...]) -> None:
        self._credentials = CredentialSet()
        self.config = config
        self.context = context
        self._api = api
        self._login = login
        self._ttl_s = ttl_s
        self._policies = policies
        self._step_api: VaultApi | None = None
        self._step_token: str | None = None
        self._token: TokenRecord | None = None
        self._leases: list[LeaseRecord] = []
        self._issued: list[Issued] = []
        self._lock = threading.RLock()
        #: Held while a renewal runs; revocation takes it so no renewal overlaps it.
        self._renew_lock = threading.Lock()
        self._started = time.monotonic()
        #: When each TTL began counting ("token", or a lease's index): the monotonic time its
        #: request was *sent*, so work done after Vault answered (registering the values with
        #: a slow log masker, another credential's issuance) never pushes a renewal past expiry.
        self._ttl_from: dict[str | int, float] = {}
        self._closed = False
        self._login_revoked = False
        self.timings: dict[str, float] = {}

    # -- delivery: the session's CredentialSet ------------------------------------------------

    @property
    def values(self) -> Mapping[str, SecretMapping]:
        """Credential name -> its values (see :attr:`CredentialSet.values`)."""
        return self._credentials.values

    def env(self, *, all_credentials: bool = False) -> dict[str, str]:
        """Environment variables for the body (see :meth:`CredentialSet.env`)."""
        return self._credentials.env(all_credentials=all_credentials)

    def file_payloads(self, *, all_credentials: bool = False) -> dict[str, bytes]:
        """File contents for a runner that writes them (see :meth:`CredentialSet.file_payloads`)."""
        return self._credentials.file_payloads(all_credentials=all_credentials)

    def write_files(self, directory: str | Path, *, all_credentials: bool = False,
                    uid: int | None = None, gid: int | None = None,
                    require_tmpfs: bool = False) -> dict[str, str]:
        """Write the values as 0400 files, removed when the session ends (see
        :meth:`CredentialSet.write_files`)."""
        return self._credentials.write_files(directory, all_credentials=all_credentials,
                                             uid=uid, gid=gid, require_tmpfs=require_tmpfs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(credentials={list(self._credentials.values)!r})"

    # -- read-only views ------------------------------------------------------------------------

    @property
    def leases(self) -> tuple[LeaseRecord, ...]:
        """One record per credential, in request order (lease ids hashed)."""
        with self._lock:
            return tuple(self._leases)

    @property
    def token(self) -> TokenRecord | None:
        """The step token's record (accessor hashed), None before it exists."""
        return self._token

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def revocation_ok(self) -> bool:
        """True when every revocable lease and the token were revoked."""
        tok = self._token
        return (tok is None or tok.revoked) and all(
            r.revoked for r in self._leases if r.revocable)

    def step_api(self) -> VaultApi:
        """A Vault client authenticated as the step token (e.g. for Transit signing)."""
        if self._step_api is None or self._closed:
            raise CredentialError("credential session is not open", subject="step token")
        return self._step_api

    # -- lifecycle --------------------------------------------------------------------------------

    def _start(self, requests: Sequence[CredentialRequest]) -> None:
        from stepguard.credentials._kinds import issue
        from stepguard.receipt import LeaseRecord

        t0 = self._started = time.monotonic()
        cfg, ctx = self.config, self.context
        meta = {"stepguard": "step", "pipeline": ctx.pipeline, "run_id": ctx.run_id,
                "step": ctx.step, "try": str(ctx.try_number), "orchestrator": ctx.orchestrator}
        heartbeat = int(max(2, min(self._ttl_s, cfg.token_heartbeat_s)))
        max_ttl = math.ceil(self._ttl_s)
        if cfg.child_token:
            payload: dict[str, Any] = {
                "policies": list(self._policies), "meta": meta, "ttl": f"{heartbeat}s",
                "explicit_max_ttl": f"{max_ttl}s", "renewable": True, "no_parent": False,
                "display_name": f"stepguard-{ctx.step}"[:60],
            }
            path = "auth/token/create" + (f"/{cfg.token_role}" if cfg.token_role else "")
            try:
                body = self._api.with_token(self._login.token).request(
                    "POST", path, what="step token creation", json=payload)
            except CredentialError as exc:
                if type(exc) is CredentialError and any("subset" in d for d in exc.details):
                    # Vault's answer to a privilege escalation attempt: a denial, not a fault.
                    raise CredentialDenied(
                        "the step asks for policies its parent token does not hold",
                        subject=",".join(self._policies), details=exc.details) from exc
                if isinstance(exc, CredentialDenied) and self._login.owned:
                    exc.hint = ("this login may not create tokens: for an in-pod JWT or "
                                "Kubernetes login set VaultConfig(child_token=False)")
                raise
            auth = (body or {}).get("auth") or {}
            if not auth.get("client_token"):
                raise CredentialError("Vault returned no step token", subject=path)
            self._step_token = str(auth["client_token"])
            self._token = TokenRecord(
                accessor_hash=hashed_id(str(auth.get("accessor", ""))), child=True,
                policies=tuple(auth.get("policies") or self._policies),
                ttl_s=int(auth.get("lease_duration") or heartbeat), explicit_max_ttl_s=max_ttl,
                metadata=meta)
            self._ttl_from["token"] = t0
        else:
            self._step_token = self._login.token
            self._token = TokenRecord(
                accessor_hash=hashed_id(self._login.accessor), child=False,
                policies=self._login.policies, ttl_s=self._login.ttl_s,
                explicit_max_ttl_s=self._login.ttl_s, metadata={})
        self._step_api = self._api.with_token(self._step_token)
        self.timings["token_s"] = time.monotonic() - t0
        # Renewals start with the token, not after the credentials: issuing them can take
        # longer than a short heartbeat (IAM propagation waits, a slow secrets backend), and
        # the token must not expire under the issuance -- nor under its own registration with
        # the log maskers, which comes next and, in a long-lived process, can take seconds
        # (nothing has logged the token before it).
        self._schedule_renewal()
        if cfg.child_token:
            guard(self._step_token)

        for req in requests:
            t1 = time.monotonic()
            issued = issue(self._step_api, req, ctx, ttl_s=self._ttl_s)
            with self._lock:
                self._ttl_from[len(self._leases)] = t1
                self._issued.append(issued)
                self._leases.append(LeaseRecord(
                    name=req.name, kind=req.kind,
                    lease=hashed_id(issued.lease_id) if issued.lease_id else None,
                    revocable=issued.revocable, static=issued.static,
                    renewable=issued.renewable, ttl_s=issued.lease_duration_s,
                    issue_s=issued.issue_s))
            self._credentials._add(req.name, req.kind, req.delivery,
                                   env_prefix(req.name, req.env_prefix), issued.values)
            self.timings[f"issue_s.{req.name}"] = time.monotonic() - t1
        self._schedule_renewal()  # now also for the leases' own TTLs

    def _next_due(self) -> float | None:
        """Monotonic time of the next renewal: 2/3 into the shortest TTL that ends before the
        step does, counted from when that TTL began (see ``_ttl_from``); None when none does."""
        horizon = self._ttl_s
        due: list[float] = []
        tok = self._token
        if tok is not None and tok.child and tok.ttl_s < horizon:
            due.append(self._ttl_from.get("token", self._started) + tok.ttl_s * 2 / 3)
        for i, rec in enumerate(self._leases):
            if rec.renewable and rec.revocable and 0 < rec.ttl_s < horizon:
                due.append(self._ttl_from.get(i, self._started) + rec.ttl_s * 2 / 3)
        if not due:
            return None
        # At least half a second apart, so a Vault that keeps answering with a tiny TTL is not
        # asked in a tight loop.
        return max(min(due), time.monotonic() + 0.5)

    def _schedule_renewal(self) -> None:
        at = self._next_due()
        if at is not None:
            RENEWALS.add(self, at)

    def _renew_due(self) -> None:
        """Run by the process's renewal thread when this session's renewal is due."""
        with self._renew_lock:
            if self._closed:
                return
            remaining = self._ttl_s - (time.monotonic() - self._started)
            if remaining <= 0:
                return
            try:
                self._renew_once(remaining)
            except StepguardError as exc:
                # Logged without values; the next tick tries again, expiry is the backstop.
                log.warning("renewal for step %s failed: %s", self.context.step, exc)
            except Exception as exc:  # the renewal thread serves every session: it must live
                log.warning("renewal for step %s failed unexpectedly (%s)", self.context.step,
                            type(exc).__name__)
            self._schedule_renewal()

    def _renew_once(self, remaining: float) -> None:
        api = self.step_api()
        tok = self._token
        if tok is not None and tok.child and not self._closed:
            inc = int(max(2, min(self.config.token_heartbeat_s, remaining + 30)))
            sent = time.monotonic()
            body = api.request("POST", "auth/token/renew-self", what="step token renewal",
                               json={"increment": f"{inc}s"})
            ttl = int(((body or {}).get("auth") or {}).get("lease_duration") or tok.ttl_s)
            with self._lock:
                self._token = replace(tok, ttl_s=ttl, renewals=tok.renewals + 1)
                self._ttl_from["token"] = sent
        for i, issued in enumerate(list(self._issued)):
            rec = self._leases[i]
            if self._closed:  # revocation has begun: renewing now would only race it
                return
            if not (issued.lease_id and rec.renewable and rec.revocable):
                continue
            sent = time.monotonic()
            body = api.request("PUT", "sys/leases/renew", what=f"lease renewal {rec.name!r}",
                               json={"lease_id": issued.lease_id,
                                     "increment": int(remaining + 30)})
            ttl = int((body or {}).get("lease_duration") or rec.ttl_s)
            with self._lock:
                self._leases[i] = replace(rec, ttl_s=ttl)
                self._ttl_from[i] = sent

    def revoke(self) -> tuple[LeaseRecord, ...]:
        """Revoke every revocable lease, then the step token (and our own login token).

        Idempotent; never raises (results are recorded in :attr:`leases` and :attr:`token`;
        failures are logged without values). Token revocation also revokes any lease whose own
        revocation failed, and any lease a retried issuance left behind.
        """
        with self._lock:
            if self._closed:
                return tuple(self._leases)
            self._closed = True
        RENEWALS.remove(self)
        # A renewal in flight finishes first (it stops between requests once _closed is set),
        # but revocation never waits longer than one request's timeout for it.
        if not RENEWALS.on_renewal_thread():
            if self._renew_lock.acquire(timeout=self.config.timeout_s + 1):
                self._renew_lock.release()
            else:
                log.warning("a renewal for step %s is still running; revoking anyway",
                            self.context.step)
        self._credentials._remove_files()
        t0 = time.monotonic()
        api = self._step_api
        for i, issued in enumerate(self._issued):
            rec = self._leases[i]
            if not (issued.revocable and issued.lease_id) or api is None:
                continue
            try:
                api.request("PUT", "sys/leases/revoke", what=f"lease revocation {rec.name!r}",
                            json={"lease_id": issued.lease_id})
                self._leases[i] = replace(rec, revoked=True, revoked_by="lease")
            except StepguardError as exc:
                log.warning("lease revocation for %s failed (%s); token revocation covers it",
                            rec.name, type(exc).__name__)
                self._leases[i] = replace(rec, error=str(exc))
        tok = self._token
        login_api = self._api.with_token(self._login.token)
        if tok is not None and self._step_token is not None and api is not None:
            try:
                if tok.child and self._login.owned:
                    # Our login token is the child's parent: revoking it takes the whole tree
                    # (child token, its leases) down in one call and leaves no login behind.
                    login_api.request("POST", "auth/token/revoke-self",
                                      what="step token revocation (via its parent)")
                    self._login_revoked = True
                elif tok.child or self._login.owned:
                    api.request("POST", "auth/token/revoke-self", what="step token revocation")
                    self._login_revoked = self._login.owned
                self._token = replace(tok, revoked=tok.child or self._login.owned)
            except StepguardError as exc:
                log.warning("step token revocation failed (%s); its TTL (%d s) bounds it",
                            type(exc).__name__, tok.ttl_s)
                self._token = replace(tok, error=str(exc))
                if tok.child:
                    try:
                        api.request("POST", "auth/token/revoke-self",
                                    what="step token revocation")
                        self._token = replace(tok, revoked=True)
                    except StepguardError:
                        log.warning("step token revocation retry failed")
        if self._token is not None and self._token.revoked:
            self._leases = [r if r.revoked or not r.revocable else
                            replace(r, revoked=True, revoked_by="token") for r in self._leases]
        if self._login.owned and not self._login_revoked:
            try:
                login_api.request("POST", "auth/token/revoke-self",
                                  what="login token revocation")
                self._login_revoked = True
            except StepguardError as exc:
                log.warning("login token revocation failed (%s)", type(exc).__name__)
        self.timings["revoke_s"] = time.monotonic() - t0
        self._step_api = None
        self._api.close()
        return tuple(self._leases)


_OPEN: weakref.WeakSet[CredentialSession] = weakref.WeakSet()


def revoke_open_sessions() -> int:
    """Revoke every credential session open in this process; returns how many were open.

    For hosts whose SIGTERM handler does not raise -- Airflow 3's task runner only calls the
    operator's ``on_kill()`` -- so the credentials die with the task instead of at TTL. Safe to
    call from a signal handler and more than once.
    """
    sessions = list(_OPEN)
    for session in sessions:
        session.revoke()
    return len(sessions)


@contextlib.contextmanager
def open_session(
    requests: Sequence[CredentialRequest],
    *,
    settings: VaultConfig | None = None,
    context: RunContext | None = None,
    ttl_s: float,
    policies: Sequence[str] = (),
    handle_sigterm: bool = True,
) -> Iterator[CredentialSession]:
    """Log in, create the step's child token, mint every requested credential under it, and
    revoke leases then token when the block exits -- on success, exception, or SIGTERM.

    ``ttl_s`` is the step deadline plus a margin: the token's explicit max TTL. The token's
    renewable TTL is ``min(ttl_s, settings.token_heartbeat_s)``, renewed in the background at
    two thirds, so a SIGKILLed step's credentials die within one heartbeat. ``policies`` (the
    step's declared subset; default ``settings.default_policies``) are the child's only policies.
    ``handle_sigterm`` turns SIGTERM into ``SystemExit(143)`` while the session is open, when
    called from the main thread and no host handler is installed (stepguard's signal owner,
    :mod:`stepguard._private.signals`, decides).
    """
    from stepguard.credentials._api import VaultApi
    from stepguard.credentials._config import VaultConfig
    from stepguard.spec import RunContext

    cfg = settings if settings is not None else VaultConfig.from_env()
    ctx = context if context is not None else RunContext()
    if cfg.auth is None:
        raise ConfigurationError("no Vault auth method configured", subject="vault.auth")
    if not 0 < ttl_s <= 7 * 24 * 3600 + 3600:
        raise ConfigurationError("ttl_s must be positive and at most 7 days + 1 h",
                                 subject="ttl_s")
    pols = tuple(policies) or cfg.default_policies
    if policies and not cfg.child_token:
        # Without a child token the login token is the step token: its policies are the auth
        # role's, and declared ones cannot narrow them. Refuse rather than ignore them.
        raise ConfigurationError(
            "the step declares policies, but this login's token is used as the step token",
            subject=",".join(policies),
            hint="set the policies on the JWT/Kubernetes auth role (token_policies), or log in "
                 "with a method whose token may create child tokens (AppRole)")
    names = [r.name for r in requests]
    if len(set(names)) != len(names):
        raise ConfigurationError("duplicate credential name", subject=",".join(names))

    stack = contextlib.ExitStack()
    if handle_sigterm:
        # SIGTERM's default action skips every finally block: it unwinds instead, once, so the
        # revocation runs; a host's own handler (Airflow's) is left alone.
        stack.enter_context(unwind_on(signal.SIGTERM))
    api = VaultApi(cfg)
    session: CredentialSession | None = None
    try:
        t0 = time.monotonic()
        login = cfg.auth.login(api)
        guard(login.token)
        session = CredentialSession(cfg, ctx, api, login, ttl_s=ttl_s, policies=pols)
        session.timings["login_s"] = time.monotonic() - t0
        _OPEN.add(session)
        session._start(requests)
        yield session
    finally:
        try:
            if session is not None:
                session.revoke()
                _OPEN.discard(session)
            else:
                api.close()
        finally:
            stack.close()
