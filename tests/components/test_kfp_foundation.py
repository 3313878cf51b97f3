"""A KFP pipeline with one secured component runs through kfp.local's SubprocessRunner.

Real kfp.local, real subprocess executor, real stepguard lifecycle; no services needed.
"""


import json
from pathlib import Path

import pytest

pytest.importorskip("kfp")
pytestmark = [pytest.mark.kfp,
              pytest.mark.filterwarnings("ignore:You may be attemping:RuntimeWarning")]


@pytest.fixture
def kfp_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from kfp import local

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STEPGUARD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("STEPGUARD_AUDIT_EXPORTER", "jsonl")
    monkeypatch.delenv("STEPGUARD_CONFIG", raising=False)
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(tmp_path / "kfp-root"), raise_on_error=True)
    return tmp_path


def _dataset(root: Path) -> tuple[Path, Path, str]:
    from stepguard.integrity import create_manifest

    data = root / "data"
    data.mkdir()
    (data / "train.csv").write_text("x,y\n1,2\n3,4\n")
    (data / "labels.txt").write_text("a\nb\n")
    manifest = create_manifest(data)
    mpath = root / "data.manifest.json"
    mpath.write_text(manifest.to_json())
    return data, mpath, manifest.digest


def test_verify_dataset_component_runs_under_kfp_local(kfp_local: Path) -> None:
    from kfp import dsl

    from stepguard.receipt import Receipt
    from stepguard_kfp import verify_dataset

    data, mpath, digest = _dataset(kfp_local)

    @dsl.pipeline
    def one_step(dataset: str, manifest: str) -> str:
        return verify_dataset(dataset_path=dataset, manifest_path=manifest,
                              pipeline="foundation", run_id="run-1").outputs["Output"]

    run = one_step(dataset=str(data), manifest=str(mpath))
    receipt = Receipt.from_json(run.output)
    assert receipt.status == "succeeded"
    assert receipt.context.orchestrator == "kfp"
    assert receipt.context.run_id == "run-1"
    (rec,) = receipt.inputs
    assert (rec.name, rec.verified, rec.digest, rec.files) == ("dataset", True, digest, 2)
    # The lifecycle really ran in the component: its receipt file and audit log exist.
    assert (kfp_local / "state" / "runs" / "run-1" / "verify-dataset" / "receipt.json").is_file()
    audit = (kfp_local / "state" / "audit" / "audit.jsonl").read_text()
    assert digest in audit


def test_tampered_dataset_fails_the_task(kfp_local: Path) -> None:
    from kfp import dsl

    from stepguard_kfp import verify_dataset

    data, mpath, _ = _dataset(kfp_local)
    (data / "train.csv").write_text("x,y\n1,2\n3,999\n")

    @dsl.pipeline
    def one_step(dataset: str, manifest: str) -> str:
        return verify_dataset(dataset_path=dataset, manifest_path=manifest).outputs["Output"]

    with pytest.raises(RuntimeError, match="verify-dataset"):
        one_step(dataset=str(data), manifest=str(mpath))
    runs = kfp_local / "state" / "runs"
    receipts = [json.loads(p.read_text()) for p in runs.glob("*/verify-dataset/receipt.json")]
    assert [r["status"] for r in receipts] == ["failed"]
    assert receipts[0]["error"]["type"] == "IntegrityError"
