"""What the component bodies run, inside the pod (or the kfp.local subprocess).

Everything here goes through :func:`stepguard.step.run_step` (or the ``stepguard exec`` step
runner), so a KFP step gets the same lifecycle, receipts and audit spans as an Airflow task or a
CLI run. Failures print the error's diagnostics (never a secret, never a traceback of the
body's data) and exit with the error family's status, which fails the KFP task.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from stepguard.errors import ConfigurationError, IntegrityError, StepguardError
from stepguard.receipt import Receipt
from stepguard.spec import (
    InputSpec,
    IsolationSpec,
    OutputSpec,
    PublishSpec,
    RunContext,
    SigningSpec,
    StepSpec,
)

__all__ = [
    "build_train_spec",
    "effective_isolation",
    "fetch_verified",
    "in_kfp_pod",
    "secure_train_step",
    "sign_and_publish_step",
    "verify_dataset_step",
    "verify_model_step",
]

T = TypeVar("T")

#: Deadline of the short verification/publishing steps (seconds).
SHORT_DEADLINE_S = 1800.0


def in_kfp_pod(environ: os._Environ[str] | dict[str, str] | None = None) -> bool:
    """True inside a pod started by a KFP backend (its driver sets ``KFP_POD_NAME``/``_UID``).

    >>> in_kfp_pod({})
    False
    >>> in_kfp_pod({"KFP_POD_NAME": "p-1", "KFP_POD_UID": "u",
    ...             "KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    True
    """
    env = os.environ if environ is None else environ
    return bool(env.get("KFP_POD_NAME") and env.get("KFP_POD_UID")
                and env.get("KUBERNETES_SERVICE_HOST"))


def effective_isolation(spec: IsolationSpec, *, in_pod: bool | None = None) -> IsolationSpec:
    """The isolation a component applies where it runs.

    ``mode: pod`` means "this step runs in its own restricted pod". In a KFP pod that pod is the
    task's own (restricted by :func:`stepguard_kfp.harden`), so the body runs as a plain child
    process in it. Outside a pod -- ``kfp.local`` -- nothing would enforce the spec, so the body
    runs in the bubblewrap sandbox with the same spec instead of silently unrestricted.

    >>> effective_isolation(IsolationSpec(mode="pod"), in_pod=False).mode
    'sandbox'
    >>> effective_isolation(IsolationSpec(mode="pod"), in_pod=True).mode
    'process'
    >>> effective_isolation(IsolationSpec(mode="sandbox"), in_pod=True).mode
    'sandbox'
    """
    pod = in_kfp_pod() if in_pod is None else in_pod
    if spec.mode == "pod":
        return replace(spec, mode="process" if pod else "sandbox")
    return spec


def _context(pipeline: str, run_id: str, step: str) -> RunContext:
    return RunContext(
        pipeline=pipeline or "kfp",
        run_id=run_id or os.environ.get("STEPGUARD_RUN_ID") or f"kfp-{uuid.uuid4().hex[:12]}",
        step=step,
        orchestrator="kfp",
    )


def _settings(settings_path: str = "") -> Any:
    from stepguard_kfp._settings import load_settings

    return load_settings(settings_path)


def _fail(err: StepguardError) -> SystemExit:
    # The KFP executor would print a traceback; one diagnostic block says more and leaks less.
    print(f"stepguard: error: {err.diagnostics()}", file=sys.stderr, flush=True)
    return SystemExit(err.exit_code)


def _guard(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except StepguardError as err:
        raise _fail(err) from err


def _load_receipt(text: str, what: str) -> Receipt:
    receipt = Receipt.from_json(text)
    if receipt.status != "succeeded":
        raise IntegrityError(f"{what} receipt is not of a succeeded step", subject=receipt.step)
    return receipt


def _copy_file(src: str | Path, dst: str | Path) -> None:
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


@contextmanager
def _scratch(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- verify dataset -------------------------------------------------------------------------


def verify_dataset_step(
    *,
    dataset_path: str,
    manifest_path: str,
    manifest_out: str,
    expected_digest: str = "",
    pipeline: str = "kfp",
    run_id: str = "",
    settings_path: str = "",
) -> str:
    """Verify ``dataset_path`` against ``manifest_path``; copy the manifest to ``manifest_out``.

    Returns the receipt JSON: its ``dataset`` input record holds the verified root digest that
    the training step pins.
    """

    def run() -> str:
        from stepguard.step import run_step

        spec = StepSpec(
            name="verify-dataset",
            inputs=(InputSpec(name="dataset", path=dataset_path, manifest=manifest_path,
                              digest=expected_digest or None),),
            isolation=IsolationSpec(mode="process"),
            deadline_s=SHORT_DEADLINE_S,
        )
        receipt = run_step(spec, body=lambda env: None,
                           context=_context(pipeline, run_id, spec.name),
                           settings=_settings(settings_path))
        _copy_file(manifest_path, manifest_out)
        return receipt.to_json()

    return _guard(run)


# -- secure train ---------------------------------------------------------------------------


def _dataset_digest(dataset_receipt: str) -> str:
    producer = _load_receipt(dataset_receipt, "dataset")
    for rec in producer.inputs:
        if rec.name == "dataset":
            if not rec.verified or not rec.digest:
                raise IntegrityError("dataset was not verified by the producer step",
                                     subject=producer.step)
            return rec.digest
    raise ConfigurationError("dataset receipt has no 'dataset' input", subject=producer.step)


def build_train_spec(
    step_spec: str,
    *,
    dataset_path: str,
    dataset_manifest: str,
    dataset_digest: str,
    model_dir: str,
    in_pod: bool | None = None,
) -> StepSpec:
    """The training StepSpec the runner executes: the user's spec plus the dataset input
    (pinned to the digest the verification step saw) and the model output.

    >>> spec = build_train_spec('{"name": "train", "isolation": {"mode": "pod"}}',
    ...     dataset_path="/d", dataset_manifest="/m.json", dataset_digest="sha256:" + "0" * 64,
    ...     model_dir="/out", in_pod=False)
    >>> spec.isolation.mode, spec.inputs[0].digest[:9], spec.outputs[0].name
    ('sandbox', 'sha256:00', 'model')
    """
    import yaml

    try:
        data = yaml.safe_load(step_spec)
    except yaml.YAMLError as exc:
        raise ConfigurationError("step_spec is not valid YAML/JSON", subject="step_spec") from exc
    base = StepSpec.from_dict(data if isinstance(data, dict) else {})
    taken = {i.name for i in base.inputs} | {o.name for o in base.outputs}
    if {"dataset", "model"} & taken:
        raise ConfigurationError(
            "step_spec must not declare 'dataset' or 'model': the component adds them",
            subject="step_spec")
    return replace(
        base,
        inputs=(*base.inputs, InputSpec(name="dataset", path=dataset_path,
                                        manifest=dataset_manifest, digest=dataset_digest)),
        outputs=(*base.outputs, OutputSpec(name="model", path=model_dir)),
        isolation=effective_isolation(base.isolation, in_pod=in_pod),
    )


def _run_forwarding_signals(argv: list[str], env: dict[str, str] | None = None) -> int:
    """Run the step runner; a SIGTERM to this process (pod deletion, KFP run cancelled) is passed
    on so the runner stops the body and revokes the credentials before it exits."""
    proc = subprocess.Popen(argv, env=env)

    def forward(signum: int, frame: object) -> None:
        proc.send_signal(signum)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, forward) if in_main else None
    try:
        return proc.wait()
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:  # we are unwinding on an exception: never leave it behind
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _runner_argv() -> list[str]:
    return [sys.executable, "-m", "stepguard.cli", "exec", "--orchestrator", "kfp"]


def secure_train_step(
    *,
    step_spec: str,
    command: Sequence[str],
    dataset_path: str,
    dataset_manifest: str,
    dataset_receipt: str,
    model_dir: str,
    manifest_out: str,
    pipeline: str = "kfp",
    run_id: str = "",
    settings_path: str = "",
    wrapped_credentials: str = "",
) -> str:
    """Run ``command`` as a secured step through ``stepguard exec`` and return its receipt.

    Credentials are minted by the runner in this process tree and revoked when it ends -- or,
    with ``wrapped_credentials``, handed over by the submitter as a single-use wrapping token the
    runner unwraps once; the receipt (hashed lease ids only) is the sole thing handed back.
    """

    def run() -> str:
        if not command:
            raise ConfigurationError("no training command given", subject="command")
        settings = _settings(settings_path)  # a pod without settings is refused here
        digest = _dataset_digest(dataset_receipt)
        spec = build_train_spec(step_spec, dataset_path=dataset_path,
                                dataset_manifest=dataset_manifest, dataset_digest=digest,
                                model_dir=model_dir)
        ctx = _context(pipeline, run_id, spec.name)
        with _scratch("stepguard-kfp-") as tmp:
            spec_file = tmp / "step.json"
            spec_file.write_text(json.dumps(spec.to_dict()))
            receipt_file = tmp / "receipt.json"
            argv = [*_runner_argv(), "--spec", str(spec_file), "--pipeline", ctx.pipeline,
                    "--run-id", ctx.run_id, "--step-id", ctx.step,
                    "--receipt-out", str(receipt_file), "--", *command]
            # The body's output and the runner's (its receipt, its one-line errors) go to the
            # task log; the receipt itself is read from the file, not parsed from the log.
            from stepguard_kfp._settings import settings_file

            env = dict(os.environ)
            found = settings_file(settings_path)
            if found:  # the runner loads the same settings file
                env["STEPGUARD_CONFIG"] = found
            if in_kfp_pod():
                env.setdefault("STEPGUARD_STATE_DIR", settings.state_dir)
            if wrapped_credentials:
                from stepguard.credentials import WRAPPED_ENV

                env[WRAPPED_ENV] = wrapped_credentials
            returncode = _run_forwarding_signals(argv, env)
            if returncode != 0:
                raise SystemExit(returncode)
            receipt = Receipt.load(receipt_file)
        _copy_file(receipt.output("model").manifest, manifest_out)
        return receipt.to_json()

    return _guard(run)


# -- sign and publish -----------------------------------------------------------------------


def sign_and_publish_step(
    *,
    model_dir: str,
    manifest_path: str,
    train_receipt: str,
    model_name: str,
    model_version: str,
    registry: str = "",
    signer: str = "transit",
    signing_key: str = "",
    pipeline: str = "kfp",
    run_id: str = "",
    settings_path: str = "",
) -> str:
    """Verify the model against the training receipt, then sign and publish exactly those bytes."""

    def run() -> str:
        from stepguard.step import run_step

        trained = _load_receipt(train_receipt, "training").output("model")
        if signer not in ("key", "transit", "sigstore"):
            raise ConfigurationError("unknown signer", subject=signer,
                                     hint="key, transit or sigstore")
        with _scratch("stepguard-publish-") as tmp:
            staged = tmp / "model"
            spec = StepSpec(
                name="sign-and-publish",
                inputs=(InputSpec(name="model", path=model_dir, manifest=manifest_path,
                                  digest=trained.digest),),
                outputs=(OutputSpec(name="model", path=str(staged), publish=PublishSpec(
                    name=model_name, version=model_version, registry=registry or None)),),
                signing=SigningSpec(signer=signer, key=signing_key or None),  # type: ignore[arg-type]
                isolation=IsolationSpec(mode="process"),
                deadline_s=SHORT_DEADLINE_S,
            )

            def body(env: Any) -> None:
                shutil.copytree(env.inputs["model"], env.outputs["model"], dirs_exist_ok=True,
                                symlinks=True)

            receipt = run_step(spec, body=body, context=_context(pipeline, run_id, spec.name),
                               settings=_settings(settings_path))
        published = receipt.output("model")
        if published.digest != trained.digest:
            raise IntegrityError("published model differs from the trained model",
                                 subject=model_name,
                                 details=[f"trained: {trained.digest}",
                                          f"published: {published.digest}"])
        return receipt.to_json()

    return _guard(run)


# -- verify model (gate) --------------------------------------------------------------------


def verify_model_step(
    *,
    publish_receipt: str,
    model_name: str,
    model_version: str,
    signature_policy: str,
    out_dir: str,
    registry: str = "",
    pipeline: str = "kfp",
    run_id: str = "",
    settings_path: str = "",
) -> str:
    """Fetch the published model, verify its signature against the settings policy named
    ``signature_policy`` and its digest against ``publish_receipt``, then hand the verified
    bytes to ``out_dir``.

    Policies live in the platform's stepguard settings (``policies:``), not in the pipeline: a
    pipeline author names the policy the platform defined and cannot weaken it inline.
    """

    def run() -> str:
        from stepguard.step import run_step

        if not signature_policy.strip():
            raise ConfigurationError("a signature policy is required (there is no default)",
                                     subject="signature_policy")
        settings = _settings(settings_path)
        settings.policy(signature_policy)  # an unknown policy fails before any download
        published = _load_receipt(publish_receipt, "publish").output("model")
        spec = StepSpec(
            name="verify-model",
            outputs=(OutputSpec(name="model", path=out_dir),),
            isolation=IsolationSpec(mode="process"),
            deadline_s=SHORT_DEADLINE_S,
        )

        def body(env: Any) -> None:
            dest = Path(env.outputs["model"])
            # The runner created the output dir empty; fetch refuses an existing destination
            # and moves the verified tree into place only after every check passed.
            dest.rmdir()
            fetch_verified(registry or None, model_name, model_version,
                           policy=signature_policy, settings=settings, dest=dest)

        receipt = run_step(spec, body=body, context=_context(pipeline, run_id, spec.name),
                           settings=settings)
        got = receipt.output("model").digest
        if got != published.digest:
            raise IntegrityError("verified model differs from the published model",
                                 subject=f"{model_name}:{model_version}",
                                 details=[f"published: {published.digest}", f"fetched: {got}"])
        return receipt.to_json()

    return _guard(run)


def fetch_verified(registry: str | None, name: str, version: str, *, policy: str,
                   settings: Any, dest: Path) -> Path:
    """Fetch ``name:version`` into ``dest`` (which must not exist), verified against the
    settings policy called ``policy`` before the path is returned."""
    from stepguard.wiring import fetch_verified as fetch

    return Path(fetch(settings, name, version, policy=policy, dest=dest, registry=registry))
