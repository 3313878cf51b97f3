"""Manifest format: in-toto Statement shape, strict parsing, and every malicious entry refused."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from stepguard.errors import ManifestError
from stepguard.integrity import (
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    Manifest,
    ManifestEntry,
    create_manifest,
)
from stepguard.integrity._manifest import root_digest_of

HEX = "ab" * 32


def _doc(names: list[str], *, fix_root: bool = True) -> dict:
    subjects = [{"name": n, "digest": {"sha256": HEX}, "annotations": {"size": 1}} for n in names]
    params = {"root": "directory", "shard_size": 64 * 2**20}
    entries = [ManifestEntry(n, 1, f"sha256:{HEX}") for n in names]
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": PREDICATE_TYPE,
        "predicate": {"algorithm": "sha256", "params": params,
                      "rootDigest": root_digest_of("sha256", params, entries) if fix_root
                      else "sha256:" + "00" * 32},
    }


def test_round_trip_and_statement_shape(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.bin").write_bytes(b"abc")
    (tmp_path / "a.txt").write_bytes(b"")
    m = create_manifest(tmp_path)
    doc = json.loads(m.to_json())
    assert doc["_type"] == "https://in-toto.io/Statement/v1"
    assert [s["name"] for s in doc["subject"]] == ["a.txt", "b/x.bin"]
    assert doc["subject"][1]["digest"] == {
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    assert doc["predicate"]["rootDigest"] == m.digest
    assert doc["predicate"]["algorithm"] == "sha256"
    assert doc["predicate"]["params"]["shard_size"] == 64 * 2**20
    again = Manifest.from_json(m.to_json())
    assert again == m and again.digest == m.digest
    assert m.to_json() == again.to_json()  # deterministic


def test_root_digest_binds_algorithm_params_and_entries(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 10)
    a = create_manifest(tmp_path)
    b = create_manifest(tmp_path, shard_size=0)
    c = create_manifest(tmp_path, algorithm="blake3")
    assert len({a.digest, b.digest, c.digest}) == 3
    assert a.entries == b.entries  # same plain digest for a small file, different params


def _bad(names: list[str], **kw) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        Manifest.from_json(json.dumps(_doc(names, **kw)))
    return info.value


NFC = unicodedata.normalize("NFC", "caf\u00e9.csv")
NFD = unicodedata.normalize("NFD", "caf\u00e9.csv")


@pytest.mark.parametrize(
    ("names", "culprit", "why"),
    [
        (["/etc/passwd"], "/etc/passwd", "absolute"),
        (["../escape"], "../escape", ".."),
        (["a/../../b"], "a/../../b", ".."),
        (["a\x00b"], "a\x00b", "NUL"),
        (["dir\\evil"], "dir\\evil", "backslash"),
        (["./a"], "./a", "'.'"),
        (["a//b"], "a//b", "empty component"),
        (["a/"], "a/", "empty component"),
        ([""], "", "empty"),
        (["C:evil"], "C:evil", "drive letter"),
        (["a\nb"], "a\nb", "control"),
        (["dup", "dup"], "dup", "duplicated"),
        (["Data.csv", "data.csv"], "data.csv", "collides"),
        (sorted([NFC, NFD]), max(NFC, NFD), "collides"),
        (["Dir/a", "dir/b"], "dir", "collides"),
        (["a", "a/b"], "a", "both a file and a directory"),
        (["b", "a"], "a", "not sorted"),
    ],
)
def test_malicious_entries_are_refused_by_name(names, culprit, why) -> None:
    err = _bad(names)
    assert isinstance(err, ManifestError)
    text = "\n".join(err.details)
    assert why in text
    assert culprit in text or repr(culprit)[1:-1] in text or culprit in (err.subject or "")


def test_root_digest_mismatch_refused() -> None:
    err = _bad(["a"], fix_root=False)
    assert "root digest does not match" in str(err)


def test_tampered_entry_breaks_root_digest(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"data")
    doc = json.loads(create_manifest(tmp_path).to_json())
    doc["subject"][0]["digest"]["sha256"] = HEX
    with pytest.raises(ManifestError, match="root digest"):
        Manifest.from_statement(doc)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d["subject"][0].update(extra=1), "'a'"),
        (lambda d: d["subject"][0]["annotations"].update(size=-1), "a: size"),
        (lambda d: d["subject"][0]["annotations"].update(size=True), "'a'"),
        (lambda d: d["subject"][0]["annotations"].update(size="1"), "'a'"),
        (lambda d: d["subject"][0].update(digest={"sha256": "AB" * 32}), "a: digest"),
        (lambda d: d["subject"][0].update(digest={"sha256": "ab"}), "a: digest"),
        (lambda d: d["subject"][0].update(digest={"md5": HEX}), "a: digest must be sha256"),
        (lambda d: d["subject"][0].update(digest={"sha256": HEX, "md5": HEX}), "'a'"),
        (lambda d: d["subject"][0].update(name=7), "subject[0]"),
        (lambda d: d["predicate"]["params"].update(shard_size=5), "shard_size"),
        (lambda d: d["predicate"]["params"].update(extra=5), "extra"),
        (lambda d: d["predicate"].update(algorithm="md5"), "md5"),
        (lambda d: d.update(_type="x"), "x"),
        (lambda d: d.update(predicateType="x"), "x"),
        (lambda d: d["predicate"].update(rootDigest="md5:00"), "md5:00"),
    ],
)
def test_malformed_documents(mutate, needle) -> None:
    doc = _doc(["a"])
    mutate(doc)
    with pytest.raises(ManifestError) as info:
        Manifest.from_json(json.dumps(doc))
    assert needle in info.value.diagnostics()


def test_sharded_scheme_must_match_size() -> None:
    params = {"root": "directory", "shard_size": 2**20}
    with pytest.raises(ManifestError, match="a.bin"):
        Manifest("sha256", params, (ManifestEntry("a.bin", 2**20 + 1, f"sha256:{HEX}"),))
    ok = Manifest("sha256", params, (ManifestEntry("a.bin", 2**20 + 1, f"sha256-sharded:{HEX}"),))
    assert ok.entries[0].scheme == "sha256-sharded"


def test_duplicate_json_key_and_garbage() -> None:
    text = json.dumps(_doc(["a"]))
    with pytest.raises(ManifestError, match="repeats a key"):
        Manifest.from_json(text.replace('"_type"', '"_type": "x", "_type"', 1))
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.from_json("{")
    with pytest.raises(ManifestError):
        Manifest.from_json("[]")
    with pytest.raises(ManifestError):
        Manifest.from_json("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ManifestError):
        Manifest.from_json(b"\xff\xfe{}")


def test_export_sha256sum_refuses_sharded_without_data() -> None:
    params = {"root": "directory", "shard_size": 2**20}
    m = Manifest("sha256", params, (ManifestEntry("big", 2**21, f"sha256-sharded:{HEX}"),
                                    ManifestEntry("small", 1, f"sha256:{HEX}")))
    with pytest.raises(ManifestError) as info:
        m.export_sha256sum()
    assert info.value.subject == "big"
    assert m.export_sha256sum({"big": "cd" * 32}) == f"{'cd' * 32}  ./big\n{HEX}  ./small\n"
