"""Pickles the unsafe-format gate used to miss, published and fetched through the real registry.

Red-team finding 4: with ``allow_pickle=False`` these were published, fetched, verified and
executed on load -- a protocol-0 pickle named ``weights.safetensors``, a protocol-1 pickle named
``model.dat``, gzip/bzip2/xz/zlib-compressed pickles, and zip archives whose pickle member does
not end in ``.pkl``. Every payload creates a marker file when unpickled: the control test loads
each one the naive way (in a subprocess) to prove the payload is live, and the attack tests
assert the gate refuses it at publish and at fetch, and that the marker never appears.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest

from stepguard.errors import PolicyViolation
from stepguard.registry import open_registry
from stepguard.signing import KeyPolicy, KeySigner, parse_policy, sign_model, verify_model


def _payload(marker: Path, protocol: int) -> bytes:
    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    return pickle.dumps(Boom(), protocol=protocol)


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _object_npy(body: bytes) -> bytes:
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += " " * (64 - (10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + body


# name -> (file bytes, how a naive loader gets the pickle back out of them)
def _cases(marker: Path) -> dict[str, tuple[bytes, str]]:
    return {
        "weights.safetensors": (_payload(marker, 0), "raw"),
        "model.dat": (_payload(marker, 1), "raw"),
        "weights.gz": (gzip.compress(_payload(marker, 0)), "gzip"),
        "weights.bz2": (bz2.compress(_payload(marker, 2)), "bz2"),
        "weights.xz": (lzma.compress(_payload(marker, 1)), "xz"),
        "estimator.model": (zlib.compress(_payload(marker, 4)), "zlib"),  # joblib's compress=True
        "checkpoint.zip": (_zip({"archive/data": _payload(marker, 2)}), "zip:archive/data"),
        "nested.zip": (_zip({"inner.bin": gzip.compress(_payload(marker, 0))}), "zipgz:inner.bin"),
        "embeddings.npz": (_zip({"emb.npy": _object_npy(_payload(marker, 2))}), "npz:emb.npy"),
    }


LOADER = """
import bz2, gzip, lzma, pickle, sys, zipfile, zlib
path, how = sys.argv[1], sys.argv[2]
data = open(path, 'rb').read()
if how == 'gzip': data = gzip.decompress(data)
elif how == 'bz2': data = bz2.decompress(data)
elif how == 'xz': data = lzma.decompress(data)
elif how == 'zlib': data = zlib.decompress(data)
elif how.startswith(('zip:', 'zipgz:', 'npz:')):
    data = zipfile.ZipFile(path).read(how.split(':', 1)[1])
    if how.startswith('zipgz:'): data = gzip.decompress(data)
    if how.startswith('npz:'): data = data[data.index(b'\\n') + 1:]  # what np.load does
pickle.loads(data)
"""

NAMES = ["weights.safetensors", "model.dat", "weights.gz", "weights.bz2", "weights.xz",
         "estimator.model", "checkpoint.zip", "nested.zip", "embeddings.npz"]


@pytest.mark.parametrize("name", NAMES)
def test_control_each_payload_runs_when_loaded_naively(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "RAN"
    data, how = _cases(marker)[name]
    f = tmp_path / name
    f.write_bytes(data)
    subprocess.run([sys.executable, "-c", LOADER, str(f), how], check=False,
                   capture_output=True, timeout=60)
    assert marker.exists()


@pytest.mark.parametrize("name", NAMES)
def test_pickle_is_refused_at_publish_and_at_fetch_and_never_runs(
        tmp_path: Path, model: Path, keys, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "PWNED"
    data, _ = _cases(marker)[name]
    (model / name).write_bytes(data)
    reg = open_registry(f"file://{tmp_path}/registry")
    signer = KeySigner(keys.private)
    policy = KeyPolicy(public_keys=(keys.public,))

    with pytest.raises(PolicyViolation, match="unsafe model format") as refused:
        reg.publish(model, "bert", "1.0", signer=signer)
    assert refused.value.subject == name
    with pytest.raises(PolicyViolation):
        sign_model(model, signer)

    # A publisher holding a trusted key who skips the gate: fetch must still refuse.
    import stepguard.signing
    import stepguard.signing._formats as formats

    with monkeypatch.context() as m:
        m.setattr(formats, "check_formats", lambda *a, **k: [])
        m.setattr(stepguard.signing, "check_formats", lambda *a, **k: [])
        reg.publish(model, "bert", "1.0", signer=signer)
    dest = tmp_path / "fetched"
    with pytest.raises(PolicyViolation, match="unsafe model format") as refused:
        reg.fetch("bert", "1.0", policy=policy, dest=dest)
    assert refused.value.subject == name
    assert not dest.exists()
    assert not marker.exists()


def _safetensors() -> bytes:
    header = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    return struct.pack("<Q", len(header)) + header + b"\0" * 8


def _onnx() -> bytes:
    return b"\x08\x07" + b"\x3a\x02\x0a\x00"  # ir_version 7, an (empty) graph


def test_a_format_allow_list_refuses_anything_unrecognised(tmp_path: Path, keys) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(_safetensors())
    (model / "model.onnx").write_bytes(_onnx())
    (model / "config.json").write_text('{"hidden": 8}\n')
    (model / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    sig = tmp_path / "m.sig"
    sign_model(model, KeySigner(keys.private), bundle_path=sig)
    policy = parse_policy(f"key:keys={keys.public};formats=safetensors,onnx,gguf,json,text")
    assert policy.allowed_formats == ("gguf", "json", "onnx", "safetensors", "text")
    verify_model(model, sig, policy)

    # Bytes no recogniser vouches for (here: a format the gate does not know) are refused.
    (model / "weights.raw").write_bytes(os.urandom(4096).replace(b"\x80", b"\x81"))
    sign_model(model, KeySigner(keys.private), bundle_path=sig)  # no allow-list at signing
    with pytest.raises(PolicyViolation, match="unsafe model format") as refused:
        verify_model(model, sig, policy)
    assert refused.value.subject == "weights.raw"
    assert "not in the policy's format allow-list" in refused.value.details[0]
    verify_model(model, sig, KeyPolicy(public_keys=(keys.public,)))  # without one: accepted


def test_uninspectable_streams_are_refused_when_pickles_are_not_allowed(tmp_path: Path,
                                                                       keys) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "weights.zst").write_bytes(b"(\xb5/\xfd" + os.urandom(64))  # zstd: may hide one
    with pytest.raises(PolicyViolation, match="unsafe model format") as refused:
        sign_model(model, KeySigner(keys.private))
    assert "cannot be opened" in refused.value.details[0]


def test_content_detection_does_not_refuse_real_formats(tmp_path: Path, keys) -> None:
    # A safetensors header of 384 bytes starts b"\x80\x01": a pickle PROTO header, nothing more.
    model = tmp_path / "m"
    model.mkdir()
    header = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    header += b" " * (384 - len(header))
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    (model / "model.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\0" * 64)
    (model / "README.md").write_text("# A model\n\nconfig\nvalue\n")
    sig = tmp_path / "m.sig"
    sign_model(model, KeySigner(keys.private), bundle_path=sig)
    verify_model(model, sig, parse_policy(f"key:keys={keys.public};formats=safetensors,gguf,text"))
