# ruff: noqa: PLR0917  (KFP components take their parameters by name; the count is the interface)
"""The stepguard KFP components: each a thin call into the SDK, run from the pinned image.

Component bodies are copied verbatim into the compiled YAML and executed by the KFP executor in
the pod, so each one only imports :mod:`stepguard_kfp._runtime` (already in the image) and hands
over its arguments. Receipts travel between components as JSON string outputs, and manifests as
small artifacts; credentials never travel: each component mints its own from Vault in the pod.

``install_kfp_package=False`` and no ``packages_to_install``: nothing is installed at run time.
The image is the one image setting (``pods.image``; see :mod:`stepguard_kfp._imageref`).
"""

# No "from __future__ import annotations": KFP reads the real annotation objects.

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from stepguard_kfp._imageref import component_image

#: The runtime image, from the one image setting (``pods.image``) when this module is imported.
IMAGE = component_image(strict=False)

__all__ = [
    "secure_train",
    "secure_train_container",
    "sign_and_publish",
    "verify_dataset",
    "verify_model",
]


@dsl.component(base_image=IMAGE, install_kfp_package=False)  # type: ignore[untyped-decorator]
def verify_dataset(
    dataset_path: str,
    manifest_path: str,
    dataset_manifest: Output[Artifact],
    expected_digest: str = "",
    pipeline: str = "kfp",
    run_id: str = "",
    settings_path: str = "",
) -> str:
    """Verify a dataset against its manifest (and an optional pinned root digest).

    Returns the step receipt (JSON) and the verified manifest as an artifact for the next step.
    Fails the task with IntegrityError on any difference.
    """
    from stepguard_kfp._runtime import verify_dataset_step

    return verify_dataset_step(
        dataset_path=dataset_path, manifest_path=manifest_path,
        manifest_out=dataset_manifest.path, expected_digest=expected_digest,
        pipeline=pipeline, run_id=run_id, settings_path=settings_path,
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)  # type: ignore[untyped-decorator]
def secure_train(
    step_spec: str,
    command: list,  # type: ignore[type-arg]
    dataset_path: str,
    dataset_manifest: Input[Artifact],
    dataset_receipt: str,
    model: Output[Model],
    model_manifest: Output[Artifact],
    pipeline: str = "kfp",
    run_id: str = "",
    settings_path: str = "",
    wrapped_credentials: str = "",
) -> str:
    """Run the training command through the step runner (``stepguard exec``).

    ``step_spec`` is the training StepSpec (YAML/JSON) without inputs/outputs: the component adds
    the dataset (pinned to the digest in ``dataset_receipt``) and the model output. Inside a KFP
    pod the pod is the isolation boundary; outside one (``kfp.local``) the body runs in the
    bubblewrap sandbox with the same spec. ``wrapped_credentials``: a single-use wrapping token
    for the step's credentials, minted by the submitter (else the runner logs in to Vault in the
    pod). Returns the step receipt (JSON).
    """
    from stepguard_kfp._runtime import secure_train_step

    return secure_train_step(
        step_spec=step_spec, command=[str(c) for c in command], dataset_path=dataset_path,
        dataset_manifest=dataset_manifest.path, dataset_receipt=dataset_receipt,
        model_dir=model.path, manifest_out=model_manifest.path, pipeline=pipeline, run_id=run_id,
        settings_path=settings_path, wrapped_credentials=wrapped_credentials,
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)  # type: ignore[untyped-decorator]
def sign_and_publish(
    model: Input[Model],
    model_manifest: Input[Artifact],
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
    """Verify the model against the training receipt, then sign and publish it.

    ``signer``/``signing_key`` name the signer (``transit`` + a Vault Transit key name, or
    ``key`` + a path to a PEM key mounted into the pod): a reference, never key material.
    Returns the step receipt (JSON) with the publish record.
    """
    from stepguard_kfp._runtime import sign_and_publish_step

    return sign_and_publish_step(
        model_dir=model.path, manifest_path=model_manifest.path, train_receipt=train_receipt,
        model_name=model_name, model_version=model_version, registry=registry,
        signer=signer, signing_key=signing_key, pipeline=pipeline, run_id=run_id,
        settings_path=settings_path,
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)  # type: ignore[untyped-decorator]
def verify_model(
    publish_receipt: str,
    model_name: str,
    model_version: str,
    signature_policy: str,
    verified_model: Output[Model],
    registry: str = "",
    pipeline: str = "kfp",
    run_id: str = "",
    settings_path: str = "",
) -> str:
    """The deployment gate: fetch the model and verify its signature against an explicit policy.

    ``signature_policy`` names a policy in the platform's stepguard settings (``policies:``);
    there is no default policy. Refuses (SignatureError) a model whose signature does not match,
    and (IntegrityError) one whose digest differs from ``publish_receipt``. The verified model is
    copied to ``verified_model`` for the serving step. Returns the step receipt (JSON).
    """
    from stepguard_kfp._runtime import verify_model_step

    return verify_model_step(
        publish_receipt=publish_receipt, model_name=model_name, model_version=model_version,
        signature_policy=signature_policy, out_dir=verified_model.path, registry=registry,
        pipeline=pipeline, run_id=run_id, settings_path=settings_path,
    )


@dsl.container_component  # type: ignore[untyped-decorator]
def secure_train_container(
    step_spec: str,
    command: list,  # type: ignore[type-arg]
    dataset_path: str,
    dataset_manifest: Input[Artifact],
    dataset_receipt: str,
    model: Output[Model],
    model_manifest: Output[Artifact],
    receipt: dsl.OutputPath(str),  # type: ignore[valid-type]
    pipeline: str = "kfp",
    run_id: str = "",
    settings_path: str = "",
    wrapped_credentials: str = "",
) -> dsl.ContainerSpec:
    """Container form of :func:`secure_train` for clusters: the step runner is the entrypoint.

    ``python3 -m stepguard_kfp.train`` completes the spec (dataset input pinned to the receipt,
    model output) and runs ``stepguard exec --spec ... -- COMMAND``; no Python function source
    is shipped in the YAML. kfp.local's SubprocessRunner cannot run container components: use
    :func:`secure_train` there (same runtime code).
    """
    return dsl.ContainerSpec(
        image=IMAGE,
        command=["python3", "-m", "stepguard_kfp.train"],
        args=[
            "--step-spec", step_spec,
            "--command-json", command,
            "--dataset-path", dataset_path,
            "--dataset-manifest", dataset_manifest.path,
            "--dataset-receipt", dataset_receipt,
            "--model-dir", model.path,
            "--manifest-out", model_manifest.path,
            "--receipt-out", receipt,
            "--pipeline", pipeline,
            "--run-id", run_id,
            "--settings-path", settings_path,
            "--wrapped-credentials", wrapped_credentials,
        ],
    )
