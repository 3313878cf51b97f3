"""The secured step: one lifecycle, wherever the body runs.

::

    spec -> acquire credentials (child token + leases) -> verify inputs (local, or hashed
         while downloaded from object storage) -> run body isolated (process | sandbox | pod)
         -> hash outputs (upload with checksums) -> sign + publish -> revoke -> receipt

Every arrow is an audit span. Every failure is a typed error, raised only after cleanup
(revocation, sandbox/pod removal, span flush) ran -- on success, exception, deadline and SIGTERM
alike. The body never runs unless every input verified. Object-store inputs and outputs, receipt
signing and audit segments are :mod:`stepguard._artifacts`.

>>> import tempfile, pathlib
>>> from stepguard.step import run_step
>>> from stepguard.spec import StepSpec
>>> from stepguard.settings import Settings
>>> tmp = pathlib.Path(tempfile.mkdtemp())
>>> spec = StepSpec.from_dict({"name": "hello", "isolation": {"mode": "process"},
...     "outputs": [{"name": "greeting", "path": str(tmp / "out")}]})
>>> settings = Settings.from_dict({"state_dir": str(tmp / "state"), "audit": {"exporter": "none"}})
>>> def body(env):
...     (env.outputs["greeting"] / "hello.txt").write_text("hi")
>>> receipt = run_step(spec, body=body, settings=settings)
>>> receipt.status, receipt.output("greeting").files
('succeeded', 1)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepguard._artifacts import Artifacts, is_uri
from stepguard._naming import instance_name, output_path, path_component
from stepguard.errors import (
    BodyFailed,
    ConfigurationError,
    IntegrityError,
    OperationalError,
    StepguardError,
    StepTimeout,
)
from stepguard.receipt import (
    ErrorRecord,
    InputRecord,
    LeaseRecord,
    OutputRecord,
    PublishRecord,
    Receipt,
)
from stepguard.settings import Settings
from stepguard.spec import InputSpec, OutputSpec, RunContext, StepSpec, env_name

if TYPE_CHECKING:
    from stepguard.wiring import StepAudit

__all__ = ["Step", "StepEnv", "StepSpec", "run_step"]

Body = Callable[["StepEnv"], object]


@dataclass(frozen=True)
class StepEnv:
    """What an in-process body receives: verified input paths, output dirs, credentials.

    ``credentials`` maps each requested credential name to a mapping whose values never print.
    """

    inputs: Mapping[str, Path]
    outputs: Mapping[str, Path]
    credentials: Mapping[str, Any] = field(repr=False)
    context: RunContext


class Step:
    """A configured secured step. :meth:`run` executes the whole lifecycle once.

    ``settings`` default to :meth:`Settings.load`; ``context`` names the pipeline run and step
    (default: an ad-hoc run named after the spec).
    """

    def __init__(
        self,
        spec: StepSpec,
        *,
        settings: Settings | None = None,
        context: RunContext | None = None,
        tracer_provider: object | None = None,
    ) -> None:
        self.spec = spec
        self.settings = settings if settings is not None else Settings.load()
        self.context = context if context is not None else RunContext(step=spec.name)
        self.tracer_provider = tracer_provider

    def __repr__(self) -> str:
        return f"Step({self.spec.name!r}, run={self.context.run_id!r})"

    @property
    def run_dir(self) -> Path:
        """Where this run's receipt and output manifests are written: one directory per run
        and step, and per instance of a mapped Airflow task (``train.0``, ``train.1``, ...).

        >>> from stepguard.spec import StepSpec
        >>> s = Step(StepSpec(name="train"), settings=Settings.from_dict({"state_dir": "/srv/sg"}),
        ...          context=RunContext(run_id="r1", step="train.3"))
        >>> str(s.run_dir)
        '/srv/sg/runs/r1/train.3'
        """
        return (Path(self.settings.state_dir).resolve() / "runs"
                / path_component(self.context.run_id)
                / path_component(instance_name(self.spec.name, self.context.step)))

    def run(
        self,
        *,
        command: Sequence[str] | None = None,
        body: Body | None = None,
    ) -> Receipt:
        """Run the lifecycle around ``command`` (argv) or ``body`` (a Python callable)."""
        if (command is None) == (body is None):
            raise ConfigurationError("give exactly one of 'command' or 'body'",
                                     subject=self.spec.name)
        if body is not None and self.spec.isolation.mode != "process":
            raise ConfigurationError(
                "a Python callable runs in this process; it cannot be sandboxed",
                subject=f"{self.spec.name}.isolation.mode",
                hint="set isolation.mode: process, or pass the body as a command",
            )
        if command is not None and self.spec.isolation.mode == "pod":
            from stepguard._podstep import run_in_pod  # the step runner is the pod's entrypoint

            return run_in_pod(self, command)
        from stepguard.wiring import StepAudit

        return _Run(self, StepAudit(self.settings, self.tracer_provider)).execute(command, body)


def run_step(
    spec: StepSpec,
    *,
    command: Sequence[str] | None = None,
    body: Body | None = None,
    context: RunContext | None = None,
    settings: Settings | None = None,
    tracer_provider: object | None = None,
) -> Receipt:
    """Run one secured step and return its receipt (see the module docs for an example).

    Raises the typed error of the first failing stage (:class:`~stepguard.errors.IntegrityError`,
    :class:`~stepguard.errors.BodyFailed`, :class:`~stepguard.errors.StepTimeout`, ...) after
    cleanup; the failed step's receipt is attached to it as ``err.receipt``.
    """
    step = Step(spec, settings=settings, context=context, tracer_provider=tracer_provider)
    return step.run(command=command, body=body)


class _Run:
    """State of one execution; kept out of the public :class:`Step`."""

    def __init__(self, step: Step, audit: StepAudit) -> None:
        self.step = step
        self.spec = step.spec
        self.ctx = step.context
        self.settings = step.settings
        self.audit = audit
        self.timings: dict[str, float] = {}
        self.inputs: list[InputRecord] = []
        self.outputs: list[OutputRecord] = []
        self.leases: tuple[LeaseRecord, ...] = ()
        self.isolation: dict[str, str] = {"mode": self.spec.isolation.mode}
        if os.environ.get("STEPGUARD_POD"):  # the step runner as a pod's entrypoint
            self.isolation["pod"] = os.environ["STEPGUARD_POD"]
        self.started = datetime.now(UTC)
        self.audit_head: str | None = None
        self.deadline = time.monotonic() + self.spec.deadline_s
        # Input name -> descriptor of the object that was verified; the sandbox binds that.
        self.pinned: dict[str, int] = {}
        self.pins = contextlib.ExitStack()
        # Object-store inputs and outputs: scratch, S3 clients from the step's credentials.
        self.artifacts = Artifacts(self.spec)
        self.out_uris: dict[str, str] = {}

    @contextlib.contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = round((time.perf_counter() - t0) * 1000, 3)

    def execute(self, command: Sequence[str] | None, body: Body | None) -> Receipt:
        error: BaseException | None = None
        run_dir = self.step.run_dir
        before = self.audit.position()
        try:
            with self.audit.step(self.spec, self.ctx,
                                 name=instance_name(self.spec.name, self.ctx.step)):
                try:
                    self._lifecycle(command, body, run_dir)
                finally:
                    self.isolation["trace_id"] = self.audit.trace_id or ""
        except BaseException as exc:
            error = exc
        self.audit.flush()
        after = self.audit.position()
        self.audit_head = f"{after.seq}:{after.digest}" if after is not None else None
        target = next(((o.name, self.out_uris[o.name], o.credential) for o in self.spec.outputs
                       if o.name in self.out_uris), None)
        receipt = self.artifacts.hand_off(
            lambda segment: dataclasses.replace(self._receipt(error), audit_segment=segment),
            settings=self.settings, failed=error is not None, target=target,
            # Read back only when it leaves the host with an object-store output.
            segment=self.audit.segment(before, after) if target is not None else None)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "receipt.json").write_text(receipt.to_json(indent=2) + "\n")
        except OSError:
            if error is None:
                raise
        if error is not None:
            if isinstance(error, StepguardError):
                error.receipt = receipt  # type: ignore[attr-defined]
            raise error
        return receipt

    # -- the stages -----------------------------------------------------------------------

    def _lifecycle(self, command: Sequence[str] | None, body: Body | None, run_dir: Path) -> None:
        from stepguard.wiring import enforce_floor  # the platform's floor, before anything runs

        enforce_floor(self.spec, self.settings)
        iso = self.spec.isolation
        if command is not None and iso.gpus and iso.mode != "pod" and not iso.gpus_optional:
            from stepguard.isolation import require_gpus
            require_gpus(iso.gpus)  # before any credential is minted or byte downloaded
        out_paths = self._prepare_outputs()
        with self.artifacts, self._credentials() as session, self.pins:
            self.artifacts.open_for(session, self.settings)
            for out in self.spec.outputs:
                if out.name in self.out_uris:
                    out_paths[out.name] = self.artifacts.output_dir(
                        out.name, self.out_uris[out.name], out.credential)
            verified = self._verify_inputs(session)
            self._run_body(command, body, verified, out_paths, session)
            manifests = self._hash_outputs(out_paths, run_dir)
            self._publish(manifests, out_paths, session)

    def _prepare_outputs(self) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        for out in self.spec.outputs:
            where = output_path(out.path, self.ctx, instance_name(self.spec.name, self.ctx.step))
            if is_uri(where):
                self.out_uris[out.name] = where  # in scratch, once credentials are open
                continue
            p = Path(where).absolute()
            if p.is_symlink() or (p.exists() and not p.is_dir()):
                raise ConfigurationError("output path must be a directory", subject=str(p))
            if p.is_dir() and any(p.iterdir()):
                raise ConfigurationError(
                    "output directory is not empty: stale files would be published as this "
                    "run's output", subject=str(p),
                    hint="use a fresh directory per run: e.g. path: out/{run_id}/model",
                )
            p.mkdir(parents=True, exist_ok=True)
            paths[out.name] = p
        return paths

    @contextlib.contextmanager
    def _credentials(self) -> Iterator[Any]:
        from stepguard.credentials import WRAPPED_ENV

        wrapped = os.environ.pop(WRAPPED_ENV, None)
        if wrapped:
            with self._unwrapped(wrapped) as delivered:
                # A pod's spec names the credentials the orchestrator minted for it.
                if {c.name for c in self.spec.credentials} - set(delivered.values):
                    raise ConfigurationError(
                        "credentials were handed over wrapped, and the spec asks for more",
                        subject=WRAPPED_ENV,
                        hint="mint them in one place: the orchestrator, or this step runner")
                yield delivered
            return
        if not self.spec.credentials:
            yield None
            return
        from stepguard.credentials import open_session
        from stepguard.wiring import vault_config

        ttl = self.spec.deadline_s + self.settings.vault.ttl_margin_s
        with contextlib.ExitStack() as stack:
            with self.audit.control("credentials", "acquire"), self._timed("credentials_acquire"):
                session = stack.enter_context(open_session(
                    self.spec.credentials, settings=vault_config(self.settings),
                    context=self.ctx, ttl_s=ttl, policies=self.spec.policies))
                self._record_leases(session)
            # Runs before the session's own exit (which then finds nothing left to revoke), so
            # the revocation is inside its span and timed on every exit path.
            stack.callback(self._revoke, session)
            self.leases = session.leases
            yield session

    def _record_leases(self, session: Any) -> None:
        """What was minted, on the acquire span: kind, hashed lease id, TTL, revocability."""
        from stepguard.audit import credential_attributes

        token = getattr(session, "token", None)
        attrs = credential_attributes(leases=session.leases)
        if token is not None:
            attrs["stepguard.credentials.token_accessor"] = token.accessor_hash
        self.audit.attributes(attrs)
        for rec in session.leases:
            self.audit.verdict("credentials.acquired", True, credential=rec.name, kind=rec.kind,
                               lease=rec.lease or "", ttl_s=int(rec.ttl_s),
                               revocable=rec.revocable)

    def _revoke(self, session: Any) -> None:
        with self.audit.control("credentials", "revoke"), self._timed("credentials_revoke"):
            session.revoke()
            self.leases = session.leases
            for rec in self.leases:
                if rec.revocable:
                    # PASS only when the lease really was revoked.
                    self.audit.verdict("credentials.revoked", bool(rec.revoked),
                                       credential=rec.name, lease=rec.lease or "",
                                       kind=rec.kind, revoked_by=rec.revoked_by,
                                       error=rec.error)
                else:
                    # It can only expire (STS, web identity) or is static (KV): never "revoked".
                    self.audit.verdict("credentials.not_revocable", True,
                                       credential=rec.name, lease=rec.lease or "",
                                       kind=rec.kind,
                                       outcome="static" if rec.static else "expires",
                                       ttl_s=int(rec.ttl_s))

    @contextlib.contextmanager
    def _unwrapped(self, token: str) -> Iterator[Any]:
        """Credentials minted by the orchestrator (its session owns and revokes the leases),
        handed over as a single-use wrapping token: unwrapped here, once."""
        from stepguard.credentials import unwrap_delivery
        from stepguard.wiring import unauthenticated_config

        if not self.settings.vault.addr:
            raise ConfigurationError("wrapped credentials need the Vault address",
                                     subject="vault.addr")
        cfg = unauthenticated_config(self.settings)
        with self.audit.control("credentials", "unwrap"), self._timed("credentials_unwrap"):
            delivered = unwrap_delivery(token, settings=cfg)
        with delivered:
            yield delivered

    def _verify_inputs(self, session: Any) -> dict[str, Path]:
        verified: dict[str, Path] = {}
        with self._timed("verify_inputs"):
            for inp in self.spec.inputs:
                with self.audit.control("integrity", "verify", input=inp.name):
                    try:
                        record, path = self._verify_one(inp, session)
                    except IntegrityError as err:
                        # A verdict, not only an error: the audit trail says which check failed.
                        self.audit.verdict("integrity.verified", False, input=inp.name,
                                           subject=err.subject)
                        raise
                    self.audit.input_verified(inp.name, record.digest, record.path)
                self.inputs.append(record)
                verified[inp.name] = path
        return verified

    def _verify_one(self, inp: InputSpec, session: Any) -> tuple[InputRecord, Path]:
        remote = is_uri(inp.path)
        path = Path(inp.path) if remote else Path(inp.path).absolute()
        if inp.unsafe_unverified:
            if remote:
                raise ConfigurationError("an object-store input is always verified",
                                         subject=f"inputs.{inp.name}.unsafe_unverified")
            warnings.warn(f"input {inp.name!r} is used without verification (unsafe_unverified)",
                          stacklevel=4)
            return InputRecord(name=inp.name, path=str(path), digest=None, verified=False,
                               source="unverified"), path
        from stepguard.integrity import verify_manifest

        manifest, source = self.artifacts.reference(inp)
        if inp.digest and manifest.digest != inp.digest:
            raise IntegrityError("manifest root digest differs from the pinned digest",
                                 subject=inp.name,
                                 details=[f"pinned: {inp.digest}", f"manifest: {manifest.digest}"])
        signer = None
        if inp.signature_policy:
            from stepguard.wiring import verify_input_signature

            signer = verify_input_signature(inp, manifest, self.settings,
                                            session=_vault_session(session))
        if remote:
            # Hashed while downloaded into scratch; the body reads that copy, never re-read.
            staged = self.artifacts.stage_input(inp.name, inp.path, manifest, inp.credential)
            real = str(staged)
        else:
            real = os.path.realpath(path)
        # Resolve the root once and hold the object it leads to: what is verified below is what
        # the sandbox binds, whatever the configured path (a symlink, say) leads to later.
        try:
            fd = os.open(real, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            # Not there is a deployment problem (another worker's disk?), not a verdict.
            raise OperationalError("input does not exist", subject=str(path),
                                   hint="a step on another worker reads its inputs from object "
                                        "storage (s3://...), not from a path") from None
        self.pins.callback(os.close, fd)
        if not remote:
            verify_manifest(real, manifest, allow_internal_symlinks=inp.allow_internal_symlinks)
        held, now = os.fstat(fd), os.stat(real, follow_symlinks=False)
        if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
            raise IntegrityError("input was replaced while it was being verified",
                                 subject=str(path))
        self.pinned[inp.name] = fd
        if remote:
            path = Path(real)
        return InputRecord(
            name=inp.name, path=inp.path if remote else str(path), digest=manifest.digest,
            verified=True,
            files=len(manifest.entries), bytes=sum(e.size for e in manifest.entries),
            source=source, signer=signer,
        ), path

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise StepTimeout("step deadline passed before the body started",
                              subject=self.spec.name)
        return left

    def _run_body(
        self,
        command: Sequence[str] | None,
        body: Body | None,
        inputs: Mapping[str, Path],
        outputs: Mapping[str, Path],
        session: Any,
    ) -> None:
        mode = self.spec.isolation.mode
        with self.audit.control("isolation", "run", mode=mode), self._timed("body"):
            if body is not None:
                hidden = {c.name for c in self.spec.credentials if c.delivery == "none"}
                creds = {k: v for k, v in (session.values if session else {}).items()
                         if k not in hidden}
                env = StepEnv(inputs=dict(inputs), outputs=dict(outputs), credentials=creds,
                              context=self.ctx)
                from stepguard.audit import redact
                from stepguard.isolation import call_in_process

                # The body's own message reaches the error and the receipt, masked.
                call_in_process(body, env, deadline_s=self._remaining(), name=self.spec.name,
                                mask=redact)
                return
            assert command is not None
            from stepguard.isolation import run_isolated

            child_env = dict(self.spec.env)
            for name, p in inputs.items():
                child_env[env_name("input", name)] = str(p)
            for name, p in outputs.items():
                child_env[env_name("output", name)] = str(p)
            child_env["STEPGUARD_RUN_ID"] = self.ctx.run_id
            child_env["STEPGUARD_STEP"] = self.spec.name
            child_env.update(self.audit.trace_env())
            secret_files: dict[str, bytes] | None = None
            if session is not None:  # a pod never gets here: stepguard._podstep runs it
                child_env.update(session.env())
                secret_files = session.file_payloads() or None
            iso = self.spec.isolation
            if iso.read_only_paths:
                # Relative code paths are the caller's; the sandbox binds them at the same place.
                iso = dataclasses.replace(iso, read_only_paths=tuple(
                    str(Path(p).absolute()) for p in iso.read_only_paths))
            result = run_isolated(
                list(command),
                iso,
                ro_binds={str(p): str(p) for n, p in inputs.items() if n not in self.pinned},
                ro_bind_fds={fd: str(inputs[n]) for n, fd in self.pinned.items()} or None,
                rw_binds={str(p): str(p) for p in outputs.values()},
                env=child_env,
                secret_files=secret_files,
                deadline_s=self._remaining(),
                cwd=str(Path(self.spec.workdir).absolute()) if self.spec.workdir else None,
                context=self.ctx,
            )
            self.isolation["exit_code"] = str(result.exit_code)
            if result.exit_code != 0:
                raise BodyFailed(f"step body exited with status {result.exit_code}",
                                 subject=self.spec.name)

    def _hash_outputs(self, outputs: Mapping[str, Path], run_dir: Path) -> dict[str, Any]:
        if not outputs:
            return {}
        from stepguard.integrity import create_manifest

        manifests: dict[str, Any] = {}
        run_dir.mkdir(parents=True, exist_ok=True)
        with self._timed("hash_outputs"):
            for out in self.spec.outputs:
                with self.audit.control("integrity", "hash", output=out.name):
                    manifest = create_manifest(outputs[out.name])
                    mpath = run_dir / f"{out.name}.manifest.json"
                    mpath.write_text(manifest.to_json())
                    where, mref = str(outputs[out.name]), str(mpath)
                    if out.name in self.out_uris:
                        where, mref = self.artifacts.upload_output(
                            outputs[out.name], self.out_uris[out.name], manifest,
                            out.credential)
                    self.audit.artifact(out.name, manifest.digest, where)
                manifests[out.name] = manifest
                self.outputs.append(OutputRecord(
                    name=out.name, path=where, digest=manifest.digest,
                    manifest=mref, files=len(manifest.entries),
                    bytes=sum(e.size for e in manifest.entries),
                ))
        return manifests

    def _publish(self, manifests: Mapping[str, Any], outputs: Mapping[str, Path],
                 session: Any) -> None:
        todo = [o for o in self.spec.outputs if o.publish is not None]
        if not todo:
            return
        from stepguard.wiring import publish_output

        with self._timed("publish"):
            for out in todo:
                with self.audit.control("registry", "publish", output=out.name):
                    record = publish_output(out, outputs[out.name], manifests[out.name],
                                            spec=self.spec, settings=self.settings,
                                            receipt=self._partial_receipt(),
                                            session=_vault_session(session))
                    from stepguard.audit import Attr, artifact_attributes

                    self.audit.attributes({
                        **artifact_attributes(
                            hash=manifests[out.name].digest, filename=record.uri,
                            version=record.version, attestation_hash=record.bundle_digest,
                            attestation_filename=record.bundle_uri),
                        Attr.REGISTRY_URI: record.registry,
                        **({Attr.SIGNER: record.signer} if record.signer else {})})
                self._attach(out, record)

    def _attach(self, out: OutputSpec, record: PublishRecord) -> None:
        for i, rec in enumerate(self.outputs):
            if rec.name == out.name:
                self.outputs[i] = OutputRecord(
                    name=rec.name, path=rec.path, digest=rec.digest, manifest=rec.manifest,
                    files=rec.files, bytes=rec.bytes, published=record,
                )

    # -- the receipt ----------------------------------------------------------------------

    def _partial_receipt(self) -> Receipt:
        return self._receipt(None)

    def _receipt(self, error: BaseException | None) -> Receipt:
        err = None
        if error is not None:
            if isinstance(error, StepguardError):
                err = ErrorRecord(type=type(error).__name__, message=error.message,
                                  subject=error.subject)
            else:
                # Foreign exceptions may carry anything in their text: record only the type.
                err = ErrorRecord(type=type(error).__name__, message="step body raised")
        return Receipt(
            step=self.spec.name,
            context=self.ctx,
            status="failed" if error is not None else "succeeded",
            inputs=tuple(self.inputs),
            outputs=tuple(self.outputs),
            credentials=self.leases,
            isolation=dict(self.isolation),
            trace_id=self.audit.trace_id,
            audit_head=self.audit_head,
            started_at=self.started.isoformat(),
            finished_at=datetime.now(UTC).isoformat(),
            timings_ms=dict(self.timings),
            error=err,
            verifications=tuple(self.audit.verifications),
            audit_export=self.audit.export,
        )


def _vault_session(session: Any) -> Any:
    """The credential session when this step holds one (not handed-over wrapped credentials):
    Transit then signs and verifies with its step token instead of a second login."""
    from stepguard.credentials import CredentialSession

    return session if isinstance(session, CredentialSession) else None
