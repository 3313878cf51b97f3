"""The Python examples in docs/reference/kfp.md run as written (no services needed)."""

import os
import re
from pathlib import Path

import pytest

pytest.importorskip("kfp")
pytestmark = [pytest.mark.kfp,
              pytest.mark.filterwarnings("ignore:You may be attemping:RuntimeWarning")]

DOC = Path(__file__).resolve().parents[2] / "docs" / "reference" / "kfp.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_reference_has_examples() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_reference_example_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STEPGUARD_CONFIG", raising=False)
    monkeypatch.setenv("STEPGUARD_AUDIT_EXPORTER", "none")
    # The page's examples harden tasks, which take the image from pods.image (docs say so).
    monkeypatch.setenv("STEPGUARD_PODS_IMAGE", "registry.example/stepguard-runtime@sha256:"
                       + "5" * 64)
    saved = os.environ.get("STEPGUARD_STATE_DIR")
    try:
        exec(compile(BLOCKS[index], f"{DOC.name}[{index}]", "exec"), {"__name__": "doc"})
    finally:
        if saved is None:
            os.environ.pop("STEPGUARD_STATE_DIR", None)
        else:
            os.environ["STEPGUARD_STATE_DIR"] = saved
    if index == 0:
        assert "gap: network=none" in capsys.readouterr().out
