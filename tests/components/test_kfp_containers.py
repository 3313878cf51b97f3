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


def _run(world: dict[str, Any], image: str) -> str:
    from kfp import dsl, local

    from stepguard.testing.kfpdocker import container_runner, docker_api, real_exit_codes
    from stepguard_kfp._components import secure_train_container
    from stepguard_kfp._imageref import set_task_image

    root = world["root"]
    spec = json.dumps({"name": "train", "deadline_s": 120, "isolation": {"mode": "pod"}})

    @dsl.pipeline(name="train-in-container")
    def pipeline(receipt: str) -> str:
        manifest = dsl.importer(artifact_uri=str(root / "inputs" / "handed.json"),
                                artifact_class=dsl.Artifact)
        task = secure_train_container(
            step_spec=spec, command=["python3", "-c", BODY], dataset_path=str(world["data"]),
            dataset_manifest=manifest.output, dataset_receipt=receipt,
            settings_path=str(world["settings"]))
        set_task_image(task, image)
        return task.outputs["receipt"]  # type: ignore[no-any-return]

    with docker_api(), real_exit_codes():
        local.init(runner=container_runner(name="train"), pipeline_root=str(root),
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
