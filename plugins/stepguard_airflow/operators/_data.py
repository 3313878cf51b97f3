"""Operators for the data and model stages: ingest, verify a dataset, sign and publish a model,
and the deployment gate that verifies a published model against an identity policy.

Each is a thin shape over one stepguard step, so each gets the same lifecycle, spans and
receipt as any other step.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperator

from stepguard_airflow._common import (
    execute_step,
    receipt_xcom,
    revoke_on_kill,
)
from stepguard_airflow._failures import step_name, task_failure
from stepguard_airflow.assets import asset_outlets, resolve_receipt, task_receipt
from stepguard_airflow.lineage import LineageMixin
from stepguard_airflow.operators._step import receipt_arg

if TYPE_CHECKING:
    from airflow.sdk import Context

    from stepguard.settings import Settings
    from stepguard.spec import CredentialRequest, SigningSpec, StepSpec

__all__ = [
    "IngestDatasetOperator",
    "SignAndPublishModelOperator",
    "VerifyDatasetOperator",
    "VerifyModelOperator",
]


def _credential(value: CredentialRequest | Mapping[str, Any] | None) -> CredentialRequest | None:
    from stepguard.spec import CredentialRequest

    if value is None or isinstance(value, CredentialRequest):
        return value
    return CredentialRequest.from_dict(dict(value))


def _signing(value: SigningSpec | Mapping[str, Any] | None) -> SigningSpec | None:
    from stepguard.spec import SigningSpec

    if value is None or isinstance(value, SigningSpec):
        return value
    return SigningSpec.from_dict(dict(value))


def _receipt_output(receipt: Any, output: str, subject: str) -> Mapping[str, Any]:
    """The named output record of an upstream receipt (a dict from XCom or JSON text)."""
    from stepguard.errors import ConfigurationError

    data = json.loads(receipt) if isinstance(receipt, str) else receipt
    if not isinstance(data, Mapping):
        raise ConfigurationError("expected an upstream receipt (XCom of a stepguard task)",
                                 subject=subject)
    for rec in data.get("outputs") or ():
        if isinstance(rec, Mapping) and rec.get("name") == output:
            return rec
    names = [r.get("name") for r in data.get("outputs") or () if isinstance(r, Mapping)]
    raise ConfigurationError(f"the upstream receipt has no output {output!r}", subject=subject,
                             hint=f"its outputs: {', '.join(map(str, names)) or 'none'}")


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy regular files only; a symlink or special file in the source is refused."""
    from stepguard.errors import IntegrityError

    if src.is_file():
        shutil.copy2(src, dst / src.name)
        return
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        for name in dirs + files:
            p = Path(root) / name
            if p.is_symlink() or not (p.is_dir() or p.is_file()):
                raise IntegrityError("source holds a symlink or special file; refused",
                                     subject=str(rel / name))
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copy2(Path(root) / name, dst / rel / name)


def _credential_request(value: CredentialRequest | Mapping[str, Any] | None,
                        default_name: str) -> CredentialRequest | None:
    """A credential request whose ``name`` may be left out (``default_name`` then)."""
    if value is None or not isinstance(value, Mapping):
        return _credential(value)
    return _credential({"name": default_name, **value})


def _storage(*creds: CredentialRequest | None) -> tuple[tuple[CredentialRequest, ...], Any]:
    """The spec's credentials and its ``storage`` (the first AWS credential, if any)."""
    from stepguard.spec import StorageSpec

    present = tuple(c for c in creds if c is not None)
    aws = next((c.name for c in present if c.kind.startswith("aws_")), None)
    return present, StorageSpec(credential=aws) if aws else None


def _fetch_s3(url: str, dst: Path, creds: Mapping[str, Any] | None) -> int:
    """Download every object under ``s3://bucket/prefix`` with the step's JIT credentials
    (their values never print; the S3 client is made from them in :mod:`stepguard.wiring`)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from stepguard.errors import IntegrityError, OperationalError, TransientError
    from stepguard.wiring import s3_client

    bucket, _, prefix = url[len("s3://"):].partition("/")
    client = s3_client(creds)
    count = 0
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", ()):
                key = obj["Key"]
                rel = key[len(prefix):].lstrip("/") if prefix else key
                if not rel or key.endswith("/"):
                    continue
                target = (dst / rel).resolve()
                if not target.is_relative_to(dst.resolve()):
                    raise IntegrityError("object key escapes the dataset directory",
                                         subject=key)
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, key, str(target))
                count += 1
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "ClientError"))
        raise OperationalError(f"cannot read the source ({code})", subject=url) from None
    except BotoCoreError as exc:
        raise TransientError(f"cannot read the source ({type(exc).__name__})",
                             subject=url) from None
    if count == 0:
        raise OperationalError("no objects under the source prefix", subject=url)
    return count


class IngestDatasetOperator(LineageMixin, BaseOperator):
    """Fetch a dataset with just-in-time credentials, hash it, and publish it with a manifest.

    :param source: a local directory/file, ``file:///...`` or ``s3://bucket/prefix``
        (templated). S3 is read with the step's credential ``credential`` (an ``aws_*`` kind).
    :param fetch: instead of ``source``, a function ``fetch(step_env, dest)`` that writes the
        dataset into ``dest`` (a database extract, an API pull), with the step's credentials in
        ``step_env.credentials``.
    :param dataset: dataset name in the registry (templated).
    :param version: dataset version, e.g. ``"{{ ds_nodash }}"`` (templated).
    :param credential: the JIT credential used for the fetch (a
        :class:`~stepguard.spec.CredentialRequest` or mapping); none for local sources.
    :param signing: sign and publish the dataset (a :class:`~stepguard.spec.SigningSpec`);
        without it the dataset is hashed into a manifest but not published.
    :param registry: registry URL for publishing (default: the settings' registry).
    :param destination: where the dataset is written (templated): a directory under the task's state
        dir (default ``dataset``) or an object-store location such as
        ``s3://lake/churn/{run_id}`` -- uploaded with checksums, its manifest beside it, so
        steps on other workers can verify it.
    :param storage_credential: the JIT credential (an ``aws_*`` kind; ``name`` defaults to
        ``storage``) for an object-store ``destination`` or an ``s3://`` registry; default: the
        ``credential`` when it is an ``aws_*`` kind.
    :param asset: an Airflow ``Asset`` the output is announced as: its event carries the
        manifest digest, the signer and the receipt (:mod:`stepguard_airflow.assets`).
    :param conn_id: the ``stepguard`` connection.

    The receipt's output ``dataset`` carries the manifest digest that later steps verify.
    """

    template_fields: Sequence[str] = ("source", "dataset", "version", "registry", "destination")
    ui_color = "#d6f5e3"
    _stepguard_secured = True

    def __init__(self, *, dataset: str, version: str, source: str | None = None,
                 fetch: Callable[[Any, Path], object] | None = None,
                 credential: CredentialRequest | Mapping[str, Any] | None = None,
                 registry: str | None = None,
                 signing: SigningSpec | Mapping[str, Any] | None = None,
                 destination: str = "dataset",
                 storage_credential: CredentialRequest | Mapping[str, Any] | None = None,
                 conn_id: str | None = "stepguard_default", asset: Any = None,
                 **kwargs: Any) -> None:
        self.stepguard_assets, outlets = asset_outlets(asset, kwargs.pop("outlets", None))
        super().__init__(outlets=outlets, **kwargs)
        if (source is None) == (fetch is None):
            from stepguard.errors import ConfigurationError

            raise ConfigurationError("give exactly one of 'source' or 'fetch'",
                                     subject=self.task_id)
        self.source = source
        self.fetch = fetch
        self.dataset = dataset
        self.version = version
        self.credential = _credential(credential)
        self.registry = registry
        self.signing = _signing(signing)
        self.destination = destination
        self.storage_credential = _credential_request(storage_credential, "storage")
        self.conn_id = conn_id

    def build_spec(self, settings: Settings) -> StepSpec:
        """The step this operator runs (published when a registry is configured)."""
        from stepguard.spec import IsolationSpec, OutputSpec, PublishSpec, StepSpec

        publish = None
        if self.signing is not None:
            publish = PublishSpec(name=str(self.dataset), version=str(self.version),
                                  registry=self.registry)
        creds, storage = _storage(self.credential, self.storage_credential)
        if self.storage_credential is not None:
            storage = _storage(self.storage_credential)[1]
        return StepSpec(
            name=step_name(self.task_id),
            outputs=(OutputSpec(name="dataset", path=str(self.destination), publish=publish),),
            credentials=creds,
            isolation=IsolationSpec(mode="process"),
            signing=self.signing,
            storage=storage,
        )

    def on_kill(self) -> None:
        revoke_on_kill()

    def execute(self, context: Context) -> Any:
        source = str(self.source)
        cred = self.credential.name if self.credential else None
        fetch = self.fetch

        def body(step_env: Any) -> None:
            dst = step_env.outputs["dataset"]
            if fetch is not None:
                fetch(step_env, dst)
            elif source.startswith("s3://"):
                _fetch_s3(source, dst, step_env.credentials.get(cred) if cred else None)
            else:
                path = Path(source[len("file://"):] if source.startswith("file://") else source)
                _copy_tree(path, dst)

        receipt = execute_step(context=context, spec=self.build_spec, body=body,
                               conn_id=self.conn_id)
        return receipt_xcom(receipt)


class VerifyDatasetOperator(LineageMixin, BaseOperator):
    """Verify a dataset against the manifest its producer recorded; fail on any difference.

    :param dataset: the upstream receipt (e.g. ``ingest.output``) (templated), or an Airflow
        ``Asset``: the receipt of the asset event that triggered this run.
    :param output_name: the output of that receipt to verify (default ``dataset``; for an
        Asset, the output its event announced).
    :param path: where the data is now (default: where the producer wrote it) (templated).
    :param credential: the JIT credential (an ``aws_*`` kind; ``name`` defaults to
        ``storage``) that reads a dataset in object storage.

    A modified, added, missing or swapped file ends the task (no retry) naming the file; tasks
    downstream never start.
    """

    template_fields: Sequence[str] = ("dataset", "path")
    template_fields_renderers: ClassVar[dict[str, str]] = {"dataset": "json"}
    ui_color = "#d6f5e3"
    _stepguard_secured = True

    def __init__(self, *, dataset: Any, output_name: str | None = None,
                 path: str | None = None,
                 credential: CredentialRequest | Mapping[str, Any] | None = None,
                 conn_id: str | None = "stepguard_default", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dataset = receipt_arg(dataset)  # a @task.stepguard call: its receipt
        self.output_name = output_name
        self.path = path
        self.credential = _credential_request(credential, "storage")
        self.conn_id = conn_id

    def execute(self, context: Context) -> Any:
        from stepguard.spec import InputSpec, IsolationSpec, StepSpec

        dataset, announced = task_receipt(context, self.dataset)
        output_name = self.output_name or announced or "dataset"
        rec = _receipt_output(dataset, output_name, f"{self.task_id}.dataset")
        path = self.path or str(rec["path"])
        creds, storage = _storage(self.credential)
        with tempfile.TemporaryDirectory(prefix="stepguard-verify-") as tmp:
            rpath = Path(tmp) / "receipt.json"
            rpath.write_text(json.dumps(dataset) if not isinstance(dataset, str)
                             else dataset, encoding="utf-8")
            spec = StepSpec(
                name=step_name(self.task_id),
                inputs=(InputSpec(name=output_name, path=path, receipt=str(rpath)),),
                isolation=IsolationSpec(mode="process"),
                credentials=creds, storage=storage,
            )
            receipt = execute_step(context=context, spec=spec, body=lambda _env: None,
                                   conn_id=self.conn_id)
        return receipt_xcom(receipt)


class SignAndPublishModelOperator(LineageMixin, BaseOperator):
    """Sign a trained model (OpenSSF model-signing bundle) and publish it to the registry.

    The model is first verified against the training step's receipt (so what is signed is
    exactly what training produced), then copied, hashed, signed and published in one step.

    :param model: the training task's receipt (templated), or an Airflow ``Asset`` (the
        receipt of the asset event that triggered this run).
    :param output_name: that receipt's output holding the model (default ``model``).
    :param name: model name in the registry (templated).
    :param version: model version (templated).
    :param signing: how to sign (:class:`~stepguard.spec.SigningSpec` or mapping): ``key``,
        ``transit`` (Vault Transit key) or ``sigstore``.
    :param registry: registry URL (default: the settings' registry).
    :param credential: the JIT credential (an ``aws_*`` kind; ``name`` defaults to
        ``storage``) that reads a model in object storage and writes an ``s3://`` registry.
    :param asset: an Airflow ``Asset`` the published model is announced as: its event carries the
        manifest digest, the signer and the receipt (:mod:`stepguard_airflow.assets`).
    """

    template_fields: Sequence[str] = ("model", "name", "version", "registry")
    template_fields_renderers: ClassVar[dict[str, str]] = {"model": "json"}
    ui_color = "#d6f5e3"
    _stepguard_secured = True

    def __init__(self, *, model: Any, name: str, version: str,
                 signing: SigningSpec | Mapping[str, Any], output_name: str = "model",
                 registry: str | None = None,
                 credential: CredentialRequest | Mapping[str, Any] | None = None,
                 conn_id: str | None = "stepguard_default", asset: Any = None,
                 **kwargs: Any) -> None:
        self.stepguard_assets, outlets = asset_outlets(asset, kwargs.pop("outlets", None))
        super().__init__(outlets=outlets, **kwargs)
        self.credential = _credential_request(credential, "storage")
        self.model = receipt_arg(model)  # a @task.stepguard call: its receipt
        self.output_name = output_name
        self.name = name
        self.version = version
        self.signing = _signing(signing)
        self.registry = registry
        self.conn_id = conn_id

    def execute(self, context: Context) -> Any:
        from stepguard.spec import (
            InputSpec,
            IsolationSpec,
            OutputSpec,
            PublishSpec,
            StepSpec,
        )

        model = resolve_receipt(context, self.model)
        rec = _receipt_output(model, self.output_name, f"{self.task_id}.model")
        creds, storage = _storage(self.credential)
        spec = StepSpec(
            name=step_name(self.task_id),
            inputs=(InputSpec(name="trained", path=str(rec["path"]), manifest="unused"),),
            outputs=(OutputSpec(name="model", path="model", publish=PublishSpec(
                name=str(self.name), version=str(self.version), registry=self.registry)),),
            isolation=IsolationSpec(mode="process"),
            signing=self.signing,
            credentials=creds, storage=storage,
        )

        def body(step_env: Any) -> None:
            _copy_tree(step_env.inputs["trained"], step_env.outputs["model"])

        receipt = execute_step(context=context, spec=spec, body=body, conn_id=self.conn_id,
                               receipts={"trained": model})
        return receipt_xcom(receipt)


class VerifyModelOperator(LineageMixin, BaseOperator):
    """The deployment gate: fetch a published model, verifying its signature under a policy.

    The registry returns the model only after the signature bundle, the identity policy, every
    file digest and the format checks pass; the verified files become this step's output, so the
    receipt records their digest and the signer. Deployment takes this receipt as its input.

    :param model: the publishing task's receipt (templated); its ``published`` record names the
        registry, model and version. An Airflow ``Asset``: the receipt of the asset event that
        triggered this run.
    :param policy: the name of a verification policy in stepguard settings (``policies:``);
        there is no default -- a gate without a policy is refused at parse time.
    :param output_name: the receipt's output holding the model (default ``model``).
    :param credential: the JIT credential (an ``aws_*`` kind; ``name`` defaults to
        ``storage``) that reads an ``s3://`` registry and writes an object-store ``destination``.
    :param destination: where the verified model goes (templated): a directory under the task's
        state dir (default: ``output_name``) or an object-store location.
    :param asset: an Airflow ``Asset`` the verified model is announced as: its event carries the
        manifest digest, the signer and the receipt (:mod:`stepguard_airflow.assets`).
    """

    template_fields: Sequence[str] = ("model", "policy", "destination")
    template_fields_renderers: ClassVar[dict[str, str]] = {"model": "json"}
    ui_color = "#d6f5e3"
    _stepguard_secured = True

    def __init__(self, *, model: Any, policy: str, output_name: str = "model",
                 credential: CredentialRequest | Mapping[str, Any] | None = None,
                 destination: str | None = None,
                 conn_id: str | None = "stepguard_default", asset: Any = None,
                 **kwargs: Any) -> None:
        self.stepguard_assets, outlets = asset_outlets(asset, kwargs.pop("outlets", None))
        super().__init__(outlets=outlets, **kwargs)
        if not policy:
            from stepguard.errors import ConfigurationError

            raise ConfigurationError("a verification gate needs an explicit policy",
                                     subject=f"{self.task_id}.policy")
        self.model = receipt_arg(model)  # a @task.stepguard call: its receipt
        self.policy = policy
        self.output_name = output_name
        self.credential = _credential_request(credential, "storage")
        self.destination = destination
        self.conn_id = conn_id

    def execute(self, context: Context) -> Any:
        from stepguard.errors import ConfigurationError
        from stepguard.spec import IsolationSpec, OutputSpec, StepSpec

        rec = _receipt_output(resolve_receipt(context, self.model), self.output_name,
                              f"{self.task_id}.model")
        published = rec.get("published")
        if not isinstance(published, Mapping):
            raise task_failure(step_name(self.task_id), ConfigurationError(
                "the upstream output was not published", subject=f"{self.task_id}.model"))
        registry, name, version = (str(published["registry"]), str(published["name"]),
                                   str(published["version"]))
        policy_name = str(self.policy)
        used: dict[str, Any] = {}
        # The gate's facts for its lineage facets; the body adds the signer it verified.
        gate: dict[str, Any] = {
            "policy": policy_name, "registry": registry, "name": name, "version": version,
            "uri": published.get("uri"), "bundle_uri": published.get("bundle_uri"),
            "bundle_digest": published.get("bundle_digest"), "signer": None}

        from dataclasses import replace

        # The body is this operator's own fetch, in this process: it needs the values.
        creds, storage = _storage(replace(self.credential, delivery="env")
                                  if self.credential else None)
        cred = self.credential.name if self.credential else None
        where = str(self.destination or self.output_name)

        def spec_for(settings: Settings) -> StepSpec:
            settings.policy(policy_name)  # an unknown policy fails before anything is fetched
            used["settings"] = settings
            return StepSpec(name=step_name(self.task_id),
                            outputs=(OutputSpec(name=self.output_name, path=where),),
                            isolation=IsolationSpec(mode="process"),
                            credentials=creds, storage=storage)

        expected = str(rec.get("digest") or "")

        def body(step_env: Any) -> None:
            from stepguard.errors import IntegrityError
            from stepguard.integrity import create_manifest
            from stepguard.wiring import s3_client

            dest = step_env.outputs[self.output_name]
            client = s3_client(step_env.credentials[cred]) \
                if cred and registry.startswith("s3://") else None
            used["signer"] = gate["signer"] = _fetch_verified(
                used["settings"], registry=registry, name=name, version=version,
                policy_name=policy_name, dest=dest, s3=client)
            # Validly signed is not enough: it must be the model the publishing step hashed.
            got = create_manifest(dest).digest
            if got != expected:
                raise IntegrityError(
                    "the registry's model is not the one the publishing step hashed",
                    subject=f"{name}:{version}",
                    details=[f"publishing receipt: {expected or 'no digest'}",
                             f"fetched: {got}"])

        receipt = execute_step(context=context, spec=spec_for, body=body, conn_id=self.conn_id,
                               gate=gate)
        # The verdict, for dashboards and deployment tooling; the receipt stays a pure receipt.
        # The signer is the one the policy accepted in the fetched bundle, not the publishing
        # receipt's claim.
        context["ti"].xcom_push(key="gate", value={
            "policy": policy_name, "registry": registry, "name": name, "version": version,
            "signer": used["signer"], "digest": receipt.outputs[0].digest})
        return receipt_xcom(receipt)


def _fetch_verified(settings: Settings, *, registry: str, name: str, version: str,
                    policy_name: str, dest: Path, s3: Any = None) -> str:
    """Fetch ``name:version`` into ``dest``, verified under the named settings policy; return
    the verified signer."""
    from stepguard.wiring import fetch_verified_model

    fetched = fetch_verified_model(settings, name, version, policy=policy_name,
                                   dest=dest / ".staged", registry=registry, s3_client=s3)
    staged = fetched.path
    # Only verified bytes appear under the output name.
    for item in list(staged.iterdir()):
        item.rename(dest / item.name)
    staged.rmdir()
    return fetched.signer
