"""Model signatures: round trip, stock model_signing interop both ways, and every refusal."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepguard.errors import ConfigurationError, IntegrityError, SignatureError
from stepguard.signing import (
    KeyPolicy,
    KeySigner,
    UnsafeVerificationWarning,
    build_model_statement,
    sign_model,
    unsafe_skip_verification,
    verify_model,
)
from stepguard.signing._bundle import build_key_bundle, dump_bundle, pae, public_key_hint

MS_CLI = str(Path(sys.executable).parent / "model_signing")


def _stock(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MS_CLI, *args], capture_output=True, text=True, timeout=120)


def _policy(keys) -> KeyPolicy:
    return KeyPolicy(public_keys=(keys.public,))


def test_round_trip_and_result(model, keys, tmp_path):
    signed = sign_model(model, KeySigner(keys.private), bundle_path=tmp_path / "m.sig")
    ok = verify_model(model, tmp_path / "m.sig", _policy(keys))
    assert ok.root_digest == signed.root_digest
    assert set(ok.files) == {"model.safetensors", "config.json", "tokenizer/vocab.txt",
                             "model.onnx"}
    assert ok.signer == signed.signer == KeySigner(keys.private).identity
    doc = json.loads(tmp_path.joinpath("m.sig").read_text())
    assert doc["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    stmt = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    assert stmt["_type"] == "https://in-toto.io/Statement/v1"


def test_ours_verifies_with_stock_cli(model, keys, tmp_path):
    sig = tmp_path / "m.sig"
    sign_model(model, KeySigner(keys.private), bundle_path=sig)
    res = _stock("verify", "key", str(model), "--signature", str(sig),
                 "--public_key", str(keys.public))
    assert res.returncode == 0, res.stderr
    (model / "config.json").write_text('{"hidden": 9}\n')
    res = _stock("verify", "key", str(model), "--signature", str(sig),
                 "--public_key", str(keys.public))
    assert res.returncode != 0


def test_stock_cli_bundle_verifies_with_ours(model, keys, tmp_path):
    sig = tmp_path / "stock.sig"
    res = _stock("sign", "key", str(model), "--private_key", str(keys.private),
                 "--signature", str(sig))
    assert res.returncode == 0, res.stderr
    ok = verify_model(model, sig, _policy(keys))
    assert ok.name == "model"
    # signature file inside the model directory, as the CLI's default does
    inner = model / "model.sig"
    res = _stock("sign", "key", str(model), "--private_key", str(keys.private),
                 "--signature", str(inner))
    assert res.returncode == 0, res.stderr
    verify_model(model, inner, _policy(keys))
    (model / "tokenizer" / "vocab.txt").write_text("evil\n")
    with pytest.raises(IntegrityError, match="tokenizer/vocab.txt"):
        verify_model(model, inner, _policy(keys))


@pytest.fixture
def signed(model, keys, tmp_path):
    sig = tmp_path / "m.sig"
    sign_model(model, KeySigner(keys.private), bundle_path=sig)
    return model, sig


def test_flipped_byte_refused(signed, keys):
    model, sig = signed
    p = model / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as exc:
        verify_model(model, sig, _policy(keys))
    assert exc.value.subject == "model.safetensors"
    assert "modified: model.safetensors" in exc.value.details


def test_added_file_refused(signed, keys):
    model, sig = signed
    (model / "backdoor.py").write_text("import os")
    with pytest.raises(IntegrityError, match="backdoor.py") as exc:
        verify_model(model, sig, _policy(keys))
    assert any("unsigned file" in d for d in exc.value.details)


def test_git_paths_are_outside_the_signature_and_never_model_files(signed, keys, tmp_path):
    # As the stock tool (ignore_git_paths): top-level git metadata is not part of the model.
    # What a verification returns, and what a registry fetch materialises, never includes it.
    model, sig = signed
    (model / ".git").mkdir()
    (model / ".git" / "hook").write_text("payload")
    ok = verify_model(model, sig, _policy(keys))
    assert not any(f.startswith(".git") for f in ok.files)
    # ...but the same name anywhere below the top is an unsigned model file.
    (model / "tokenizer" / ".git").mkdir()
    (model / "tokenizer" / ".git" / "hook").write_text("payload")
    with pytest.raises(IntegrityError, match="tokenizer/.git/hook"):
        verify_model(model, sig, _policy(keys))


def test_removed_file_refused(signed, keys):
    model, sig = signed
    (model / "config.json").unlink()
    with pytest.raises(IntegrityError, match="config.json") as exc:
        verify_model(model, sig, _policy(keys))
    assert "missing: config.json" in exc.value.details


def test_renamed_file_refused(signed, keys):
    model, sig = signed
    (model / "model.onnx").rename(model / "model2.onnx")
    with pytest.raises(IntegrityError) as exc:
        verify_model(model, sig, _policy(keys))
    assert "missing: model.onnx" in exc.value.details
    assert any("model2.onnx" in d for d in exc.value.details)


def test_symlink_swapped_in_after_signing_refused(signed, keys, tmp_path):
    model, sig = signed
    outside = tmp_path / "outside.json"
    outside.write_text('{"hidden": 8}\n')  # same bytes: only the link itself is wrong
    (model / "config.json").unlink()
    (model / "config.json").symlink_to(outside)
    with pytest.raises(IntegrityError, match="config.json") as exc:
        verify_model(model, sig, _policy(keys))
    assert any("symlink" in d for d in exc.value.details)


def test_signature_by_another_key_refused(model, keys, other_keys, tmp_path):
    sig = tmp_path / "m.sig"
    sign_model(model, KeySigner(other_keys.private), bundle_path=sig)
    with pytest.raises(SignatureError, match="does not accept"):
        verify_model(model, sig, _policy(keys))


def test_forged_hint_refused(model, keys, other_keys, tmp_path):
    # An attacker's signature carrying the trusted key's hint still fails the signature check.
    sig = tmp_path / "m.sig"
    sign_model(model, KeySigner(other_keys.private), bundle_path=sig)
    doc = json.loads(sig.read_text())
    doc["verificationMaterial"]["publicKey"]["hint"] = public_key_hint(keys.public.read_bytes())
    sig.write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_model(model, sig, _policy(keys))


def test_tampered_payload_refused(signed, keys):
    model, sig = signed
    doc = json.loads(sig.read_text())
    stmt = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    stmt["predicate"]["resources"].pop()
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()
    sig.write_text(json.dumps(doc))
    with pytest.raises(SignatureError):
        verify_model(model, sig, _policy(keys))


def test_old_bundle_replayed_onto_new_model_refused(model, keys, tmp_path, mk):
    old = tmp_path / "v1.sig"
    sign_model(model, KeySigner(keys.private), bundle_path=old)
    mk(model, seed=b"v2")  # new weights, same file names
    sign_model(model, KeySigner(keys.private), bundle_path=tmp_path / "v2.sig")
    verify_model(model, tmp_path / "v2.sig", _policy(keys))
    with pytest.raises(IntegrityError, match="model"):
        verify_model(model, old, _policy(keys))


def test_bundle_for_a_different_model_refused(model, keys, tmp_path, mk):
    other = mk(tmp_path / "other", seed=b"zz")
    (other / "extra.txt").write_text("x")
    sig = tmp_path / "other.sig"
    sign_model(other, KeySigner(keys.private), bundle_path=sig)
    with pytest.raises(IntegrityError):
        verify_model(model, sig, _policy(keys))
    # same bytes under another name: the expected name check catches it
    same = tmp_path / "same.sig"
    sign_model(model, KeySigner(keys.private), bundle_path=same, name="resnet")
    with pytest.raises(SignatureError, match="different model"):
        verify_model(model, same, _policy(keys), expected_name="bert")


def _sign_raw_statement(keys, stmt: dict, path: Path) -> Path:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_private_key(keys.private.read_bytes(), None)
    payload = json.dumps(stmt).encode()
    sig = key.sign(pae("application/vnd.in-toto+json", payload), ec.ECDSA(hashes.SHA256()))
    path.write_bytes(dump_bundle(build_key_bundle(
        payload, sig, hint=public_key_hint(keys.public.read_bytes()))))
    return path


def _statement(model: Path, **ser) -> dict:
    from stepguard.signing._hashing import hash_files, walk

    digests = hash_files(walk(model).files)
    stmt = json.loads(build_model_statement("model", digests))
    stmt["predicate"]["serialization"].update(ser)
    return stmt


def test_manifest_entry_escaping_model_dir_refused(model, keys, tmp_path):
    # Even validly signed by the trusted key, '../' entries are refused before any file is read.
    (tmp_path / "secret.txt").write_text("outside")
    stmt = _statement(model)
    stmt["predicate"]["resources"].append(
        {"name": "../secret.txt", "algorithm": "sha256", "digest": "0" * 64})
    from stepguard.signing._bundle import root_digest

    stmt["subject"][0]["digest"]["sha256"] = root_digest(
        [(r["name"], r["digest"]) for r in stmt["predicate"]["resources"]])
    sig = _sign_raw_statement(keys, stmt, tmp_path / "evil.sig")
    with pytest.raises(SignatureError, match="unsafe entries") as exc:
        verify_model(model, sig, _policy(keys))
    assert any("../secret.txt" in d for d in exc.value.details)


@pytest.mark.parametrize("setting,value,needle", [
    ("allow_symlinks", True, "allow_symlinks"),
    ("ignore_paths", [".git", "weights"], "weights"),
    ("method", "shards", "shards"),
    ("hash_type", "blake2", "blake2"),
])
def test_signed_serialization_outside_allow_list_refused(model, keys, tmp_path, setting,
                                                         value, needle):
    stmt = _statement(model, **{setting: value})
    sig = _sign_raw_statement(keys, stmt, tmp_path / "x.sig")
    with pytest.raises(SignatureError, match="allow-list") as exc:
        verify_model(model, sig, _policy(keys))
    assert any(needle in d for d in exc.value.details)


def test_no_default_policy(signed):
    model, sig = signed
    with pytest.raises(ConfigurationError, match="policy"):
        verify_model(model, sig, None)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        KeyPolicy(public_keys=())


def test_unsafe_skip_verification_warns_every_time(signed, other_keys):
    model, sig = signed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy = unsafe_skip_verification("offline demo")
        verify_model(model, sig, policy)
        verify_model(model, sig, policy)
    assert sum(issubclass(w.category, UnsafeVerificationWarning) for w in caught) == 3
    # integrity is still enforced
    (model / "config.json").write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(IntegrityError):
            verify_model(model, sig, policy)


def test_malformed_bundles_refused(model, keys, tmp_path):
    for text in ("not json", "[]", '{"mediaType": "x"}',
                 '{"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json"}'):
        p = tmp_path / "bad.sig"
        p.write_text(text)
        with pytest.raises(SignatureError):
            verify_model(model, p, _policy(keys))


def test_signing_refuses_links_and_special_files(model, keys, tmp_path):
    os.symlink("/etc/passwd", model / "passwd")
    with pytest.raises(IntegrityError, match="passwd"):
        sign_model(model, KeySigner(keys.private))
    (model / "passwd").unlink()
    os.mkfifo(model / "fifo")
    with pytest.raises(IntegrityError, match="fifo"):
        sign_model(model, KeySigner(keys.private))


def test_password_not_in_repr(keys):
    signer = KeySigner(keys.private, password="canary-Pw-123")
    assert "canary-Pw-123" not in repr(signer)


def test_parse_policy_forms(signed, keys, other_keys):
    from stepguard.signing import parse_policy

    model, sig = signed
    verify_model(model, sig, parse_policy(f"key:{keys.public}"))
    verify_model(model, sig, parse_policy(f"key:keys={other_keys.public},{keys.public}"))
    with pytest.raises(SignatureError):
        verify_model(model, sig, parse_policy(f"key:keys={other_keys.public}"))
    assert parse_policy(f"key:keys={keys.public};allow_pickle=true").allow_pickle
    for bad in ("", "none:", "key:bogus=1", "sigstore:identity=x"):
        with pytest.raises(ConfigurationError):
            parse_policy(bad)


def test_single_file_model_interop_both_ways(model, keys, tmp_path):
    weights = model / "model.safetensors"
    ours = tmp_path / "ours.sig"
    sign_model(weights, KeySigner(keys.private), bundle_path=ours)
    res = _stock("verify", "key", str(weights), "--signature", str(ours),
                 "--public_key", str(keys.public))
    assert res.returncode == 0, res.stderr
    stock = tmp_path / "stock.sig"
    res = _stock("sign", "key", str(weights), "--private_key", str(keys.private),
                 "--signature", str(stock))
    assert res.returncode == 0, res.stderr
    verify_model(weights, stock, _policy(keys))
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(IntegrityError, match="model.safetensors") as exc:
        verify_model(weights, stock, _policy(keys))
    assert exc.value.details == ("modified: .",)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_byte_flip_is_refused(signed, keys, data):
    model, sig = signed
    files = sorted(p for p in model.rglob("*") if p.is_file())
    target = data.draw(st.sampled_from(files))
    raw = bytearray(target.read_bytes())
    pos = data.draw(st.integers(0, len(raw) - 1))
    bit = data.draw(st.integers(0, 7))
    raw[pos] ^= 1 << bit
    target.write_bytes(bytes(raw))
    try:
        with pytest.raises(IntegrityError) as exc:
            verify_model(model, sig, _policy(keys))
        assert exc.value.subject == target.relative_to(model).as_posix()
    finally:
        raw[pos] ^= 1 << bit
        target.write_bytes(bytes(raw))


def test_directory_swapped_after_the_walk_is_not_hashed_through(model, keys, tmp_path,
                                                                 monkeypatch):
    """Signing lists the files; integrity reads them through directories it has checked, so a
    subdirectory swapped for a link between the two is refused, not signed from elsewhere."""
    from stepguard.signing import _model

    (model / "sub").mkdir()
    (model / "sub" / "tokenizer.json").write_text('{"vocab": 1}\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "tokenizer.json").write_text('{"vocab": "attacker"}\n')
    real_walk = _model.walk

    def racing_walk(*args, **kwargs):
        result = real_walk(*args, **kwargs)
        os.rename(model / "sub", tmp_path / "sub.orig")
        os.symlink(elsewhere, model / "sub")
        return result

    monkeypatch.setattr(_model, "walk", racing_walk)
    with pytest.raises(IntegrityError, match="sub/tokenizer.json") as exc:
        sign_model(model, KeySigner(keys.private), bundle_path=tmp_path / "model.sig")
    assert exc.value.details == ("missing: sub/tokenizer.json",)
    assert not (tmp_path / "model.sig").exists()
