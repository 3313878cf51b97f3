"""``stepguard manifest``: exit codes by error class, JSON output, quiet when not a TTY."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from stepguard.cli import main
from stepguard.integrity import Manifest


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "a.csv").write_bytes(b"x,y\n")
    (d / "sub" / "big.bin").write_bytes(os.urandom(3 * 2**20))
    return d


def test_create_verify_export(data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.json"
    assert main(["manifest", "create", str(data), "-o", str(out), "--json",
                 "--shard-size", str(2**20), "--jobs", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"] == 2 and summary["digest"].startswith("sha256:")
    assert main(["manifest", "verify", str(data), str(out), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["ok"] is True
    assert captured.err == ""  # no progress output when stderr is not a terminal
    assert main(["manifest", "export", str(out), "--format", "sha256sum", "--data",
                 str(data)]) == 0
    sums = tmp_path / "sums"
    sums.write_text(capsys.readouterr().out)
    subprocess.run(["sha256sum", "-c", str(sums)], cwd=data, check=True, capture_output=True)
    # Without the data, sharded files have no plain digest: a manifest-class error (exit 4).
    assert main(["manifest", "export", str(out)]) == 4
    assert "sub/big.bin" in capsys.readouterr().err


def test_verify_exit_codes(data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.json"
    assert main(["manifest", "create", str(data), "-o", str(out)]) == 0
    capsys.readouterr()
    (data / "a.csv").write_bytes(b"x,z\n")
    (data / "new").write_bytes(b"")
    assert main(["manifest", "verify", str(data), str(out), "--json"]) == 3
    captured = capsys.readouterr()
    verdict = json.loads(captured.out)
    assert verdict["ok"] is False
    assert verdict["differences"] == ["modified: a.csv (content differs)", "added: new (file)"]
    assert verdict["digest"] == Manifest.from_json(out.read_bytes()).digest
    assert "a.csv" in captured.err and "Traceback" not in captured.err
    doc = json.loads(out.read_text())
    doc["subject"][0]["name"] = "../a.csv"
    out.write_text(json.dumps(doc))
    assert main(["manifest", "verify", str(data), str(out)]) == 4
    assert "../a.csv" in capsys.readouterr().err
    assert main(["manifest", "verify", str(data), str(tmp_path / "missing.json")]) == 4
    # Missing data is found before the (here unsafe) manifest is parsed: a data verdict.
    capsys.readouterr()
    assert main(["manifest", "verify", str(tmp_path / "gone"), str(out), "--json"]) == 3
    captured = capsys.readouterr()
    assert json.loads(captured.out)["digest"] is None and "Traceback" not in captured.err


def test_blake3_and_stdout(data: Path, capsys) -> None:
    assert main(["manifest", "create", str(data), "--algorithm", "blake3"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["predicate"]["algorithm"] == "blake3"


def test_progress_on_a_terminal(data: Path, tmp_path: Path) -> None:
    """Under a pseudo-terminal, progress goes to stderr."""
    import pty

    out = tmp_path / "m.json"
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run(
            [str(Path(os.sys.executable).parent / "stepguard"), "manifest", "create", str(data),
             "-o", str(out), "--jobs", "1"],
            stderr=secondary, stdout=subprocess.PIPE, timeout=60,
        )
    finally:
        os.close(secondary)
    err = os.read(primary, 65536).decode(errors="replace")
    os.close(primary)
    assert proc.returncode == 0
    assert "hashing:" in err and "MiB/s" in err
    assert "sha256:" in err
    # verify parses first on a terminal: the bar shows a percentage of the manifest's total.
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run(
            [str(Path(os.sys.executable).parent / "stepguard"), "manifest", "verify", str(data),
             str(out), "--jobs", "1"],
            stderr=secondary, stdout=subprocess.PIPE, timeout=60,
        )
    finally:
        os.close(secondary)
    err = os.read(primary, 65536).decode(errors="replace")
    os.close(primary)
    assert proc.returncode == 0 and proc.stdout.startswith(b"OK sha256:")
    assert "verifying:" in err and "%" in err
