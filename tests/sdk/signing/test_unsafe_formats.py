"""Pickle-based files: refused by default; with allow_pickle both scanners must pass.

Every payload below would create a marker file if it were ever unpickled; each test asserts the
marker does not exist afterwards, so "refused" also means "never ran".
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import pytest

from stepguard.errors import PolicyViolation
from stepguard.signing import KeyPolicy, KeySigner, sign_model, verify_model


def _reduce_pickle(func, args) -> bytes:
    class P:
        def __reduce__(self):
            return (func, args)

    return pickle.dumps(P(), protocol=4)


def _payloads(marker: Path) -> dict[str, bytes]:
    import cProfile
    import os
    import timeit

    code = f"open({str(marker)!r}, 'w').write('pwned')"
    inner = _reduce_pickle(os.system, (f"touch {marker}",))
    locate = (b"cpydoc\nlocate\n(S'os.system'\ntR(S'touch " + str(marker).encode()
              + b"'\ntR.")
    return {
        "os_system.pkl": _reduce_pickle(os.system, (f"touch {marker}",)),
        "eval.pt": _reduce_pickle(eval, (code,)),
        "nested.bin": _reduce_pickle(pickle.loads, (inner,)),
        "timeit.pth": _reduce_pickle(timeit.timeit, (code,)),
        "cprofile.joblib": _reduce_pickle(cProfile.run, (code,)),
        "pydoc_locate.ckpt": locate,
        "hidden.safetensors.tmp": _reduce_pickle(os.system, (f"touch {marker}",)),
    }


def _object_npy(marker: Path) -> bytes:
    import os

    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += " " * (64 - (10 + len(header) + 1) % 64) + "\n"
    body = _reduce_pickle(os.system, (f"touch {marker}",))
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + body


def _sign_unchecked(model: Path, keys, path: Path) -> Path:
    from stepguard.signing import build_model_statement
    from stepguard.signing._hashing import hash_files, walk

    stmt = build_model_statement("model", hash_files(walk(model).files))
    path.write_bytes(KeySigner(keys.private).sign_dsse(stmt))
    return path


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PWNED"


def _cases(marker: Path) -> dict[str, bytes]:
    cases = _payloads(marker)
    cases["weights.npy"] = _object_npy(marker)
    return cases


@pytest.mark.parametrize("name", [
    "os_system.pkl", "eval.pt", "nested.bin", "timeit.pth", "cprofile.joblib",
    "pydoc_locate.ckpt", "hidden.safetensors.tmp", "weights.npy",
])
def test_malicious_pickles_refused_and_never_run(model, keys, tmp_path, marker, name):
    data = _cases(marker)[name]
    # default: refused at signing time...
    (model / name).write_bytes(data)
    with pytest.raises(PolicyViolation, match="unsafe model format") as exc:
        sign_model(model, KeySigner(keys.private))
    assert exc.value.subject == name
    # allow_pickle at signing time: the scanners refuse it there too
    with pytest.raises(PolicyViolation, match="scanners refused"):
        sign_model(model, KeySigner(keys.private), allow_pickle=True)
    # ...and at verification time, even when a trusted key signed it without any checks
    sig = _sign_unchecked(model, keys, tmp_path / "m.sig")
    with pytest.raises(PolicyViolation, match="unsafe model format") as exc:
        verify_model(model, sig, KeyPolicy(public_keys=(keys.public,)))
    assert exc.value.subject == name
    # allowed by policy: both scanners run, and the payload is still refused
    with pytest.raises(PolicyViolation, match="scanners refused") as exc:
        verify_model(model, sig, KeyPolicy(public_keys=(keys.public,), allow_pickle=True))
    assert exc.value.subject == name
    assert not marker.exists()


def test_benign_pickle_passes_only_when_allowed(model, keys, tmp_path, marker):
    (model / "stats.pkl").write_bytes(pickle.dumps({"mean": [0.5, 0.25], "n": 3}, protocol=4))
    sig = tmp_path / "m.sig"
    sign_model(model, KeySigner(keys.private), bundle_path=sig, allow_pickle=True)
    with pytest.raises(PolicyViolation):
        verify_model(model, sig, KeyPolicy(public_keys=(keys.public,)))
    ok = verify_model(model, sig, KeyPolicy(public_keys=(keys.public,), allow_pickle=True))
    assert ok.pickles_scanned == ("stats.pkl",)


def test_safetensors_onnx_and_numeric_npy_pass(model, keys, tmp_path):
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }"
    header += " " * (64 - (10 + len(header) + 1) % 64) + "\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 8
    (model / "emb.npy").write_bytes(npy)
    sig = tmp_path / "m.sig"
    sign_model(model, KeySigner(keys.private), bundle_path=sig)
    verify_model(model, sig, KeyPolicy(public_keys=(keys.public,)))


def test_single_file_pickle_refused(tmp_path, keys):
    f = tmp_path / "model.pt"
    f.write_bytes(pickle.dumps([1, 2], protocol=4))
    with pytest.raises(PolicyViolation, match="model.pt"):
        sign_model(f, KeySigner(keys.private))
