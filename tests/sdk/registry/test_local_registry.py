"""The file:// registry: publish signs, fetch verifies before returning, versions immutable."""

from __future__ import annotations

import json
import os

import pytest

from stepguard.errors import (
    ConfigurationError,
    IntegrityError,
    PolicyViolation,
    RegistryError,
    SignatureError,
    VersionConflict,
)
from stepguard.registry import LocalRegistry, open_registry
from stepguard.signing import KeyPolicy, KeySigner, verify_provenance


@pytest.fixture
def reg(tmp_path):
    return open_registry(f"file://{tmp_path}/registry")


def _policy(keys):
    return KeyPolicy(public_keys=(keys.public,))


def test_publish_fetch_list(reg, model, keys, tmp_path):
    rec = reg.publish(model, "bert", "1.0", signer=KeySigner(keys.private),
                      provenance={"step": "train", "context": {"run_id": "r"}})
    assert rec.files == 4 and rec.bundle_uri.endswith("bert/1.0/model.sig")
    assert rec.bundle_digest.startswith("sha256:")
    out = reg.fetch("bert", "1.0", policy=_policy(keys), dest=tmp_path / "out")
    assert (out / "tokenizer" / "vocab.txt").read_text() == "a\nb\nc\n"
    assert [(e.name, e.version) for e in reg.list()] == [("bert", "1.0")]
    assert reg.list("bert", policy=_policy(keys))[0].signer.startswith("key:sha256:")
    prov = reg.root / "bert" / "1.0" / "provenance.sigstore.json"
    verify_provenance(prov.read_bytes(), _policy(keys), subject_digest=rec.root_digest)


def test_versions_are_immutable(reg, model, keys):
    first = reg.publish(model, "bert", "1.0", signer=KeySigner(keys.private))
    # Same bytes again (a cleared run re-publishing): success, the existing record, no upload.
    before = {p: p.stat().st_mtime_ns for p in (reg.root / "bert" / "1.0").rglob("*")}
    again = reg.publish(model, "bert", "1.0", signer=KeySigner(keys.private))
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in (reg.root / "bert" / "1.0").rglob("*")} == before
    # Different bytes under the same version: a typed, non-retryable conflict naming the file.
    (model / "config.json").write_text('{"hidden": 9}\n')
    with pytest.raises(VersionConflict, match="immutable") as info:
        reg.publish(model, "bert", "1.0", signer=KeySigner(keys.private))
    assert isinstance(info.value, RegistryError)
    assert info.value.details == ("differs: config.json",)


def test_uncommitted_version_is_invisible(reg, model, keys, tmp_path):
    reg.publish(model, "bert", "1.0", signer=KeySigner(keys.private))
    (reg.root / "bert" / "1.0" / "model.sig").unlink()
    assert reg.list() == []
    with pytest.raises(RegistryError, match="not committed"):
        reg.fetch("bert", "1.0", policy=_policy(keys), dest=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failed_publish_leaves_nothing(tmp_path, model, keys):
    class Failing(LocalRegistry):
        def _put_bytes(self, key, data, *, exclusive):
            if key.endswith("model.sig"):
                raise OSError("disk full")
            super()._put_bytes(key, data, exclusive=exclusive)

    reg = Failing(tmp_path / "r")
    with pytest.raises(RegistryError, match="partial upload removed"):
        reg.publish(model, "bert", "1.0", signer=KeySigner(keys.private),
                    provenance={"step": "s"})
    assert not (tmp_path / "r" / "bert" / "1.0").exists()
    # and it can be published cleanly afterwards
    LocalRegistry(tmp_path / "r").publish(model, "bert", "1.0", signer=KeySigner(keys.private))


@pytest.mark.parametrize("attack", ["flip", "add", "remove"])
def test_tampered_registry_refused_nothing_returned(reg, model, keys, tmp_path, attack):
    reg.publish(model, "bert", "1.0", signer=KeySigner(keys.private))
    files = reg.root / "bert" / "1.0" / "files"
    if attack == "flip":
        p = files / "model.safetensors"
        b = bytearray(p.read_bytes())
        b[-1] ^= 0xFF
        p.write_bytes(bytes(b))
    elif attack == "add":
        (files / "evil.py").write_text("import os")
    else:
        (files / "config.json").unlink()
    with pytest.raises(IntegrityError):
        reg.fetch("bert", "1.0", policy=_policy(keys), dest=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.staging")]


def test_bundle_replayed_onto_another_version_refused(reg, model, keys, tmp_path, mk):
    reg.publish(model, "bert", "1.0", signer=KeySigner(keys.private))
    mk(model, seed=b"v2")
    reg.publish(model, "bert", "2.0", signer=KeySigner(keys.private))
    v1, v2 = reg.root / "bert" / "1.0", reg.root / "bert" / "2.0"
    # roll 2.0 back to 1.0's (validly signed) content and bundle
    for p in (v2 / "files").rglob("*"):
        if p.is_file():
            p.write_bytes((v1 / "files" / p.relative_to(v2 / "files")).read_bytes())
    (v2 / "model.sig").write_bytes((v1 / "model.sig").read_bytes())
    with pytest.raises(SignatureError, match="different artifact"):
        reg.fetch("bert", "2.0", policy=_policy(keys), dest=tmp_path / "out")
    assert [(e.version) for e in reg.list("bert", policy=_policy(keys))] == ["1.0"]
    # a bundle of another model name is refused the same way
    reg.publish(model, "gpt", "2.0", signer=KeySigner(keys.private))
    (v2 / "model.sig").write_bytes((reg.root / "gpt" / "2.0" / "model.sig").read_bytes())
    for p in (v2 / "files").rglob("*"):
        if p.is_file():
            p.write_bytes((reg.root / "gpt/2.0/files" / p.relative_to(v2 / "files")).read_bytes())
    with pytest.raises(SignatureError):
        reg.fetch("bert", "2.0", policy=_policy(keys), dest=tmp_path / "out2")


def test_fetch_other_signer_refused(reg, model, keys, other_keys, tmp_path):
    reg.publish(model, "bert", "1.0", signer=KeySigner(other_keys.private))
    with pytest.raises(SignatureError):
        reg.fetch("bert", "1.0", policy=_policy(keys), dest=tmp_path / "out")
    assert reg.list(policy=_policy(keys)) == []


def test_pickle_refused_on_publish_and_fetch(reg, model, keys, tmp_path):
    import pickle

    (model / "head.pt").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(PolicyViolation):
        reg.publish(model, "bert", "1.0", signer=KeySigner(keys.private))
    assert reg.list() == []
    reg.publish(model, "bert", "1.0", signer=KeySigner(keys.private), allow_pickle=True)
    with pytest.raises(PolicyViolation):
        reg.fetch("bert", "1.0", policy=_policy(keys), dest=tmp_path / "out")
    out = reg.fetch("bert", "1.0", policy=KeyPolicy(public_keys=(keys.public,),
                                                    allow_pickle=True), dest=tmp_path / "o2")
    assert (out / "head.pt").exists()


def test_bad_names_and_urls(reg, model, keys, tmp_path):
    for name, version in (("../x", "1"), ("a", "../1"), ("a/b", "1"), ("", "1")):
        with pytest.raises(ConfigurationError):
            reg.publish(model, name, version, signer=KeySigner(keys.private))
    with pytest.raises(ConfigurationError):
        open_registry("http://example.com/x")
    with pytest.raises(ConfigurationError, match="policy"):
        reg.fetch("a", "1", policy=None, dest=tmp_path / "o")


def test_manifest_binding(reg, model, keys, tmp_path):
    from stepguard.integrity import create_manifest

    m = create_manifest(model)
    rec = reg.publish(model, "bert", "1.0", signer=KeySigner(keys.private), manifest=m)
    assert rec.manifest_uri and json.loads(
        (reg.root / "bert/1.0/manifest.json").read_text())["predicate"]["rootDigest"] == m.digest
    assert os.path.exists(reg.root / "bert/1.0/model.sig")


def test_file_changed_after_manifest_never_lands(reg, model, keys, tmp_path):
    from stepguard.integrity import create_manifest

    manifest = create_manifest(model)
    orig = reg._put_file

    def put(key, src, size):
        if key.endswith("config.json"):
            src.write_text('{"hidden": 666}')  # changed after the step hashed its output
        return orig(key, src, size)

    reg._put_file = put
    with pytest.raises(IntegrityError, match="does not describe"):
        reg.publish(model, "bert", "1.0", signer=KeySigner(keys.private), manifest=manifest)
    assert not (reg.root / "bert" / "1.0").exists()
    # without a manifest the signature covers exactly the bytes stored
    reg.publish(model, "bert", "2.0", signer=KeySigner(keys.private))
    out = reg.fetch("bert", "2.0", policy=_policy(keys), dest=tmp_path / "out")
    assert (out / "config.json").read_text() == '{"hidden": 666}'


def test_registry_bundle_with_binding_verifies_with_stock_cli(reg, model, keys, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    reg.publish(model, "bert", "1.0", signer=KeySigner(keys.private))
    out = reg.fetch("bert", "1.0", policy=_policy(keys), dest=tmp_path / "out")
    res = subprocess.run([str(Path(sys.executable).parent / "model_signing"), "verify", "key",
                          str(out), "--signature", str(reg.root / "bert/1.0/model.sig"),
                          "--public_key", str(keys.public)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr


def test_manifest_of_another_tree_refused(reg, model, keys, tmp_path, mk):
    from stepguard.integrity import create_manifest

    other = create_manifest(mk(tmp_path / "other", seed=b"zz"))
    with pytest.raises(IntegrityError, match="does not describe"):
        reg.publish(model, "bert", "1.0", signer=KeySigner(keys.private), manifest=other)
    assert reg.list() == []


def test_single_file_publish(reg, model, keys, tmp_path):
    from stepguard.integrity import create_manifest

    f = model / "model.onnx"
    reg.publish(f, "onnx", "1", signer=KeySigner(keys.private), manifest=create_manifest(f))
    out = reg.fetch("onnx", "1", policy=_policy(keys), dest=tmp_path / "out")
    assert (out / "model.onnx").read_bytes() == f.read_bytes()


def test_short_writes_do_not_lose_bytes(reg, model, keys, tmp_path, monkeypatch):
    """A regular file rarely takes fewer bytes than asked (a full disk, a signal), so os.write
    is replaced by one that writes at most 1,000 bytes a call: publish and fetch still copy
    every byte, the signature bundle included (fetch verifies it and each file's digest)."""
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:1000])))
    reg.publish(model, "bert", "2.0", signer=KeySigner(keys.private))
    out = reg.fetch("bert", "2.0", policy=_policy(keys), dest=tmp_path / "short")
    for f in model.rglob("*"):
        if f.is_file():
            assert (out / f.relative_to(model)).read_bytes() == f.read_bytes()
