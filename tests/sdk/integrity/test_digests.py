"""Integrity's public hashing entry points: plain SHA-256 of chosen files, copy-while-hashing and
the sha256sum export, all reading through checked descriptors, never through a swapped link."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from stepguard.errors import IntegrityError
from stepguard.integrity import (
    _digests,
    copy_file,
    create_manifest,
    file_digests,
    plain_sha256_digests,
)

MiB = 1024 * 1024


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    (root / "weights.bin").write_bytes(os.urandom(3 * MiB + 5))
    (root / "sub" / "config.json").write_bytes(b'{"a": 1}')
    (root / "notes.txt").write_bytes(b"not wanted")
    return root


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_file_digests_hash_the_chosen_files(tree: Path) -> None:
    got = file_digests(tree, ["weights.bin", "sub/config.json"], jobs=2)
    assert got == {"weights.bin": _sha(tree / "weights.bin"),
                   "sub/config.json": _sha(tree / "sub" / "config.json")}
    every = file_digests(tree)
    assert set(every) == {"weights.bin", "sub/config.json", "notes.txt"}
    assert file_digests(tree / "notes.txt") == {"notes.txt": _sha(tree / "notes.txt")}


def test_file_digests_name_every_file_they_cannot_hash(tree: Path, tmp_path: Path) -> None:
    (tree / "link").symlink_to(tree / "weights.bin")
    os.mkfifo(tree / "pipe")
    with pytest.raises(IntegrityError) as info:
        file_digests(tree, ["weights.bin", "link", "pipe", "gone", "sub"])
    assert info.value.details == (
        "missing: gone",
        "type changed: link (expected file, found symlink -> " + str(tree / "weights.bin") + ")",
        "type changed: pipe (expected file, found FIFO)",
        "type changed: sub (expected file, found directory)",
    )


def _swap_after_walk(monkeypatch, root: Path, rel: str, outside: Path) -> None:
    """Once the walk has listed ``root/rel``, put a symlink to ``outside`` in its place."""
    real = _digests.walk_tree

    def racing(*args, **kwargs):
        scan = real(*args, **kwargs)
        os.replace(root / rel, root.parent / "original")
        os.symlink(outside, root / rel)
        return scan

    monkeypatch.setattr(_digests, "walk_tree", racing)


def test_file_digests_do_not_follow_a_file_swapped_after_the_walk(tree, tmp_path, monkeypatch):
    outside = tmp_path / "attacker.bin"
    shutil.copyfile(tree / "sub" / "config.json", outside)  # the same bytes, another file
    _swap_after_walk(monkeypatch, tree, "sub/config.json", outside)
    with pytest.raises(IntegrityError, match="changed while they were being hashed") as info:
        file_digests(tree, ["sub/config.json", "weights.bin"])
    assert [d.split(" (")[0] for d in info.value.details] == ["modified: sub/config.json"]


def test_plain_digests_do_not_follow_a_sharded_file_swapped_after_the_walk(tree, tmp_path,
                                                                           monkeypatch):
    manifest = create_manifest(tree, shard_size=MiB)
    assert plain_sha256_digests(tree, manifest) == {"weights.bin": _sha(tree / "weights.bin")}
    outside = tmp_path / "attacker.bin"
    shutil.copyfile(tree / "weights.bin", outside)
    _swap_after_walk(monkeypatch, tree, "weights.bin", outside)
    with pytest.raises(IntegrityError) as info:
        plain_sha256_digests(tree, manifest)
    assert info.value.details == ("modified: weights.bin (cannot open (Too many levels of "
                                  "symbolic links))",)


def test_copy_file_returns_the_digest_of_the_bytes_written(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "copy"
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        digest = copy_file(tree / "weights.bin", fd)
    finally:
        os.close(fd)
    assert dest.read_bytes() == (tree / "weights.bin").read_bytes()
    assert digest == _sha(dest)
    (tree / "link").symlink_to(tree / "weights.bin")
    fd = os.open(tmp_path / "copy2", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with pytest.raises(IntegrityError, match="cannot open"):
            copy_file(tree / "link", fd)
    finally:
        os.close(fd)


def test_file_digests_walk_only_the_way_to_the_wanted_files(tree: Path, monkeypatch) -> None:
    (tree / ".git" / "objects").mkdir(parents=True)
    (tree / ".git" / "objects" / "ab12").write_bytes(b"blob")
    scans = []
    real = _digests.walk_tree

    def spy(*args, **kwargs):
        scans.append(real(*args, **kwargs))
        return scans[-1]

    monkeypatch.setattr(_digests, "walk_tree", spy)
    assert set(file_digests(tree, ["sub/config.json", "weights.bin"])) == {
        "sub/config.json", "weights.bin"}
    assert sorted(scans[-1].nodes) == ["notes.txt", "sub/config.json", "weights.bin"]
    assert set(file_digests(tree)) == {"weights.bin", "sub/config.json", "notes.txt",
                                       ".git/objects/ab12"}
