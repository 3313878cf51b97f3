"""Many tiny files are hashed by helper interpreters as well as in-process: same digests, and
every tampering case is still found and named, whichever share a file landed in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stepguard.errors import IntegrityError
from stepguard.integrity import _direct, _engine, _tree, create_manifest, verify_manifest


def _tree_of(root: Path, n: int = 60) -> Path:
    for i in range(n):
        d = root / f"d{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:03d}.txt").write_bytes(f"row {i}\n".encode() * (i + 1))
    return root


@pytest.fixture
def helpers_on(monkeypatch):
    """Lower the thresholds so a small tree uses helper interpreters; count that it did."""
    calls = []
    real = _engine.run_helpers

    def spy(files, helpers, *args, **kwargs):
        calls.append((len(files), helpers))
        return real(files, helpers, *args, **kwargs)

    from stepguard.integrity import _tinyproc

    monkeypatch.setattr(_tinyproc, "_STARTUP_FILES", 0)  # small trees: helpers get shares
    real_helper = _tinyproc.Helper

    class CountingHelper(real_helper):
        def __init__(self, share, *args, **kwargs):
            calls.append(("helper process", len(share)))
            super().__init__(share, *args, **kwargs)

    monkeypatch.setattr(_tinyproc, "Helper", CountingHelper)
    monkeypatch.setattr(_engine, "_HELPERS_FROM", 10)
    monkeypatch.setattr(_engine, "_HELPER_FILES", 5)
    monkeypatch.setattr(_engine, "run_helpers", spy)
    return calls


def test_helper_digests_equal_in_process_digests(tmp_path, helpers_on):
    data = _tree_of(tmp_path / "data")
    in_process = create_manifest(data, jobs=1)
    assert helpers_on == []
    with_helpers = create_manifest(data, jobs=2)
    assert helpers_on and helpers_on[0][1] >= 1, "helper path not taken"
    assert any(c[0] == "helper process" and c[1] > 0 for c in helpers_on), helpers_on
    assert with_helpers.to_json() == in_process.to_json()
    verify_manifest(data, in_process, jobs=2)


def test_helpers_still_catch_every_tampering(tmp_path, helpers_on):
    data = _tree_of(tmp_path / "data")
    manifest = create_manifest(data, jobs=2)
    # Spread over the tree so both the helper's share and the caller's share are hit.
    (data / "d1" / "f005.txt").write_bytes(b"poisoned\n")
    same = data / "d3" / "f055.txt"
    st = same.stat()
    same.write_bytes(same.read_bytes().replace(b"row", b"r0w"))  # same size ...
    os.utime(same, ns=(st.st_atime_ns, st.st_mtime_ns))         # ... and old mtime
    (data / "d2" / "f030.txt").unlink()
    (data / "d2" / "f030.txt").symlink_to(data / "d0" / "f000.txt")
    (data / "d0" / "f040.txt").unlink()
    helpers_on.clear()
    with pytest.raises(IntegrityError) as info:
        verify_manifest(data, manifest, jobs=2)
    assert helpers_on, "helper path not taken"
    text = "\n".join(info.value.details)
    for name in ("d1/f005.txt", "d3/f055.txt", "d2/f030.txt", "d0/f040.txt"):
        assert name in text, f"{name} not reported:\n{text}"


def _answers(share):
    """Run one helper interpreter over ``share``; its answer lines."""
    from stepguard.integrity._tinyproc import Helper

    helper = Helper(share, _direct.OPEN_FLAGS, 50)
    try:
        lines = helper.results()
    finally:
        helper.stop()
    assert lines is not None
    return lines


def test_helper_checks_files_the_walk_did_not_stat(tmp_path):
    """The helper protocol for files known only by name: statistics come back from the
    descriptor's fstat, a file that is not tiny is passed back unhashed, a FIFO is named."""
    import hashlib

    from stepguard.integrity._tinyproc import parse_line

    (tmp_path / "small").write_bytes(b"abc")
    (tmp_path / "big").write_bytes(b"x" * 100)
    os.mkfifo(tmp_path / "pipe")
    unknown = (-1, -1)
    share = [("small", str(tmp_path / "small"), unknown, -1, None),
             ("big", str(tmp_path / "big"), unknown, -1, None),
             ("pipe", str(tmp_path / "pipe"), unknown, -1, None),
             ("sized", str(tmp_path / "small"), unknown, 4, None)]
    lines = _answers(share)
    small, big, pipe, sized = (parse_line(line) for line in lines)
    assert small == (hashlib.sha256(b"abc").hexdigest(), (3, -1, -1, 1))  # one name: size only
    assert big[0] is None and big[1][0] == 100
    assert pipe == "replaced by a FIFO"
    assert sized == "size 3, manifest 4"


def test_manifest_text_is_parsed_while_helpers_hash_with_the_same_findings(tmp_path,
                                                                           helpers_on):
    """Given the manifest's text, helpers start hashing before it is parsed; every finding
    (content, size, FIFO, added, missing) is the same as verifying a parsed Manifest."""
    data = _tree_of(tmp_path / "data")
    manifest = create_manifest(data, jobs=1)
    text = manifest.to_json()
    assert verify_manifest(data, text, jobs=2).files == len(manifest.entries)
    poisoned = data / "d1" / "f005.txt"
    poisoned.write_bytes(poisoned.read_bytes().replace(b"row", b"r0w"))  # same size
    (data / "d2" / "f058.txt").write_bytes(b"x" * 70_000)   # grown past the tiny limit
    (data / "d3" / "f059.txt").write_bytes(b"shorter")
    (data / "d0" / "f040.txt").unlink()
    os.mkfifo(data / "d0" / "f040.txt")
    (data / "d0" / "f044.txt").unlink()
    (data / "d0" / "new.txt").write_bytes(b"added\n")
    helpers_on.clear()
    with pytest.raises(IntegrityError) as from_text:
        verify_manifest(data, text.encode(), jobs=2)
    assert any(c[0] == "helper process" and c[1] > 0 for c in helpers_on), helpers_on
    with pytest.raises(IntegrityError) as from_object:
        verify_manifest(data, manifest, jobs=1)
    assert from_text.value.details == from_object.value.details
    text_details = "\n".join(from_text.value.details)
    for needle in ("modified: d1/f005.txt (content differs)",
                   "modified: d2/f058.txt (size 70000, manifest",
                   "modified: d3/f059.txt (size 7, manifest",
                   "type changed: d0/f040.txt (expected file, found FIFO)",
                   "missing: d0/f044.txt", "added: d0/new.txt"):
        assert needle in text_details, (needle, text_details)


def test_bad_manifest_text_stops_the_helpers(tmp_path, helpers_on):
    from stepguard.errors import ManifestError

    data = _tree_of(tmp_path / "data")
    text = create_manifest(data, jobs=1).to_json()
    before = set(os.listdir("/proc"))
    with pytest.raises(ManifestError):
        verify_manifest(data, text.replace('"rootDigest": "sha256:', '"rootDigest": "sha256:0'),
                        jobs=2)
    assert any(c[0] == "helper process" for c in helpers_on), helpers_on
    leftover = [p for p in set(os.listdir("/proc")) - before if p.isdigit()
                and os.path.exists(f"/proc/{p}/cmdline")
                and b"-I\x00-S" in open(f"/proc/{p}/cmdline", "rb").read()]
    assert leftover == []


def test_blake3_manifest_text_verifies_without_early_helpers(tmp_path, helpers_on):
    data = _tree_of(tmp_path / "data")
    text = create_manifest(data, algorithm="blake3").to_json()
    helpers_on.clear()
    assert verify_manifest(data, text, jobs=2).files == 60
    assert not any(c[0] == "helper process" for c in helpers_on)


def test_helper_opens_files_through_their_checked_directory(tmp_path):
    """A file the walk did not stat is opened relative to its directory, and only once that
    directory proves to be the one the walk listed."""
    import hashlib

    from stepguard.integrity._tinyproc import parse_line

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"abc")
    st = (tmp_path / "d").stat()
    unknown = (-1, -1)
    share = [("ok", str(tmp_path / "d" / "f"), unknown, -1, (st.st_dev, st.st_ino)),
             ("other", str(tmp_path / "d" / "f"), unknown, -1, (st.st_dev, st.st_ino + 7))]
    lines = _answers(share)
    ok, other = (parse_line(line) for line in lines)
    assert ok[0] == hashlib.sha256(b"abc").hexdigest()
    assert other == "directory replaced while verifying"


def _swap_parent_after_walk(monkeypatch, root: Path, sub: str, outside: Path) -> None:
    """After the walk has listed ``root/sub``, replace it with a symlink to an outside copy."""
    real_scan = _tree.walk_tree

    def racing_scan(*args, **kwargs):
        scan = real_scan(*args, **kwargs)
        os.rename(root / sub, root.parent / (sub + ".orig"))
        os.symlink(outside, root / sub)
        return scan

    monkeypatch.setattr(_tree, "walk_tree", racing_scan)


@pytest.mark.parametrize("how", ["in-process", "helpers", "manifest text"])
def test_parent_directory_swapped_after_the_walk_is_caught(tmp_path, monkeypatch, helpers_on,
                                                          how):
    """The same bytes behind a symlinked parent are still not the verified files."""
    import shutil

    data = _tree_of(tmp_path / "data")
    manifest = create_manifest(data, jobs=1)
    outside = tmp_path / "attacker"
    shutil.copytree(data / "d1", outside)
    _swap_parent_after_walk(monkeypatch, data, "d1", outside)
    target = manifest.to_json() if how == "manifest text" else manifest
    with pytest.raises(IntegrityError) as info:
        verify_manifest(data, target, jobs=1 if how == "in-process" else 2)
    text = "\n".join(info.value.details)
    assert "modified: d1/f001.txt (directory replaced while verifying)" in text, text
    assert "d0/" not in text  # the other directories verify


def test_create_refuses_a_parent_directory_swapped_after_the_walk(tmp_path, monkeypatch):
    import shutil

    data = _tree_of(tmp_path / "data")
    outside = tmp_path / "attacker"
    shutil.copytree(data / "d2", outside)
    _swap_parent_after_walk(monkeypatch, data, "d2", outside)
    with pytest.raises(IntegrityError, match="changed while the manifest") as info:
        create_manifest(data, jobs=1)
    assert "d2/f002.txt: directory replaced while verifying" in info.value.details


def test_hard_link_findings_do_not_depend_on_which_process_hashed(tmp_path, helpers_on):
    data = _tree_of(tmp_path / "data")
    manifest = create_manifest(data, jobs=1)
    (tmp_path / "outside").write_bytes(b"x")
    os.unlink(data / "d3" / "f059.txt")
    os.link(tmp_path / "outside", data / "d3" / "f059.txt")  # a name outside; size changed too
    os.link(data / "d0" / "f000.txt", data / "d0" / "extra")  # a second name inside the tree
    results = []
    for target, jobs in ((manifest, 1), (manifest, 2), (manifest.to_json(), 2)):
        with pytest.raises(IntegrityError) as info:
            verify_manifest(data, target, jobs=jobs)
        results.append(info.value.details)
    assert results[0] == results[1] == results[2]
    text = "\n".join(results[0])
    assert "hard link: d3/f059.txt (hard link with 1 name(s) outside the root)" in text
    assert "hard link: d0/f000.txt" not in text and "added: d0/extra (file)" in text
