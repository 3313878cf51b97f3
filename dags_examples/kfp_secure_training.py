"""The secured training pipeline for Kubeflow Pipelines 2.

verify dataset -> secure train -> sign + publish -> verify gate

* **verify dataset** checks every file of the dataset against its manifest (and, when given, a
  pinned root digest) before any GPU is scheduled.
* **secure train** runs the training command through the step runner (``stepguard exec``): the
  dataset is verified again at the point of use, pinned to the digest the first step saw; a
  just-in-time KV credential is minted from Vault for this step only; the body runs with no
  network in a restricted pod (on a cluster) or the bubblewrap sandbox (``kfp.local``); the
  model is hashed into a manifest.
* **sign + publish** verifies the model against the training receipt and signs exactly those
  bytes (Vault Transit by default) into the registry.
* **verify gate** fetches the model back and verifies its signature under the platform's named
  policy and its digest against the publish receipt: only then is it handed to serving.

Receipts (JSON) and manifests flow between the tasks; credentials never do.

Compile for a cluster (the runtime image is the one image setting; the all-zero placeholder is
refused; every task mounts the platform's ``stepguard-settings`` ConfigMap)::

    STEPGUARD_PODS_IMAGE=REPO@sha256:DIGEST \
        .venv/bin/python dags_examples/kfp_secure_training.py --compile secure_training.yaml

Run locally through ``kfp.local`` against the dev stack (``stepguard dev up``, then source its
env file and point ``STEPGUARD_CONFIG`` at settings with a registry and a ``release`` policy)::

    .venv/bin/python dags_examples/kfp_secure_training.py --local --dataset DIR --manifest FILE

Every task is hardened for a cluster, which takes the runtime image from ``pods.image``: set it
for ``--local`` too (any pinned digest; the subprocess runner starts no container).

``--containers`` (with ``--local``) runs every component in a container of the runtime image
instead: ``kfp.local.DockerRunner`` on podman's Docker API (:mod:`stepguard.testing.kfpdocker`),
the image built from this checkout (:func:`stepguard.testing.podman.build_image`, which becomes
``pods.image``), on the host's network (the dev stack listens on loopback). Only the pipeline
root is mounted in the containers, at the same path: the dataset, the manifest and every path
the settings name (registry, audit log, Vault CA or JWT file) must lie under
``--pipeline-root``. The settings file (``STEPGUARD_CONFIG``) is copied there and handed to the
components as ``STEPGUARD_CONFIG``, as the mounted settings ConfigMap is in a pod::

    .venv/bin/python dags_examples/kfp_secure_training.py --local --containers \
        --pipeline-root ROOT --dataset ROOT/data --manifest ROOT/data.manifest.json
"""

# ruff: noqa: PLR0917  (a KFP pipeline takes its parameters by name)
import argparse
import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from kfp import dsl

from stepguard.spec import IsolationSpec, StepSpec
from stepguard.testing.examples import TRAIN_SCRIPT
from stepguard_kfp import (
    harden,
    secure_train,
    sign_and_publish,
    use_settings,
    verify_dataset,
    verify_model,
)

PIPELINE_NAME = "stepguard-secure-training"

# The training body: the churn example's logistic regression (stepguard.testing.examples), plus
# proof that the credential minted for this step arrived, without writing it anywhere. It sees
# only its verified input, its output directory and that credential; no network.
TRAIN_CODE = TRAIN_SCRIPT + r"""
import hashlib
token = os.environ.get("TRACKING_TOKEN", "")
metrics = json.loads((out / "metrics.json").read_text())
metrics["tracking_token_sha256"] = hashlib.sha256(token.encode()).hexdigest() if token else None
(out / "metrics.json").write_text(json.dumps(metrics))
"""

#: The training step: a KV credential for the (imaginary) experiment tracker, no network,
#: restricted pod resources, 15 minutes. The component adds the dataset input and model output.
TRAIN_STEP = StepSpec.from_dict({
    "name": "train",
    "deadline_s": 900,
    "credentials": [{"name": "tracking", "kind": "kv", "path": "stepguard/tracking"}],
    "isolation": {"mode": "pod", "network": "none", "cpu": "2", "memory": "4Gi"},
})

#: Isolation of the short verification/publishing pods on a cluster: they talk to Vault and the
#: registry, nothing else (the NetworkPolicy is the platform's; see docs/concepts/kfp.md).
SHORT_STEP = IsolationSpec(mode="pod", cpu="1", memory="1Gi",
                           network=("vault.vault.svc:8200", "minio-service.kubeflow.svc:9000"))

#: Default training command (``python3`` is the image's stepguard environment).
TRAIN_COMMAND = ["python3", "-c", TRAIN_CODE]


def _secure_training(
    dataset_path: str,
    manifest_path: str,
    model_name: str,
    model_version: str,
    dataset_digest: str = "",
    registry: str = "",
    signer: str = "transit",
    signing_key: str = "stepguard-signing",
    signature_policy: str = "release",
    train_command: list = TRAIN_COMMAND,  # type: ignore[type-arg]  # KFP reads the bare type
) -> str:
    """The pipeline; its output is the gate's receipt (JSON)."""
    run = {"pipeline": dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
           "run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}

    verified = verify_dataset(dataset_path=dataset_path, manifest_path=manifest_path,
                              expected_digest=dataset_digest, **run)
    verified.set_display_name("verify dataset")
    harden(verified, SHORT_STEP, deadline_s=600, pipeline=PIPELINE_NAME)
    use_settings(verified)

    trained = secure_train(
        step_spec=json.dumps(TRAIN_STEP.to_dict()),
        command=train_command,
        dataset_path=dataset_path,
        dataset_manifest=verified.outputs["dataset_manifest"],
        dataset_receipt=verified.outputs["Output"],
        **run,
    )
    trained.set_display_name("secure train")
    harden(trained, TRAIN_STEP, pipeline=PIPELINE_NAME)
    use_settings(trained, vault_auth="jwt")

    published = sign_and_publish(
        model=trained.outputs["model"],
        model_manifest=trained.outputs["model_manifest"],
        train_receipt=trained.outputs["Output"],
        model_name=model_name, model_version=model_version, registry=registry,
        signer=signer, signing_key=signing_key, **run,
    )
    published.set_display_name("sign and publish")
    harden(published, SHORT_STEP, deadline_s=600, pipeline=PIPELINE_NAME)
    use_settings(published, vault_auth="jwt")

    gate = verify_model(
        publish_receipt=published.outputs["Output"],
        model_name=model_name, model_version=model_version,
        signature_policy=signature_policy, registry=registry, **run,
    )
    gate.set_display_name("verify gate")
    harden(gate, SHORT_STEP, deadline_s=600, pipeline=PIPELINE_NAME)
    use_settings(gate, vault_auth="jwt")
    return gate.outputs["Output"]  # type: ignore[no-any-return]


def pipeline() -> Any:
    """The pipeline, built (and every task hardened) now, with the image ``pods.image`` names
    now. Raises ConfigurationError where ``pods.image`` is not set or is the placeholder."""
    return dsl.pipeline(
        name=PIPELINE_NAME,
        description="verify dataset -> secure train -> sign+publish -> verify gate",
    )(_secure_training)


def __getattr__(name: str) -> Any:
    if name == "secure_training":  # built on use: importing the example needs no settings
        return pipeline()
    raise AttributeError(name)


#: The host's variables handed to the component containers when set (Vault login by AppRole,
#: the object store, the OTLP collector); every other setting comes from the settings file.
CONTAINER_ENV = ("VAULT_ADDR", "VAULT_ROLE_ID", "VAULT_SECRET_ID_FILE", "VAULT_CACERT",
                 "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_DEFAULT_REGION", "OTEL_EXPORTER_OTLP_ENDPOINT", "STEPGUARD_AUDIT_EXPORTER")


@contextlib.contextmanager
def _containers(pipeline_root: Path, image: str | None,
                env: Mapping[str, str] | None) -> Iterator[Any]:
    """DockerRunner on podman for the block, with ``pods.image`` set to the runtime image."""
    from stepguard.testing.kfpdocker import container_runner, docker_api, real_exit_codes
    from stepguard.testing.podman import build_image

    image = image or build_image()
    handed = {k: os.environ[k] for k in CONTAINER_ENV if os.environ.get(k)}
    config = os.environ.get("STEPGUARD_CONFIG")
    if config:  # the mounted settings file: under the pipeline root, readable by uid 65534
        mounted = pipeline_root / ".stepguard" / "stepguard.yaml"
        mounted.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(config, mounted)
        mounted.parent.chmod(0o755)
        mounted.chmod(0o644)
        handed["STEPGUARD_CONFIG"] = str(mounted)
    handed.update(env or {})
    previous = os.environ.get("STEPGUARD_PODS_IMAGE")
    os.environ["STEPGUARD_PODS_IMAGE"] = image
    try:
        with docker_api(), real_exit_codes():
            yield container_runner(env=handed, network="host", name=PIPELINE_NAME)
    finally:
        if previous is None:
            os.environ.pop("STEPGUARD_PODS_IMAGE", None)
        else:
            os.environ["STEPGUARD_PODS_IMAGE"] = previous


def run_local(pipeline_root: Path, *, containers: bool = False, image: str | None = None,
              env: Mapping[str, str] | None = None, **arguments: Any) -> str:
    """Run the pipeline through ``kfp.local``; returns the gate's receipt.

    By default ``SubprocessRunner``: settings (Vault, registry, policies, audit) come from the
    environment / ``STEPGUARD_CONFIG`` exactly as in a pod. ``containers=True`` runs each
    component in a container of ``image`` (default: :func:`stepguard.testing.podman.build_image`)
    instead, as the module docs say; ``env`` adds variables to every container. Raises
    RuntimeError naming the failed task.
    """
    from kfp import local

    with contextlib.ExitStack() as stack:
        if containers:
            runner = stack.enter_context(_containers(pipeline_root, image, env))
        else:
            runner = local.SubprocessRunner(use_venv=False)
        local.init(runner=runner, pipeline_root=str(pipeline_root), raise_on_error=True)
        run = pipeline()(**arguments)
        return str(run.output)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile", metavar="PATH", help="write the pipeline IR YAML")
    p.add_argument("--local", action="store_true", help="run through kfp.local")
    p.add_argument("--containers", action="store_true",
                   help="with --local: every component in a container of the runtime image "
                        "(podman's Docker API)")
    p.add_argument("--dataset")
    p.add_argument("--manifest")
    p.add_argument("--model-name", default="churn-model")
    p.add_argument("--model-version", default="1")
    p.add_argument("--pipeline-root", default=".stepguard/kfp")
    args = p.parse_args(argv)
    if args.compile:
        from kfp import compiler

        from stepguard.errors import StepguardError
        from stepguard_kfp._imageref import assert_ir_runnable

        try:
            # A cluster cannot pull the placeholder: set STEPGUARD_PODS_IMAGE (pods.image).
            compiler.Compiler().compile(pipeline(), args.compile)
            assert_ir_runnable(args.compile)
        except StepguardError as err:
            Path(args.compile).unlink(missing_ok=True)
            print(f"stepguard: error: {err.diagnostics()}", file=sys.stderr)
            return err.exit_code
        print(args.compile)
    if args.local:
        if not (args.dataset and args.manifest):
            p.error("--local needs --dataset and --manifest")
        # In a container, python3 is the image's stepguard environment; here, this interpreter.
        command = TRAIN_COMMAND if args.containers else [sys.executable, "-c", TRAIN_CODE]
        from stepguard.errors import StepguardError

        try:
            receipt = run_local(Path(args.pipeline_root).absolute(), containers=args.containers,
                                dataset_path=str(Path(args.dataset).absolute()),
                                manifest_path=str(Path(args.manifest).absolute()),
                                model_name=args.model_name, model_version=args.model_version,
                                train_command=command)
        except StepguardError as err:  # e.g. pods.image not set, podman unavailable
            print(f"stepguard: error: {err.diagnostics()}", file=sys.stderr)
            return err.exit_code
        print(receipt)
    if not (args.compile or args.local):
        p.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
