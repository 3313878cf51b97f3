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


# -- our own JSON layout is parsed line by line: it must agree with a JSON parser -----------------


def _own(names: list[str]) -> tuple[Manifest, str]:
    params = {"root": "directory", "shard_size": 64 * 2**20}
    m = Manifest("sha256", params, tuple(ManifestEntry(n, 1, f"sha256:{HEX}")
                                         for n in sorted(names)))
    return m, m.to_json()


def test_own_layout_reads_exactly_what_a_json_parser_reads() -> None:
    from stepguard.integrity._manifest import _parse_own_layout

    for names in (["a", "b/c.bin", "données/été.csv", "z z"], ['q"uote', "plain"], []):
        m, text = _own(names)
        general = Manifest.from_statement(json.loads(text))
        assert Manifest.from_json(text) == general == m
        assert Manifest.from_json(text.encode()) == m
        layout = _parse_own_layout(text)
        if any('"' in n for n in names):
            assert layout is None  # needs unescaping: left to the JSON parser
        else:
            assert layout is not None and layout[2] == m.entries


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda t: t.replace('"size": 1}', '"size": -1}', 1), "size"),
        (lambda t: t.replace('"size": 1}', '"size": 01}', 1), "not valid JSON"),
        (lambda t: t.replace('"name": "a"}', '"name": "a", "name": "b"}', 1), "repeats a key"),
        (lambda t: t.replace(HEX, HEX.upper(), 1), "digest"),
        (lambda t: t.replace('"name": "a"}', '"name": "\\u002e\\u002e/a"}', 1), "'..'"),
        (lambda t: t.replace('"name": "a"},', '"name": "a"}', 1), "not valid JSON"),
        (lambda t: t.replace('"name": "b"}', '"name": "b"},', 1), "not valid JSON"),
        (lambda t: t.replace('"name": "b"}', '"name": "a"}', 1), "duplicated entry"),
        (lambda t: t.replace('"sha256": "', '"sha256-sharded": "', 1), "digest must be"),
        (lambda t: t.replace('"rootDigest": "sha256:', '"rootDigest": "sha256:0', 1),
         "rootDigest"),
        (lambda t: t[:-2], "not valid JSON"),
        (lambda t: t.replace("\n  ]", "\n\n  ]", 1), None),
    ],
)
def test_edited_own_layout_gets_the_json_parsers_verdict(edit, needle) -> None:
    m, text = _own(["a", "b"])
    edited = edit(text)
    assert edited != text
    if needle is None:  # still valid JSON in another layout: same manifest
        assert Manifest.from_json(edited) == m
        return
    with pytest.raises(ManifestError) as info:
        Manifest.from_json(edited)
    assert needle in info.value.diagnostics()


def test_own_layout_with_a_tampered_entry_breaks_the_root_digest() -> None:
    m, text = _own(["a", "b"])
    other = "cd" * 32
    with pytest.raises(ManifestError, match="root digest does not match"):
        Manifest.from_json(text.replace(HEX, other, 1))


def test_root_digest_of_names_that_need_escaping_matches_canonical_json() -> None:
    """The root digest is built with f-strings when nothing needs escaping, else by the JSON
    encoder; both must give the documented canonical JSON."""
    import hashlib

    params = {"root": "directory", "shard_size": 0}
    for names in (["plain", "a/b"], ['q"uote', "back\\slash", "tab\tname", "é", "\u2028"],
                  [f"f{i:05d}" for i in range(5000)] + ['z"']):
        entries = [ManifestEntry(n, i, f"sha256:{HEX}") for i, n in enumerate(sorted(names))]
        canonical = json.dumps({"algorithm": "sha256",
                                "entries": [[e.path, e.size, e.digest] for e in entries],
                                "params": params},
                               sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        want = "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
        assert root_digest_of("sha256", params, entries) == want


def test_gc_pause_restores_the_collector_on_every_path() -> None:
    import gc

    from stepguard.integrity._gc import gc_paused

    @gc_paused
    def inner() -> bool:
        return gc.isenabled()

    @gc_paused
    def outer(fail: bool) -> tuple[bool, bool]:
        seen = (gc.isenabled(), inner())
        if fail:
            raise ValueError("boom")
        return seen

    assert gc.isenabled()
    assert outer(False) == (False, False) and gc.isenabled()
    with pytest.raises(ValueError):
        outer(True)
    assert gc.isenabled()
    gc.disable()
    try:
        outer(False)
        assert not gc.isenabled()  # a host that disabled it keeps it disabled
    finally:
        gc.enable()


def test_own_layout_bytes_with_invalid_utf8_in_a_name_is_refused() -> None:
    _, text = _own(["a", "b"])
    raw = text.encode().replace(b'"name": "a"', b'"name": "\xff"', 1)
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.from_json(raw)


@pytest.mark.parametrize("encode", [
    lambda p: b"\xef\xbb\xbf" + p,
    lambda p: p.decode().encode("utf-16-be"),
    lambda p: p.decode().encode("utf-16"),
])
def test_own_layout_predicate_in_another_encoding_is_refused(encode) -> None:
    """Only a document a strict JSON parser accepts: the predicate slice alone must not be
    re-guessed as UTF-16 or have a BOM skipped."""
    _, text = _own(["a"])
    raw = text.encode()
    head = b'  "predicate": '
    i = raw.index(head) + len(head)
    j = raw.index(b',\n  "predicateType"')
    with pytest.raises(ManifestError):
        Manifest.from_json(raw[:i] + encode(raw[i:j]) + raw[j:])


def test_manifest_bytes_must_be_utf8() -> None:
    m, text = _own(["a"])
    assert Manifest.from_json(text.encode()) == m
    for encoding in ("utf-16", "utf-32", "utf-16-le"):
        with pytest.raises(ManifestError, match="not valid JSON"):
            Manifest.from_json(json.dumps(json.loads(text)).encode(encoding))
