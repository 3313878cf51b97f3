"""The one entry point the step lifecycle calls, whatever the isolation mode."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from stepguard.errors import ConfigurationError
from stepguard.isolation._local import Output, run_local
from stepguard.isolation._result import RunResult
from stepguard.spec import IsolationSpec, RunContext


def run_isolated(
    command: Sequence[str],
    spec: IsolationSpec,
    *,
    ro_binds: Mapping[str, str] | None = None,
    rw_binds: Mapping[str, str] | None = None,
    ro_bind_fds: Mapping[int, str] | None = None,
    env: Mapping[str, str] | None = None,
    secret_files: Mapping[str, bytes] | None = None,
    deadline_s: float,
    cwd: str | None = None,
    stdout: Output = None,
    stderr: Output = None,
    gpus: int | None = None,
    bind_python: bool = True,
    context: RunContext | None = None,
    pod_name: str | None = None,
    kube_api: Any = None,
    wrapped_token_env: Mapping[str, str] | None = None,
    pod_options: Mapping[str, Any] | None = None,
) -> RunResult:
    """Run ``command`` isolated as ``spec.mode`` says, and wait for it (at most ``deadline_s``).

    * ``ro_binds`` / ``rw_binds``: host path -> sandbox path (sandbox mode only). Verified inputs go
      in ``ro_binds``; the output directory in ``rw_binds``. Host paths are resolved once, here.
      After the run every ``rw_binds`` directory is sanitized: set-id bits are cleared and FIFOs,
      sockets and device nodes removed; if there were any the run is refused with
      :class:`~stepguard.errors.IntegrityError` naming them. When we run as root the body runs as
      ``spec.uid`` on the host too, and each output directory is lent to that uid for the run.
    * ``ro_bind_fds``: open descriptor (``O_PATH`` is enough) -> sandbox path. The object behind
      the descriptor is bound -- not whatever a path leads to later -- and re-checked by device
      and inode inside the finished sandbox before the body starts (process mode: the path must
      still lead to it). A mismatch raises :class:`~stepguard.errors.IntegrityError`. The caller
      keeps and closes the descriptors.
    * ``env``: the body's whole environment (plus a minimal ``PATH`` unless given; in the sandbox
      also ``HOME`` and ``TMPDIR``). Nothing of the caller's environment is inherited.
    * ``secret_files``: environment variable name -> content. Each is written mode 0400 on a
      private tmpfs (sandbox: ``/run/stepguard/secrets/NAME`` inside; process: a 0700 directory
      under ``/dev/shm`` removed afterwards) and the variable is set to its path. Secrets never
      appear on a command line.
    * ``stdout`` / ``stderr``: ``None`` inherits ours; a path captures to a new 0600 file; an open
      file or descriptor is used as is.
    * ``gpus``: overrides ``spec.gpus`` (0 hides GPUs even when the spec asks for them).
    * pod mode only: ``context`` (labels), ``pod_name``, ``kube_api`` (a
      ``KubeApi(core, networking)``; default from in-cluster config or kubeconfig), and
      ``wrapped_token_env`` (response-wrapped, single-use Vault token variables for the pod),
      ``pod_options`` (``config_map``: file name -> text mounted at ``/etc/stepguard``;
      ``vault_audience`` / ``vault_token_expiry_s`` of the projected Vault token; ``poll_s``).

    Returns a :class:`RunResult` whatever the body's exit status (a non-zero status is the
    caller's verdict). Raises :class:`~stepguard.errors.StepTimeout` after killing the whole
    process tree when the deadline passes (``err.result`` holds the RunResult), and
    :class:`~stepguard.errors.IsolationError` when the isolation cannot be set up.

    >>> import tempfile, pathlib
    >>> from stepguard.spec import IsolationSpec
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> r = run_isolated(["sh", "-c", "echo $GREETING > $OUT/hello"], IsolationSpec(mode="process"),
    ...                  env={"GREETING": "hi", "OUT": str(out)}, deadline_s=10)
    >>> r.exit_code, (out / "hello").read_text()
    (0, 'hi\\n')
    """
    effective_gpus = spec.gpus if gpus is None else gpus
    if spec.mode == "pod":
        if ro_binds or rw_binds or ro_bind_fds:
            raise ConfigurationError(
                "a pod cannot bind host paths; inputs are fetched and verified inside the pod",
                subject="isolation.mode",
            )
        from stepguard.isolation._kube import run_pod

        return run_pod(
            command, spec, env=env or {}, secret_files=secret_files or {},
            deadline_s=deadline_s, context=context or RunContext(), name=pod_name,
            stdout=stdout, api=kube_api, gpus=effective_gpus, wrapped_token_env=wrapped_token_env,
            **dict(pod_options or {}),
        )
    if wrapped_token_env:
        raise ConfigurationError("wrapped tokens are for pods; give a local body its env",
                                 subject="wrapped_token_env")
    if spec.mode not in ("process", "sandbox"):
        raise ConfigurationError(f"unknown isolation mode {spec.mode!r}", subject="isolation.mode")
    return run_local(
        command, spec, mode=spec.mode, ro_binds=ro_binds or {}, rw_binds=rw_binds or {},
        env=env or {}, secret_files=secret_files or {}, deadline_s=deadline_s, cwd=cwd,
        stdout=stdout, stderr=stderr, gpus=effective_gpus, bind_python=bind_python,
        ro_bind_fds=ro_bind_fds,
    )
