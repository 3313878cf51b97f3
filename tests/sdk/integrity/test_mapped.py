"""Hashing large files from mappings under a read lease, and medium files on several threads.

Large files (8 MiB and more, or shards that size) are hashed from read-only mappings while a read
lease keeps writers out; the digests must equal plain reads', a truncation meanwhile must be a
finding rather than a SIGBUS, and a file someone has open for writing is read as before.
"""

from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import blake3
import pytest

from stepguard.errors import IntegrityError
from stepguard.integrity import _mapped, create_manifest, verify_manifest

MiB = 2**20

needs_leases = pytest.mark.skipif(
    not _mapped.leases_usable(),
    reason="this system grants no read leases (or fs.lease-break-time is below 5 s), so "
           "large files are read with pread and never mapped",
)


def _sharded(data: bytes, shard: int) -> str:
    parts = b"".join(hashlib.sha256(data[i:i + shard]).digest()
                     for i in range(0, len(data), shard))
    return "sha256-sharded:" + hashlib.sha256(parts).hexdigest()


@needs_leases
def test_lease_is_granted_on_an_own_file_and_refused_while_someone_writes(
        tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 100)
    fd = os.open(f, os.O_RDONLY)
    try:
        assert _mapped.take_read_lease(fd)
        assert _mapped.still_leased(fd)
    finally:
        os.close(fd)
    with open(f, "r+b"):
        fd = os.open(f, os.O_RDONLY)
        try:
            assert not _mapped.take_read_lease(fd)
        finally:
            os.close(fd)


def test_mapped_digests_equal_plain_reads(tmp_path: Path) -> None:
    """Shards at offsets that are not page-aligned, a whole file over several windows, and
    BLAKE3: each digest recomputed here from the bytes."""
    data = os.urandom(30 * MiB + 4567)
    (tmp_path / "w.bin").write_bytes(data)
    shard = 9 * MiB + 123
    sharded = create_manifest(tmp_path, shard_size=shard)
    assert sharded.entries[0].digest == _sharded(data, shard)
    whole = create_manifest(tmp_path, shard_size=0)
    assert whole.entries[0].digest == "sha256:" + hashlib.sha256(data).hexdigest()
    b3 = create_manifest(tmp_path, algorithm="blake3")
    assert b3.entries[0].digest == "blake3:" + blake3.blake3(data).hexdigest()
    for m in (sharded, whole, b3):
        verify_manifest(tmp_path, m)


def test_a_file_open_for_writing_is_read_without_a_mapping(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    data = os.urandom(20 * MiB)
    f = tmp_path / "w.bin"
    f.write_bytes(data)
    mapped: list[int] = []
    real = _mapped.hash_mapped

    def counting(fd: int, *args: object) -> int:
        mapped.append(fd)
        return real(fd, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(_mapped, "hash_mapped", counting)
    with open(f, "r+b"):
        m = create_manifest(tmp_path, shard_size=0)
    assert m.entries[0].digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert mapped == []
    create_manifest(tmp_path, shard_size=0)
    assert bool(mapped) == _mapped.leases_usable()


_TRUNCATE_WHILE_HASHING = r"""
import os, subprocess, sys, time
from stepguard.errors import IntegrityError
from stepguard.integrity import create_manifest, verify_manifest
path = sys.argv[1]
root = os.path.dirname(path)
ino = os.stat(path).st_ino
m = create_manifest(root, shard_size=0)
seen, writer = [], []

def breaking():
    # The kernel lists a lease whose holder has been asked to give it up as BREAKING.
    with open("/proc/locks") as fh:
        return any("LEASE" in l and "BREAKING" in l and f":{ino} " in l for l in fh)

def progress(n):
    seen.append(n)
    if len(seen) == 1:
        writer.append(subprocess.Popen(
            [sys.executable, "-c", "import os, sys; os.truncate(sys.argv[1], 4096)", path]))
        # Wait until the truncation is held up by the lease this window was hashed under.
        deadline = time.monotonic() + 60
        while not breaking():
            if writer[0].poll() is not None:
                print("TRUNCATED UNDER THE MAPPING")
                break
            assert time.monotonic() < deadline, "the truncation never reached the lease"
            time.sleep(0.01)
    elif len(seen) == 2:
        writer[0].wait(timeout=60)  # the lease was given up: the truncation goes through

try:
    verify_manifest(root, m, jobs=1, progress=progress)
    print("VERIFIED")
except IntegrityError as exc:
    print("FINDING", exc.details)
print("WRITER", writer[0].wait(timeout=60), "SIZE", os.path.getsize(path))
print("SEEN", seen)
"""


@needs_leases
def test_truncation_while_a_file_is_mapped_is_a_finding_not_a_crash(tmp_path: Path) -> None:
    """Run in a child process: without the lease, the truncation would go through under the
    mapping and the next window would kill the verifier with SIGBUS."""
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(40 * MiB))
    out = subprocess.run([sys.executable, "-c", _TRUNCATE_WHILE_HASHING, str(big)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "TRUNCATED UNDER THE MAPPING" not in out.stdout
    assert "FINDING ('modified: big.bin (truncated while verifying)',)" in out.stdout, out.stdout
    assert "WRITER 0 SIZE 4096" in out.stdout, out.stdout
    # One mapped window; once the writer waited, the lease was given up and the rest (if the
    # truncation had not landed yet) read in 1 MiB preads, never mapped again.
    seen = ast.literal_eval(out.stdout.rsplit("SEEN ", 1)[1])
    assert seen[0] == _mapped.WINDOW and all(n == MiB for n in seen[1:]), seen


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
    m2 = create_manifest(root, jobs=2)
    m1 = create_manifest(root, jobs=1)
    assert m2 == m1
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


@needs_leases
@pytest.mark.parametrize("failure", ["mmap", "madvise"])
def test_a_file_that_cannot_be_mapped_is_read_instead(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      failure: str) -> None:
    """A FUSE mount that refuses mmap (ENODEV) and a kernel without MADV_POPULATE_READ
    (EINVAL) are not available here, so ``mmap.mmap`` is replaced by one that fails that way:
    the file is read with pread from where the mapping stopped, and the digest is right."""
    import errno
    import mmap as real_mmap

    data = os.urandom(20 * MiB + 77)
    (tmp_path / "w.bin").write_bytes(data)
    calls: list[int] = []

    class Refusing(real_mmap.mmap):
        def madvise(self, *args: int) -> None:  # type: ignore[override]
            raise OSError(errno.EINVAL, "Invalid argument")

    def fake_mmap(fd: int, length: int, **kw: int) -> real_mmap.mmap:
        calls.append(length)
        if failure == "mmap" and len(calls) > 1:
            raise OSError(errno.ENODEV, "No such device")
        if failure == "madvise" and len(calls) > 1:
            return Refusing(fd, length, **kw)
        return real_mmap.mmap(fd, length, **kw)

    monkeypatch.setattr(_mapped.mmap, "mmap", fake_mmap)
    m = create_manifest(tmp_path, shard_size=0)
    assert m.entries[0].digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert calls == [_mapped.WINDOW, _mapped.WINDOW]  # one window mapped, then pread
