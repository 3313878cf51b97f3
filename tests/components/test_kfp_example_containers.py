"""The example KFP pipeline with every component in a container of the runtime image.

``dags_examples/kfp_secure_training.py --local --containers``: kfp.local.DockerRunner on podman's
Docker API, the image built from this checkout (stepguard.testing.podman.build_image), the dev
stack on loopback. verify dataset -> secure train -> sign + publish -> verify gate, each task in
its own container (uid 65534, read-only root, no capabilities), Vault by JWT login from the
mounted settings file, the registry and receipts under the pipeline root (the one mount).
Skipped, with podman's reason, where podman cannot run.
"""

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("kfp")
pytest.importorskip("docker")

from stepguard.testing.podman import unavailable  # noqa: E402

REASON = unavailable()
pytestmark = [
    pytest.mark.kfp, pytest.mark.services, pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:You may be attemping:RuntimeWarning"),
    pytest.mark.skipif(REASON is not None, reason=str(REASON)),
]

ROOT = Path(__file__).resolve().parents[2]
CANARY = "kfp-example-container-canary-7a41"


def _example() -> Any:
    spec = importlib.util.spec_from_file_location(
        "kfp_secure_training_containers", ROOT / "dags_examples" / "kfp_secure_training.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def image() -> str:
    from stepguard.testing.podman import build_image

    return build_image()


@pytest.fixture
def world(dev_stack: Any, mint_jwt: Any, vault_client: Any, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Pipeline root with the dataset, a JWT standing in for the projected token, settings."""
    from stepguard.integrity import create_manifest
    from stepguard.testing.examples import customer_rows, write_csv

    vault_client.secrets.kv.v2.create_or_update_secret(
        path="stepguard/tracking", secret={"token": CANARY}, mount_point="secret")
    root = tmp_path / "kfp"
    data = root / "dataset"
    data.mkdir(parents=True)
    write_csv(data, customer_rows(120))
    manifest = root / "dataset.manifest.json"
    manifest.write_text(create_manifest(data).to_json())
    token = root / "vault-token"
    token.write_text(mint_jwt(sub="kfp-example", ttl=600))
    for sub in ("registry", "audit"):
        (root / sub).mkdir()
    settings = tmp_path / "stepguard.yaml"  # the host's file; the example copies it in
    settings.write_text(yaml.safe_dump({
        "vault": {"addr": dev_stack.vault_addr, "auth": "jwt", "role": dev_stack.jwt_role,
                  "jwt_path": str(token)},
        "registry": {"url": f"file://{root / 'registry'}"},
        "audit": {"exporter": "jsonl", "path": str(root / "audit" / "audit.jsonl")},
        "policies": {"release": {"kind": "transit", "key": "stepguard-signing",
                                 "min_version": 1}},
    }))
    for p in [root, *root.rglob("*")]:  # the containers run as 65534
        os.chmod(p, 0o777 if p.is_dir() else 0o644)
    for var in ("VAULT_TOKEN", "BAO_TOKEN", "VAULT_ROLE_ID", "VAULT_SECRET_ID_FILE",
                "STEPGUARD_STATE_DIR", "STEPGUARD_AUDIT_EXPORTER", "STEPGUARD_AUDIT_PATH",
                "STEPGUARD_REGISTRY_URL", "STEPGUARD_PODS_IMAGE", "DOCKER_HOST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("STEPGUARD_CONFIG", str(settings))
    return {"root": root, "data": data, "manifest": manifest}


def _receipt(root: Path, task: str) -> dict[str, Any]:
    """The receipt a task handed on: its ``Output`` in the executor output KFP read back from
    the container (the step's own state directory was the container's tmpfs, gone with it)."""
    (found,) = sorted(root.glob(f"*/{task}/executor_output.json"))
    out = json.loads(found.read_text())
    return json.loads(out["parameterValues"]["Output"])  # type: ignore[no-any-return]


def test_example_pipeline_runs_every_component_in_the_runtime_image(
        world: dict[str, Path], image: str, capfd: Any) -> None:
    from kfp import compiler

    from stepguard.receipt import Receipt

    example = _example()
    root = world["root"]
    gate = Receipt.from_json(example.run_local(
        root, containers=True, image=image, dataset_path=str(world["data"]),
        manifest_path=str(world["manifest"]), model_name="churn-model", model_version="1",
        train_command=example.TRAIN_COMMAND))
    assert gate.status == "succeeded" and gate.context.orchestrator == "kfp"

    verify = _receipt(root, "verify-dataset")
    train = _receipt(root, "secure-train")
    publish = _receipt(root, "sign-and-publish")
    # Chain of custody across four containers: train re-verified the digest verify saw,
    # publish signed exactly the trained bytes, the gate fetched exactly the published ones.
    dataset_digest = verify["inputs"][0]["digest"]
    assert train["inputs"][0]["digest"] == dataset_digest and train["inputs"][0]["verified"]
    model_digest = train["outputs"][0]["digest"]
    assert publish["inputs"][0]["digest"] == model_digest
    assert publish["outputs"][0]["digest"] == model_digest
    assert gate.output("model").digest == model_digest
    signer = publish["outputs"][0]["published"]["signer"]
    assert signer.startswith("transit:")
    # The gate accepted that signer under the release policy, read from the bundle.
    (checked,) = [v for v in gate.verifications if v.kind == "gate"]
    assert checked.policy == "release" and checked.verified and checked.signer == signer
    for rec in (verify, train, publish):
        assert rec["status"] == "succeeded" and rec["context"]["orchestrator"] == "kfp"
    # The runner took the container for the training pod (the pod is the boundary), where the
    # subprocess runner puts the body in the bubblewrap sandbox.
    assert train["isolation"]["mode"] == "process"
    assert [c["name"] for c in train["credentials"]] == ["tracking"]
    # The training body got the credential (its hash), which is nowhere in the outputs.
    (metrics,) = root.glob("*/secure-train/model/metrics.json")
    assert json.loads(metrics.read_text())["tracking_token_sha256"] == hashlib.sha256(
        CANARY.encode()).hexdigest()
    out = capfd.readouterr()
    assert CANARY not in out.out + out.err
    for p in root.rglob("*"):
        if p.is_file():
            assert CANARY.encode() not in p.read_bytes(), p
    assert out.out.count("stepguard: container exit status 0") == 4

    # The compiled IR names the image the containers ran: its real digest, never the
    # placeholder.
    os.environ["STEPGUARD_PODS_IMAGE"] = image
    try:
        compiler.Compiler().compile(example.secure_training, str(root / "ir.yaml"))
    finally:
        del os.environ["STEPGUARD_PODS_IMAGE"]
    ir = next(yaml.safe_load_all((root / "ir.yaml").read_text()))
    images = {ex["container"]["image"] for ex in ir["deploymentSpec"]["executors"].values()}
    assert images == {image} and "@sha256:" + "0" * 64 not in image
