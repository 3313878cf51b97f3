"""The training component runs in the real runtime image: kfp.local.DockerRunner on podman.

The image is built from this checkout's wheel (stepguard.testing.podman, cached by input hash);
the Docker API is podman's own service. Skipped, with podman's reason, where podman cannot run.
"""

import json
import os
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("kfp")
pytest.importorskip("docker")

from stepguard.testing.podman import unavailable  # noqa: E402

REASON = unavailable()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=str(REASON))]

BODY = ("import os, pathlib, json; out = pathlib.Path(os.environ['STEPGUARD_OUTPUT_MODEL']); "
        "data = pathlib.Path(os.environ['STEPGUARD_INPUT_DATASET']); "
        "root_rw = os.access('/usr', os.W_OK); "
        "(out / 'model.json').write_text(json.dumps({'uid': os.getuid(), 'root_rw': root_rw, "
        "'rows': len((data / 'train.csv').read_text().splitlines())}))")


@pytest.fixture(scope="module")
def image() -> str:
    from stepguard.testing.podman import build_image

    return build_image()


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Pipeline root (shared with the container at the same path), a verified dataset, settings."""
    from stepguard.integrity import create_manifest
    from stepguard_kfp._runtime import verify_dataset_step

    root = tmp_path / "kfp"
    data = root / "inputs" / "data"
    data.mkdir(parents=True)
    (data / "train.csv").write_text("x,y\n1,0\n2,1\n3,0\n")
    manifest = root / "inputs" / "data.manifest.json"
    manifest.write_text(create_manifest(data).to_json())
    for var in ("STEPGUARD_CONFIG", "KFP_POD_NAME", "KFP_POD_UID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("STEPGUARD_STATE_DIR", str(tmp_path / "host-state"))
    monkeypatch.setenv("STEPGUARD_AUDIT_EXPORTER", "none")
    receipt = verify_dataset_step(dataset_path=str(data), manifest_path=str(manifest),
                                  manifest_out=str(root / "inputs" / "handed.json"))
    settings = root / "inputs" / "stepguard.yaml"
    settings.write_text("audit: {exporter: jsonl}\n")
    for p in [root, *root.rglob("*")]:  # the container runs as 65534
        os.chmod(p, 0o777 if p.is_dir() else 0o644)
    return {"root": root, "data": data, "receipt": receipt, "settings": settings}


def _run(world: dict[str, Any], image: str, *, step: dict[str, Any] | None = None,
         body: str = BODY, network: str = "none", wrapped: str = "") -> str:
    from kfp import dsl, local

    from stepguard.testing.kfpdocker import container_runner, docker_api, real_exit_codes
    from stepguard_kfp._components import secure_train_container
    from stepguard_kfp._imageref import set_task_image

    root = world["root"]
    spec = json.dumps(step or {"name": "train", "deadline_s": 120, "isolation": {"mode": "pod"}})

    @dsl.pipeline(name="train-in-container")
    def pipeline(receipt: str) -> str:
        manifest = dsl.importer(artifact_uri=str(root / "inputs" / "handed.json"),
                                artifact_class=dsl.Artifact)
        task = secure_train_container(
            step_spec=spec, command=["python3", "-c", body], dataset_path=str(world["data"]),
            dataset_manifest=manifest.output, dataset_receipt=receipt,
            settings_path=str(world["settings"]), wrapped_credentials=wrapped)
        set_task_image(task, image)
        return task.outputs["receipt"]  # type: ignore[no-any-return]

    with docker_api(), real_exit_codes():
        local.init(runner=container_runner(name="train", network=network),
                   pipeline_root=str(root),
                   raise_on_error=True)
        return str(pipeline(receipt=world["receipt"]).output)


def test_training_component_runs_in_the_runtime_image(world: dict[str, Any],
                                                      image: str) -> None:
    from stepguard.receipt import Receipt

    receipt = Receipt.from_json(_run(world, image))
    assert receipt.status == "succeeded"
    (dataset,) = receipt.inputs
    assert dataset.verified and dataset.digest == json.loads(world["receipt"])["inputs"][0][
        "digest"]
    model = receipt.output("model")
    found = list(world["root"].rglob("model.json"))
    assert len(found) == 1, found
    facts = json.loads(found[0].read_text())
    assert facts == {"uid": 65534, "root_rw": False, "rows": 4}
    assert model.digest.startswith("sha256:")


def test_tampered_dataset_stops_the_container_before_training(world: dict[str, Any],
                                                              image: str, capfd: Any) -> None:
    (world["data"] / "train.csv").write_text("x,y\n1,1\n2,1\n3,1\n")  # poisoned after verify
    with pytest.raises(RuntimeError, match="secure-train-container"):
        _run(world, image)
    out = capfd.readouterr()
    text = out.out + out.err
    assert "between the data and its manifest" in text and "modified: train.csv" in text
    assert "exit status 3" in text  # IntegrityError's status, not "assumed success"
    assert not list(world["root"].rglob("model.json"))


# -- Vault from inside the component's container: both ways in (dev stack on loopback) ---------

CANARY = "kfp-container-canary-5f0c2b"
SEEN = ("import hashlib, os, pathlib, json; out = pathlib.Path(os.environ['STEPGUARD_OUTPUT_MODEL']);"
        " t = os.environ.get('TRACKING_TOKEN', ''); (out / 'model.json').write_text(json.dumps("
        "{'sha256': hashlib.sha256(t.encode()).hexdigest() if t else None}))")
KV_STEP = {"name": "train", "deadline_s": 120, "isolation": {"mode": "pod"},
           "credentials": [{"name": "tracking", "kind": "kv", "path": "stepguard/kfp-canary"}]}


@pytest.fixture
def canary(vault_client: Any) -> str:
    vault_client.secrets.kv.v2.create_or_update_secret(
        path="stepguard/kfp-canary", secret={"token": CANARY}, mount_point="secret")
    return CANARY


def _settings(world: dict[str, Any], vault: dict[str, Any]) -> None:
    import yaml

    world["settings"].write_text(yaml.safe_dump({"vault": vault, "audit": {"exporter": "none"}}))
    os.chmod(world["settings"], 0o644)


def _seen(world: dict[str, Any]) -> Any:
    import hashlib

    (found,) = world["root"].rglob("model.json")
    got = json.loads(found.read_text())["sha256"]
    return got == hashlib.sha256(CANARY.encode()).hexdigest()


def _no_canary_left(world: dict[str, Any], *texts: str) -> None:
    for text in texts:
        assert CANARY not in text
    for p in world["root"].rglob("*"):
        if p.is_file():
            assert CANARY.encode() not in p.read_bytes(), p


@pytest.mark.services
def test_jwt_login_inside_the_component_container(world: dict[str, Any], image: str,
                                                  dev_stack: Any, mint_jwt: Any, canary: str,
                                                  capfd: Any) -> None:
    from stepguard.receipt import Receipt

    token = world["root"] / "inputs" / "vault-token"  # stands in for the projected token
    token.write_text(mint_jwt(sub="kfp-train"))
    os.chmod(token, 0o644)
    _settings(world, {"addr": dev_stack.vault_addr, "auth": "jwt", "role": dev_stack.jwt_role,
                      "jwt_path": str(token)})
    receipt = Receipt.from_json(_run(world, image, step=KV_STEP, body=SEEN, network="host"))
    assert receipt.status == "succeeded" and _seen(world)
    (lease,) = receipt.credentials
    assert lease.name == "tracking"
    out = capfd.readouterr()
    _no_canary_left(world, receipt.to_json(), out.out, out.err)


@pytest.mark.services
def test_wrapped_token_inside_the_component_container_works_once(
        world: dict[str, Any], image: str, dev_stack: Any, canary: str, capfd: Any) -> None:
    from stepguard.credentials import AppRoleAuth, VaultConfig, open_session, wrap_for_delivery
    from stepguard.spec import CredentialRequest, RunContext

    _settings(world, {"addr": dev_stack.vault_addr})
    auth = AppRoleAuth(role_id=dev_stack.approle_role_id,
                       secret_id=dev_stack.approle_secret_id_file.read_text().strip())
    cfg = VaultConfig(addr=dev_stack.vault_addr, auth=auth)
    req = CredentialRequest(name="tracking", kind="kv", path="stepguard/kfp-canary")
    step = {k: v for k, v in KV_STEP.items() if k != "credentials"}  # minted by the submitter
    with open_session([req], settings=cfg, context=RunContext(step="train"), ttl_s=300) as s:
        wrapped = wrap_for_delivery(s).token.get_secret_value()
        _run(world, image, step=step, body=SEEN, network="host", wrapped=wrapped)
        assert _seen(world)
        for p in world["root"].rglob("model.json"):
            p.unlink()
        with pytest.raises(RuntimeError, match="secure-train-container"):
            _run(world, image, step=step, body=SEEN, network="host", wrapped=wrapped)
    out = capfd.readouterr()
    assert "wrapped credentials refused" in out.out + out.err
    assert not list(world["root"].rglob("model.json"))
    _no_canary_left(world, out.out, out.err)
    assert wrapped not in out.out + out.err
