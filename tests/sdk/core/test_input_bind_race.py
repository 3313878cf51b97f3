"""The verify-then-bind race, performed for real (red-team finding 3).

An attacker who can only flip a symlink in the input's parent directory -- never touching the
verified data -- flips it after verification and before the sandbox binds the input. The flip is
made deterministic by doing it inside the lifecycle's own call to ``run_isolated``: exactly the
moment between "verified" and "bound". The body must read the verified bytes, never the poison.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

import stepguard.isolation as isolation
from stepguard.errors import IntegrityError
from stepguard.integrity import create_manifest
from stepguard.settings import Settings
from stepguard.spec import IsolationSpec, RunContext, StepSpec
from stepguard.step import run_step

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")


@pytest.fixture
def flip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    good = tmp_path / "v1"
    good.mkdir()
    (good / "data.txt").write_text("GOOD\n")
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "data.txt").write_text("POISON\n")
    link = tmp_path / "current"
    link.symlink_to(good)
    manifest = tmp_path / "data.manifest.json"
    manifest.write_text(create_manifest(good).to_json())
    real_run = isolation.run_isolated

    def flip_then_run(*args: object, **kwargs: object) -> object:
        new = tmp_path / "current.new"
        new.symlink_to(evil)
        os.replace(new, link)  # the attacker's whole move: rename(2) in the parent directory
        return real_run(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(isolation, "run_isolated", flip_then_run)
    return link, manifest


def _spec(tmp_path: Path, link: Path, manifest: Path, mode: str) -> StepSpec:
    return StepSpec.from_dict({
        "name": "train",
        "inputs": [{"name": "data", "path": str(link), "manifest": str(manifest)}],
        "outputs": [{"name": "model", "path": str(tmp_path / "out" / mode)}],
        "isolation": {"mode": mode},
    })


READ = [sys.executable, "-c",
        "import os; open(os.environ['STEPGUARD_OUTPUT_MODEL'] + '/seen', 'w').write("
        "open(os.environ['STEPGUARD_INPUT_DATA'] + '/data.txt').read())"]


@pytest.mark.sandbox
@needs_bwrap
def test_a_symlink_flipped_after_verification_never_reaches_the_sandbox(
        tmp_path: Path, flip: tuple[Path, Path]) -> None:
    link, manifest = flip
    settings = Settings.from_dict({"state_dir": str(tmp_path / "state"),
                                   "audit": {"exporter": "none"}})
    receipt = run_step(_spec(tmp_path, link, manifest, "sandbox"), command=READ,
                       settings=settings, context=RunContext(run_id="r", step="train"))
    assert os.readlink(link).endswith("evil")  # the flip happened
    assert receipt.inputs[0].verified
    assert (Path(receipt.output("model").path) / "seen").read_text() == "GOOD\n"


def test_process_mode_refuses_a_path_that_no_longer_leads_to_the_verified_input(
        tmp_path: Path, flip: tuple[Path, Path]) -> None:
    link, manifest = flip
    settings = Settings.from_dict({"state_dir": str(tmp_path / "state"),
                                   "audit": {"exporter": "none"}})
    with pytest.raises(IntegrityError, match="no longer leads") as caught:
        run_step(_spec(tmp_path, link, manifest, "process"), command=READ,
                 settings=settings, context=RunContext(run_id="r", step="train"))
    assert caught.value.subject == str(link)
    assert not (tmp_path / "out" / "process" / "seen").exists()


@pytest.mark.sandbox
@needs_bwrap
def test_the_sandbox_rechecks_a_pinned_bind_by_identity_before_the_body(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The bind is made from the descriptor, so only a rename of the resolved directory during
    # bwrap's own setup could change it; simulate its outcome (the bound object is not the one
    # that was verified) and check the body never starts.
    held = tmp_path / "held"
    other = tmp_path / "other"
    held.mkdir()
    other.mkdir()
    import stepguard.isolation._sandbox as sandbox

    real_fstat = os.fstat
    fd = os.open(held, os.O_PATH | os.O_CLOEXEC)
    monkeypatch.setattr(sandbox.os, "fstat",
                        lambda f: os.stat(other) if f == fd else real_fstat(f))
    marker = tmp_path / "out"
    marker.mkdir()
    try:
        with pytest.raises(IntegrityError, match="not the directory that was verified"):
            isolation.run_isolated(["sh", "-c", "touch /out/ran"], IsolationSpec(),
                                   ro_bind_fds={fd: "/in"}, rw_binds={str(marker): "/out"},
                                   deadline_s=30)
    finally:
        os.close(fd)
    assert not (marker / "ran").exists()
