"""The tamper corpus: every change to verified data is detected and the file is named."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepguard.errors import ConfigurationError, IntegrityError
from stepguard.integrity import (
    Manifest,
    create_manifest,
    plain_sha256_digests,
    stage_and_verify,
    verify_manifest,
)

MiB = 2**20


def _tree(root: Path) -> Path:
    (root / "data" / "train").mkdir(parents=True)
    (root / "data" / "train" / "part-0.csv").write_bytes(b"a,b\n1,2\n" * 50)
    (root / "data" / "train" / "part-1.csv").write_bytes(b"a,b\n3,4\n" * 70)
    (root / "data" / "labels.json").write_bytes(b'{"x": 1}')
    (root / "empty.bin").write_bytes(b"")
    # Above the 1 MiB shard size used below: hashed as 3 parallel shards.
    (root / "weights.bin").write_bytes(os.urandom(2 * MiB + 12345))
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return _tree(tmp_path / "ds")


@pytest.fixture
def manifest(tree: Path) -> Manifest:
    return create_manifest(tree, shard_size=MiB)


def _fails(root: Path, m: Manifest, *names: str, **kw) -> IntegrityError:
    with pytest.raises(IntegrityError) as info:
        verify_manifest(root, m, **kw)
    err = info.value
    for name in names:
        assert any(name in d for d in err.details), (name, err.details)
    return err


def test_clean_tree_verifies(tree: Path, manifest: Manifest) -> None:
    assert manifest.entries[-1].scheme == "sha256-sharded"
    report = verify_manifest(tree, manifest)
    assert report.files == 5 and report.bytes == manifest.total_size
    assert report.manifest_digest == manifest.digest
    assert verify_manifest(tree, manifest, jobs=1).files == 5


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(which=st.integers(min_value=0, max_value=3), where=st.floats(0, 1, exclude_max=True),
       bit=st.integers(0, 7))
def test_any_flipped_bit_is_detected(which: int, where: float, bit: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = _tree(Path(tmp))
        m = create_manifest(root, shard_size=MiB)
        files = [e for e in m.entries if e.size]
        entry = files[which % len(files)]
        path = root / entry.path
        data = bytearray(path.read_bytes())
        data[int(where * len(data))] ^= 1 << bit
        st0 = path.stat()
        path.write_bytes(bytes(data))
        os.utime(path, ns=(st0.st_atime_ns, st0.st_mtime_ns))
        err = _fails(root, m, f"modified: {entry.path}")
        assert err.subject == entry.path


def test_same_size_rewrite_with_mtime_restored(tree: Path, manifest: Manifest) -> None:
    path = tree / "data" / "train" / "part-0.csv"
    before = path.stat()
    path.write_bytes(path.read_bytes().replace(b"1,2", b"9,9"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_mtime_ns == before.st_mtime_ns
    assert path.stat().st_size == before.st_size
    _fails(tree, manifest, "modified: data/train/part-0.csv (content differs)")


def test_truncation_and_extension(tree: Path, manifest: Manifest) -> None:
    with open(tree / "weights.bin", "r+b") as fh:
        fh.truncate(MiB)
    with open(tree / "data" / "labels.json", "ab") as fh:
        fh.write(b" ")
    err = _fails(tree, manifest, "modified: weights.bin", "modified: data/labels.json")
    assert len(err.details) == 2


def test_added_removed_renamed_all_reported(tree: Path, manifest: Manifest) -> None:
    (tree / "data" / "train" / "part-2.csv").write_bytes(b"poison")
    (tree / "data" / "labels.json").unlink()
    (tree / "data" / "train" / "part-1.csv").rename(tree / "data" / "train" / "renamed.csv")
    err = _fails(tree, manifest, "added: data/train/part-2.csv", "missing: data/labels.json",
                 "missing: data/train/part-1.csv", "added: data/train/renamed.csv")
    assert len(err.details) == 4


def test_added_hidden_and_empty_file(tree: Path, manifest: Manifest) -> None:
    (tree / ".hidden").write_bytes(b"")
    _fails(tree, manifest, "added: .hidden")


def test_replaced_by_symlink(tree: Path, manifest: Manifest) -> None:
    target = tree.parent / "outside.csv"
    shutil.copy(tree / "data" / "train" / "part-0.csv", target)
    (tree / "data" / "train" / "part-0.csv").unlink()
    (tree / "data" / "train" / "part-0.csv").symlink_to(target)
    _fails(tree, manifest, "type changed: data/train/part-0.csv (expected file, found symlink")
    # Even with internal links allowed, a link leaving the root is refused.
    _fails(tree, manifest, "resolves outside the root", allow_internal_symlinks=True)


def test_replaced_by_fifo_directory_and_socket(tree: Path, manifest: Manifest) -> None:
    (tree / "data" / "labels.json").unlink()
    os.mkfifo(tree / "data" / "labels.json")
    (tree / "empty.bin").unlink()
    (tree / "empty.bin").mkdir()
    sock_path = tree / "data" / "train" / "part-1.csv"
    sock_path.unlink()
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(sock_path))
        _fails(tree, manifest, "type changed: data/labels.json (expected file, found FIFO)",
               "type changed: empty.bin (expected file, found directory)",
               "type changed: data/train/part-1.csv (expected file, found socket)")
    finally:
        s.close()


def test_directory_replaced_by_symlink(tree: Path, manifest: Manifest) -> None:
    shutil.copytree(tree / "data" / "train", tree.parent / "elsewhere")
    shutil.rmtree(tree / "data" / "train")
    (tree / "data" / "train").symlink_to(tree.parent / "elsewhere")
    _fails(tree, manifest, "missing: data/train/part-0.csv", "added: data/train (symlink")


def test_external_hard_link_refused(tree: Path, manifest: Manifest) -> None:
    os.link(tree / "data" / "labels.json", tree.parent / "backdoor")
    _fails(tree, manifest, "hard link: data/labels.json")
    with pytest.warns(UserWarning, match="unsafe_allow_external_hardlinks"):
        verify_manifest(tree, manifest, unsafe_allow_external_hardlinks=True)
    with pytest.raises(IntegrityError, match="data/labels.json"):
        create_manifest(tree)


def test_internal_hard_link_allowed(tree: Path) -> None:
    os.link(tree / "data" / "labels.json", tree / "labels-copy.json")
    m = create_manifest(tree)
    verify_manifest(tree, m)


def test_create_refuses_links_and_special_files(tree: Path) -> None:
    (tree / "link").symlink_to("data/labels.json")
    os.mkfifo(tree / "pipe")
    with pytest.raises(IntegrityError) as info:
        create_manifest(tree)
    text = "\n".join(info.value.details)
    assert "link: symlink -> data/labels.json refused" in text
    assert "pipe: FIFO refused" in text


def test_internal_symlink_option(tree: Path) -> None:
    (tree / "link.json").symlink_to("data/labels.json")
    m = create_manifest(tree, allow_internal_symlinks=True)
    assert any(e.path == "link.json" for e in m.entries)
    verify_manifest(tree, m, allow_internal_symlinks=True)
    # Without the option the same tree is refused at verification.
    _fails(tree, m, "type changed: link.json (expected file, found symlink")
    # Retargeting the link to other content is caught.
    (tree / "link.json").unlink()
    (tree / "link.json").symlink_to("data/train/part-0.csv")
    _fails(tree, m, "modified: link.json", allow_internal_symlinks=True)
    (tree / "link.json").unlink()
    (tree / "link.json").symlink_to("data")
    _fails(tree, m, "only links to files", allow_internal_symlinks=True)


def test_unsafe_file_names_refused_at_create(tmp_path: Path) -> None:
    (tmp_path / "a\\b").write_bytes(b"")
    (tmp_path / "Readme").write_bytes(b"")
    (tmp_path / "README").write_bytes(b"")
    from stepguard.errors import ManifestError

    with pytest.raises(ManifestError) as info:
        create_manifest(tmp_path)
    text = "\n".join(info.value.details)
    assert "a\\b: path contains a backslash" in text


def test_change_during_hashing_is_caught(tree: Path, manifest: Manifest) -> None:
    grown = []

    def progress(n: int) -> None:
        if not grown:
            grown.append(n)
            with open(tree / "weights.bin", "ab") as fh:
                fh.write(b"!")

    err = _fails(tree, manifest, "modified: weights.bin", jobs=1, progress=progress)
    assert "while verifying" in "\n".join(err.details) or "size" in "\n".join(err.details)


def test_file_swapped_after_walk_is_caught(tree: Path, manifest: Manifest) -> None:
    """Same bytes, different inode: the descriptor no longer refers to what was walked."""
    swapped = []
    # Hashed last (paths are sorted), so the swap happens between the walk and its read.
    target = tree / "weights.bin"

    def progress(n: int) -> None:
        if not swapped:
            swapped.append(n)
            tmp = target.with_name("tmp")
            tmp.write_bytes(target.read_bytes())
            os.replace(tmp, target)

    _fails(tree, manifest, "modified: weights.bin (replaced while verifying)", jobs=1,
           progress=progress)


def test_single_file_input(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(os.urandom(3 * MiB))
    m = create_manifest(f, shard_size=MiB)
    assert m.params["root"] == "file" and [e.path for e in m.entries] == ["model.safetensors"]
    staged = tmp_path / "renamed.bin"
    shutil.copy(f, staged)
    verify_manifest(staged, m)
    with open(staged, "r+b") as fh:
        fh.seek(2 * MiB)
        byte = fh.read(1)[0]
        fh.seek(2 * MiB)
        fh.write(bytes([byte ^ 0xFF]))
    _fails(staged, m, "modified: model.safetensors")
    _fails(tmp_path, m, "manifest describes a single file")
    with pytest.raises(IntegrityError, match="does not exist"):
        verify_manifest(tmp_path / "nope", m)


def test_blake3(tree: Path) -> None:
    m = create_manifest(tree, algorithm="blake3")
    assert {e.scheme for e in m.entries} == {"blake3"}
    verify_manifest(tree, Manifest.from_json(m.to_json()))
    (tree / "weights.bin").write_bytes(b"x")
    _fails(tree, m, "modified: weights.bin")


@pytest.mark.skipif(shutil.which("b3sum") is None, reason="b3sum not installed")
def test_b3sum_accepts_export(tree: Path) -> None:
    m = create_manifest(tree, algorithm="blake3")
    sums = tree.parent / "sums"
    sums.write_text(m.export_b3sum())
    subprocess.run(["b3sum", "-c", str(sums)], cwd=tree, check=True, capture_output=True)


def test_sha256sum_accepts_export(tree: Path) -> None:
    sums = tree.parent / "sums"
    plain = create_manifest(tree, shard_size=0)
    sums.write_text(plain.export_sha256sum())
    out = subprocess.run(["sha256sum", "-c", str(sums)], cwd=tree, check=True,
                         capture_output=True, text=True)
    assert out.stdout.count(": OK") == 5
    sharded = create_manifest(tree, shard_size=MiB)
    sums.write_text(sharded.export_sha256sum(plain_sha256_digests(tree, sharded)))
    subprocess.run(["sha256sum", "-c", str(sums)], cwd=tree, check=True, capture_output=True)
    # The export itself is bound to the manifest: tampered data is not exported.
    (tree / "weights.bin").write_bytes(os.urandom(2 * MiB + 12345))
    with pytest.raises(IntegrityError, match="weights.bin"):
        plain_sha256_digests(tree, sharded)
    bad = subprocess.run(["sha256sum", "-c", str(sums)], cwd=tree, capture_output=True)
    assert bad.returncode != 0


def test_stage_and_verify(tree: Path, manifest: Manifest, tmp_path: Path) -> None:
    dest = tmp_path / "staging"
    report = stage_and_verify(tree, manifest, dest)
    assert report.files == 5
    assert (dest / "weights.bin").read_bytes() == (tree / "weights.bin").read_bytes()
    assert not os.access(dest / "weights.bin", os.W_OK) or os.geteuid() == 0
    verify_manifest(dest, manifest)
    with pytest.raises(ConfigurationError):
        stage_and_verify(tree, manifest, dest)
    (tree / "data" / "labels.json").write_bytes(b'{"x": 2}')
    with pytest.raises(IntegrityError, match="data/labels.json"):
        stage_and_verify(tree, manifest, tmp_path / "staging2")
    assert not (tmp_path / "staging2").exists()


def test_bad_arguments(tree: Path, manifest: Manifest) -> None:
    with pytest.raises(ConfigurationError):
        create_manifest(tree, algorithm="md5")
    with pytest.raises(ConfigurationError):
        create_manifest(tree, jobs=0)
    with pytest.raises(ConfigurationError):
        create_manifest(tree, shard_size=10)
    with pytest.raises(ConfigurationError):
        verify_manifest(tree, json.loads(manifest.to_json()))  # type: ignore[arg-type]
    assert verify_manifest(tree, manifest.to_json()).files == len(manifest.entries)


def test_memory_stays_flat_for_a_large_file(tmp_path: Path) -> None:
    """A 256 MiB (sparse) file is hashed with a few MiB of buffers, not loaded into memory."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as fh:
        fh.truncate(256 * MiB)
    code = (
        "import sys\n"
        "from stepguard.integrity import create_manifest, verify_manifest\n"
        "m = create_manifest(sys.argv[1], shard_size=64 * 2**20)\n"
        "verify_manifest(sys.argv[1], m)\n"
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
    )
    out = subprocess.run([os.sys.executable, "-c", code, str(big)], capture_output=True,
                         text=True, check=True, timeout=120)
    peak_mib = int(out.stdout.strip()) / 1024
    assert peak_mib < 100, peak_mib


def _swap_for_fifo_on_first_progress(target: Path):
    swapped: list[int] = []

    def progress(n: int) -> None:
        if not swapped:
            swapped.append(n)
            target.unlink()
            os.mkfifo(target)

    return progress


def test_tiny_file_swapped_for_a_fifo_after_the_walk_is_named(tree: Path,
                                                              manifest: Manifest) -> None:
    """The walk does not stat tiny regular files; the fstat of the descriptor each is read
    through decides. A FIFO swapped in after the walk is named and never read (no hang)."""
    target = tree / "data" / "train" / "part-1.csv"
    _fails(tree, manifest, "modified: data/train/part-1.csv (replaced by a FIFO)", jobs=1,
           progress=_swap_for_fifo_on_first_progress(target))


def test_create_names_a_tiny_file_swapped_for_a_fifo(tree: Path) -> None:
    target = tree / "data" / "train" / "part-1.csv"
    with pytest.raises(IntegrityError, match="changed while the manifest") as info:
        create_manifest(tree, jobs=1, progress=_swap_for_fifo_on_first_progress(target))
    assert "data/train/part-1.csv: replaced by a FIFO" in info.value.details


def test_tiny_file_grown_past_the_tiny_limit_is_reported_by_size(tree: Path,
                                                                 manifest: Manifest) -> None:
    (tree / "data" / "labels.json").write_bytes(b"x" * (256 * 1024))
    _fails(tree, manifest, f"modified: data/labels.json (size {256 * 1024}, manifest 8)")


def test_create_records_sizes_of_files_found_large_after_the_walk(tmp_path: Path) -> None:
    """Sizes of files the walk did not stat come from their descriptors: tiny, just below and
    above the tiny limit, and sharded."""
    sizes = {"a": 0, "b": 65535, "c": 262143, "d": 262144, "e": 3 * MiB + 1}
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(os.urandom(size))
    m = create_manifest(tmp_path, shard_size=MiB)
    assert {e.path: e.size for e in m.entries} == sizes
    assert m.entries[-1].scheme == "sha256-sharded"
    verify_manifest(tmp_path, m)


def test_medium_files_shared_between_threads_match_and_tampering_is_named(
        tmp_path: Path) -> None:
    """Files between 32 KiB and 256 KiB go through the direct path on all threads: digests
    equal one thread's and hashlib's, and a flipped byte, a truncation and a swap for a
    symlink among them are each named."""
    root = tmp_path / "ds"
    blobs: dict[str, bytes] = {}
    for i in range(300):
        d = root / f"d{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        blobs[f"d{i % 7}/f{i:03d}.bin"] = data = os.urandom(48 * 1024 + i * 601)
        (root / f"d{i % 7}/f{i:03d}.bin").write_bytes(data)
    for i in range(40):
        blobs[f"tiny/t{i}"] = data = os.urandom(i * 13)
        (root / "tiny").mkdir(exist_ok=True)
        (root / f"tiny/t{i}").write_bytes(data)
    threads: set[str] = set()

    def progress(n: int) -> None:
        threads.add(threading.current_thread().name)

    m2 = create_manifest(root, jobs=2, progress=progress)
    m1 = create_manifest(root, jobs=1)
    assert m2 == m1
    assert len(threads) == 2, threads  # the second thread joined the direct path
    assert {e.path: e.digest for e in m2.entries} == {
        k: "sha256:" + hashlib.sha256(v).hexdigest() for k, v in blobs.items()}
    verify_manifest(root, m2, jobs=2)

    flipped = root / "d3/f150.bin"
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 1
    flipped.write_bytes(raw)
    with open(root / "d5/f250.bin", "r+b") as fh:
        fh.truncate(1000)
    (root / "d1/f001.bin").unlink()
    (root / "d1/f001.bin").symlink_to(root / "d1/f008.bin")
    with pytest.raises(IntegrityError) as info:
        verify_manifest(root, m2, jobs=2)
    details = "\n".join(info.value.details)
    assert "modified: d3/f150.bin (content differs)" in details
    assert "modified: d5/f250.bin (size 1000, manifest" in details
    assert "type changed: d1/f001.bin (expected file, found symlink" in details
    assert len(info.value.details) == 3


def test_a_failing_progress_callback_stops_every_thread(tmp_path: Path) -> None:
    """An exception in one hashing thread reaches the caller, and the other threads stop after
    their current chunk instead of hashing the rest of the tree."""
    for i in range(1000):
        d = tmp_path / f"d{i % 10}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:04d}").write_bytes(os.urandom(40 * 1024))
    calls: list[int] = []

    def progress(n: int) -> None:
        calls.append(n)
        if len(calls) == 200:
            raise RuntimeError("progress display failed")

    with pytest.raises(RuntimeError, match="progress display failed"):
        create_manifest(tmp_path, jobs=2, progress=progress)
    # The failing chunk and at most one chunk per thread after it (64 files each).
    assert 200 <= len(calls) < 200 + 3 * 64, len(calls)


def test_staging_shares_files_above_64_kib_between_threads(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(64):
        (src / f"f{i:02d}").write_bytes(os.urandom(150_000))
    m = create_manifest(src)
    threads: set[str] = set()

    def progress(n: int) -> None:
        threads.add(threading.current_thread().name)

    report = stage_and_verify(src, m, tmp_path / "staged", jobs=2, progress=progress)
    assert report.files == 64
    assert any(t.startswith("stepguard-hash") for t in threads), threads


def test_threads_leave_and_rejoin_the_direct_path_as_file_sizes_change(tmp_path: Path) -> None:
    """Medium files, then tiny ones, then medium again: every digest is right with two threads.
    The other thread starts from the back (the second medium stretch), passes the tiny stretch
    and rejoins the first medium stretch, which both threads then share."""
    blobs: dict[str, bytes] = {}
    for group, (count, size) in enumerate([(1500, 50_000), (400, 100), (200, 60_000)]):
        d = tmp_path / f"g{group}"
        d.mkdir()
        for i in range(count):
            blobs[f"g{group}/f{i:04d}"] = data = os.urandom(size)
            (d / f"f{i:04d}").write_bytes(data)
    seen: dict[int, set[str]] = {}

    def progress(n: int) -> None:
        seen.setdefault(n, set()).add(threading.current_thread().name)

    m = create_manifest(tmp_path, jobs=2, progress=progress)
    assert {e.path: e.digest for e in m.entries} == {
        k: "sha256:" + hashlib.sha256(v).hexdigest() for k, v in blobs.items()}
    assert len(seen[50_000]) == 2 and "stepguard-hash_0" in seen[60_000], seen


def test_a_large_file_sorted_last_is_not_left_for_the_end(tmp_path: Path) -> None:
    """A large file found only when opened (create does not stat files while walking), sorted
    after many medium ones: its shards are hashed early, and the run ends on medium files
    rather than on one thread finishing a shard alone."""
    small = tmp_path / "small"
    small.mkdir()
    for i in range(1500):
        (small / f"f{i:04d}").write_bytes(os.urandom(50_000))
    (tmp_path / "weights.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    order: list[int] = []

    def progress(n: int) -> None:
        order.append(n)

    m = create_manifest(tmp_path, jobs=2, shard_size=1024 * 1024, progress=progress)
    assert m.entries[-1].digest.startswith("sha256-sharded:")
    last_shard = max(i for i, n in enumerate(order) if n != 50_000)
    assert order[last_shard + 1:].count(50_000) >= 64, (last_shard, len(order))
