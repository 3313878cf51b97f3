"""The manifest value: entries, root digest, JSON (in-toto Statement v1) and sha256sum export."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from stepguard.errors import ManifestError
from stepguard.integrity._gc import gc_paused
from stepguard.integrity._paths import _FAST_SAFE, find_collisions, path_problems

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "PREDICATE_TYPE",
    "STATEMENT_TYPE",
    "Manifest",
    "ManifestEntry",
    "expected_scheme",
    "root_digest_of",
]

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://stepguard.dev/manifest/v1"

#: Files larger than this are hashed as independent shards of this size (SHA-256 only).
#: 64 MiB keeps a 1.5 GiB file in 24 pieces (enough to feed many cores) and equals an S3
#: multipart part size, so an upload with this part size has a composite checksum equal to
#: the sharded digest.
DEFAULT_SHARD_SIZE = 64 * 1024 * 1024

ALGORITHMS = ("sha256", "blake3")
_HEX64 = re.compile(r"[0-9a-f]{64}")
#: What the JSON encoder escapes with ensure_ascii=False (and nothing else).
_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f\\"]')
_SUBJECT_KEYS = frozenset({"name", "digest", "annotations"})
_ANNOTATION_KEYS = frozenset({"size"})
_MAX_SIZE = 2**63 - 1


def expected_scheme(algorithm: str, params: Mapping[str, Any], size: int) -> str:
    """The digest scheme an entry of ``size`` bytes must use under ``algorithm``/``params``.

    ``sha256``: plain SHA-256 of the bytes. ``sha256-sharded``: SHA-256 over the concatenated raw
    SHA-256 digests of consecutive ``shard_size`` pieces (the S3 multipart composite rule).
    """
    if algorithm == "sha256":
        shard = int(params.get("shard_size", 0))
        if shard and size > shard:
            return "sha256-sharded"
        return "sha256"
    return algorithm


@dataclass(frozen=True, order=True)
class ManifestEntry:
    """One file: relative POSIX ``path``, ``size`` in bytes and ``digest`` as ``scheme:hex``."""

    path: str
    size: int
    digest: str

    @property
    def scheme(self) -> str:
        """The digest scheme, e.g. ``sha256``, ``sha256-sharded`` or ``blake3``."""
        return self.digest.partition(":")[0]

    @property
    def hexdigest(self) -> str:
        """The digest without its scheme prefix."""
        return self.digest.partition(":")[2]


_CANONICAL = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode


def root_digest_of(
    algorithm: str, params: Mapping[str, Any], entries: Iterable[ManifestEntry]
) -> str:
    """Root digest: SHA-256 of the canonical JSON of algorithm, params and sorted entries.

    The canonical JSON is ``json.dumps({"algorithm": ..., "entries": [[path, size, digest], ...],
    "params": {...}}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` in UTF-8; it
    is fed to the hash in pieces so a 100,000-entry manifest never exists as one string.
    """
    h = hashlib.sha256()
    h.update(('{"algorithm":' + _CANONICAL(algorithm) + ',"entries":[').encode())
    chunk: list[ManifestEntry] = []
    first = True
    for e in entries:
        chunk.append(e)
        if len(chunk) == 4096:
            h.update(("," if not first else "").encode() + _canonical_entries(chunk).encode())
            first, chunk = False, []
    if chunk:
        h.update(("," if not first else "").encode() + _canonical_entries(chunk).encode())
    h.update(('],"params":' + _CANONICAL(dict(params)) + "}").encode())
    return "sha256:" + h.hexdigest()


def _canonical_entries(chunk: list[ManifestEntry]) -> str:
    """``[path,size,digest]`` JSON of each entry, comma-joined, exactly as ``_CANONICAL`` writes
    it. Built with f-strings when nothing in the chunk needs JSON escaping (the usual case:
    the encoder escapes only quotes, backslashes and control characters), else entry by entry
    through the encoder."""
    if all(type(e.path) is str and type(e.size) is int and type(e.digest) is str
           for e in chunk):
        fields = "".join([e.path + e.digest for e in chunk])
        if _NEEDS_ESCAPE.search(fields) is None:
            return ",".join([f'["{e.path}",{e.size},"{e.digest}"]' for e in chunk])
    return ",".join([_CANONICAL([e.path, e.size, e.digest]) for e in chunk])


def _param_problems(algorithm: str, params: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    if algorithm not in ALGORITHMS:
        return [f"unknown algorithm {algorithm!r} (expected one of {', '.join(ALGORITHMS)})"]
    allowed = {"root", "shard_size"} if algorithm == "sha256" else {"root"}
    for key in sorted(set(params) - allowed):
        problems.append(f"unknown parameter {key!r} for {algorithm}")
    for key in sorted(allowed - set(params)):
        problems.append(f"missing parameter {key!r}")
    if params.get("root", "directory") not in ("directory", "file"):
        problems.append("parameter 'root' must be 'directory' or 'file'")
    if "shard_size" in params:
        shard = params["shard_size"]
        if type(shard) is not int or shard < 0 or (0 < shard < 1024 * 1024):
            problems.append("parameter 'shard_size' must be 0 or an integer >= 1 MiB")
    return problems


@dataclass(frozen=True)
class Manifest:
    """A content manifest: every file's path, size and digest, plus one root digest.

    Construction validates everything (unsafe paths, duplicates, collisions, digest formats, the
    root digest), so a ``Manifest`` object is always safe to use. Invalid input raises
    :class:`~stepguard.errors.ManifestError` naming the bad entry.

    >>> import tempfile, pathlib
    >>> from stepguard.integrity import create_manifest, Manifest
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "a.txt").write_text("hello\\n")
    >>> m = create_manifest(d)
    >>> [(e.path, e.size) for e in m.entries]
    [('a.txt', 6)]
    >>> Manifest.from_json(m.to_json()) == m
    True
    >>> m.digest.startswith("sha256:")
    True
    """

    algorithm: str
    params: Mapping[str, Any]
    entries: tuple[ManifestEntry, ...]
    root_digest: str = field(default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", dict(self.params))
        object.__setattr__(self, "entries", tuple(self.entries))
        expected_root = _validate(self.algorithm, self.params, self.entries)
        if not self.root_digest:
            object.__setattr__(self, "root_digest", expected_root)
        elif self.root_digest != expected_root:
            raise ManifestError(
                "manifest root digest does not match its entries",
                subject=self.root_digest,
                details=(f"recorded {self.root_digest}", f"computed {expected_root}"),
            )

    @property
    def digest(self) -> str:
        """The root digest (``sha256:<hex>``): what receipts and audit spans record."""
        return self.root_digest

    @property
    def total_size(self) -> int:
        """Sum of all entry sizes in bytes."""
        return sum(e.size for e in self.entries)

    def __hash__(self) -> int:
        return hash(self.root_digest)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Manifest):
            return NotImplemented
        return self.root_digest == other.root_digest and self.entries == other.entries

    # -- JSON -----------------------------------------------------------------------------------

    def to_statement(self) -> dict[str, Any]:
        """The manifest as an in-toto Statement v1 dictionary (subjects = files)."""
        return {
            "_type": STATEMENT_TYPE,
            "subject": [
                {
                    "name": e.path,
                    "digest": {e.scheme: e.hexdigest},
                    "annotations": {"size": e.size},
                }
                for e in self.entries
            ],
            "predicateType": PREDICATE_TYPE,
            "predicate": {
                "algorithm": self.algorithm,
                "params": dict(self.params),
                "rootDigest": self.root_digest,
            },
        }

    def to_json(self) -> str:
        """Deterministic JSON text (an in-toto Statement v1), one subject per line.

        Built line by line rather than through :meth:`to_statement`, so a manifest of 100,000
        files costs tens of megabytes, not hundreds.
        """
        dumps = json.JSONEncoder(ensure_ascii=False, sort_keys=True).encode
        predicate = {"algorithm": self.algorithm, "params": dict(self.params),
                     "rootDigest": self.root_digest}
        lines = [
            "{",
            f'  "_type": {dumps(STATEMENT_TYPE)},',
            f'  "predicate": {dumps(predicate)},',
            f'  "predicateType": {dumps(PREDICATE_TYPE)},',
            '  "subject": [',
        ]
        last = len(self.entries) - 1
        for i, e in enumerate(self.entries):
            scheme, _, hexd = e.digest.partition(":")
            lines.append(
                f'    {{"annotations": {{"size": {e.size}}}, "digest": {{{dumps(scheme)}: '
                f'"{hexd}"}}, "name": {dumps(e.path)}}}' + ("," if i < last else "")
            )
        lines += ["  ]", "}", ""]
        return "\n".join(lines)

    @classmethod
    @gc_paused
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and strictly validate manifest JSON; raise ManifestError naming the bad entry."""
        fast = _parse_own_layout(text)
        if fast is not None:
            algorithm, params, entries, root = fast
            return cls(algorithm, params, entries, root)
        try:
            # UTF-8 only (RFC 8259): json.loads would also take UTF-16/32 bytes.
            doc = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text,
                             object_pairs_hook=_no_duplicate_keys)
        except _DuplicateKey as exc:
            raise ManifestError("manifest JSON repeats a key", subject=str(exc)) from exc
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ManifestError("manifest is not valid JSON",
                                details=(str(exc)[:200] or type(exc).__name__,)) from exc
        return cls._from_statement(doc, consume=True)

    @classmethod
    def from_statement(cls, doc: object) -> Manifest:
        """Build from an already-parsed in-toto Statement dictionary (strictly validated)."""
        return cls._from_statement(doc, consume=False)

    @classmethod
    def _from_statement(cls, doc: object, *, consume: bool) -> Manifest:
        if not isinstance(doc, dict):
            raise ManifestError("manifest must be a JSON object")
        if set(doc) != {"_type", "subject", "predicateType", "predicate"}:
            raise ManifestError(
                "manifest must have exactly _type, subject, predicateType, predicate",
                details=tuple(f"key: {k}" for k in sorted(map(str, doc))),
            )
        if doc["_type"] != STATEMENT_TYPE:
            raise ManifestError("manifest _type is not an in-toto Statement v1",
                                subject=str(doc["_type"]))
        if doc["predicateType"] != PREDICATE_TYPE:
            raise ManifestError("unsupported predicateType", subject=str(doc["predicateType"]))
        pred = doc["predicate"]
        if not isinstance(pred, dict) or set(pred) != {"algorithm", "params", "rootDigest"}:
            raise ManifestError("predicate must have exactly algorithm, params, rootDigest")
        algorithm, params, root = pred["algorithm"], pred["params"], pred["rootDigest"]
        if not isinstance(algorithm, str) or not isinstance(params, dict):
            raise ManifestError("predicate algorithm/params have the wrong type")
        if not isinstance(root, str) or not root.startswith("sha256:") or not _HEX64.fullmatch(
            root[7:]
        ):
            raise ManifestError("rootDigest must be sha256:<64 lowercase hex>", subject=str(root))
        subjects = doc["subject"]
        if not isinstance(subjects, list):
            raise ManifestError("subject must be a list")
        entries: list[ManifestEntry] = []
        bad: list[str] = []
        append = entries.append
        for i, s in enumerate(subjects):
            # Fast path for the well-formed case; anything unusual gets the precise diagnosis.
            if type(s) is dict and s.keys() == _SUBJECT_KEYS:
                name, dig, ann = s["name"], s["digest"], s["annotations"]
                if (type(name) is str and type(dig) is dict and len(dig) == 1
                        and type(ann) is dict and ann.keys() == _ANNOTATION_KEYS
                        and type(ann["size"]) is int):
                    ((scheme, hexd),) = dig.items()
                    if type(scheme) is str and type(hexd) is str:
                        append(ManifestEntry(name, ann["size"], f"{scheme}:{hexd}"))
                        continue
            name = s.get("name") if isinstance(s, dict) else None
            label = repr(name) if isinstance(name, str) else f"subject[{i}]"
            if not isinstance(s, dict) or set(s) != _SUBJECT_KEYS:
                bad.append(f"{label}: must have exactly name, digest, annotations")
                continue
            dig, ann = s["digest"], s["annotations"]
            if not isinstance(name, str):
                bad.append(f"{label}: name is not a string")
                continue
            if not isinstance(dig, dict) or len(dig) != 1:
                bad.append(f"{label}: digest must have exactly one algorithm")
                continue
            if not isinstance(ann, dict) or set(ann) != _ANNOTATION_KEYS:
                bad.append(f"{label}: annotations must be exactly {{size}}")
                continue
            ((scheme, hexd),) = dig.items()
            size = ann["size"]
            if type(size) is not int:
                bad.append(f"{label}: size is not an integer")
                continue
            if not isinstance(hexd, str):
                bad.append(f"{label}: digest value is not a string")
                continue
            entries.append(ManifestEntry(name, size, f"{scheme}:{hexd}"))
        if bad:
            raise ManifestError("manifest has malformed entries", subject=bad[0].split(":")[0],
                                details=bad)
        if consume:
            # Drop the parsed subjects before validation allocates its own indexes: keeps the
            # peak memory of a 100,000-file manifest low.
            subjects.clear()
            del s
        return cls(algorithm, params, tuple(entries), root)

    # -- export ---------------------------------------------------------------------------------

    def export_sha256sum(self, plain_digests: Mapping[str, str] | None = None) -> str:
        """Lines ``sha256sum -c`` accepts (``<hex>  <path>``), run from the manifest's root.

        Files hashed as shards (``sha256-sharded``, larger than ``shard_size``) have no plain
        SHA-256 in the manifest; pass ``plain_digests`` (path -> hex, e.g. from
        :func:`stepguard.integrity.plain_sha256_digests`, which re-checks the sharded digest in
        the same pass) or create the manifest with ``shard_size=0``.
        """
        if self.algorithm != "sha256":
            raise ManifestError(
                f"a {self.algorithm} manifest cannot be exported as sha256sum lines",
                hint="use --format b3sum for BLAKE3 manifests",
            )
        return self._export("sha256", plain_digests)

    def export_b3sum(self) -> str:
        """Lines ``b3sum -c`` accepts, for BLAKE3 manifests."""
        if self.algorithm != "blake3":
            raise ManifestError(f"a {self.algorithm} manifest cannot be exported as b3sum lines")
        return self._export("blake3", None)

    def _export(self, scheme: str, plain: Mapping[str, str] | None) -> str:
        lines: list[str] = []
        missing: list[str] = []
        for e in self.entries:
            if e.scheme == scheme:
                hexd = e.hexdigest
            elif plain is not None and e.path in plain:
                hexd = plain[e.path]
            else:
                missing.append(e.path)
                continue
            if "\n" in e.path:
                raise ManifestError("path cannot be written as a checksum line", subject=e.path)
            name = "./" + e.path if self.params.get("root") != "file" else e.path
            lines.append(f"{hexd}  {name}\n")
        if missing:
            raise ManifestError(
                "entries are sharded digests with no plain SHA-256",
                subject=missing[0],
                details=tuple(f"sharded: {p}" for p in missing),
                hint="pass the data directory (--data) or create the manifest with shard_size=0",
            )
        return "".join(lines)


# The exact text :meth:`Manifest.to_json` writes. A document in this layout is parsed line by
# line; the patterns accept only what needs no JSON unescaping (names without quotes, backslashes
# or control characters), so they read exactly what a JSON parser would. Anything else --
# another layout, escapes, a duplicated key -- goes through the general parser.
_HEAD = ('{\n  "_type": "https://in-toto.io/Statement/v1",\n  "predicate": ')
_MIDDLE = ',\n  "predicateType": "https://stepguard.dev/manifest/v1",\n  "subject": [\n'
_SUBJECT_LINE_TEXT = (
    r'    \{"annotations": \{"size": (0|[1-9][0-9]{0,18})\}, '
    r'"digest": \{"([a-z0-9-]{1,32})": "([0-9a-f]{1,128})"\}, '
    r'"name": "([^"\\\x00-\x1f]+)"\}(,?)\n'
)
_SUBJECT_LINE = re.compile(_SUBJECT_LINE_TEXT)
_SUBJECT_LINE_BYTES = re.compile(_SUBJECT_LINE_TEXT.encode())


def _parse_own_layout(
    text: str | bytes,
) -> tuple[str, dict[str, Any], tuple[ManifestEntry, ...], str] | None:
    """(algorithm, params, entries, root digest) of a manifest in our own layout, else None.

    Bytes are read as bytes (only names are decoded, strictly as UTF-8) and nothing is sliced
    out of the document: a 100,000-entry manifest is never copied.
    """
    raw = isinstance(text, bytes)
    doc: Any = text  # str or bytes: the same steps on either, with literals of its own type
    head, middle = (_HEAD.encode(), _MIDDLE.encode()) if raw else (_HEAD, _MIDDLE)
    nl, tails = (b"\n", (b"  ]\n}\n", b"  ]\n}")) if raw else ("\n", ("  ]\n}\n", "  ]\n}"))
    pattern: Any = _SUBJECT_LINE_BYTES if raw else _SUBJECT_LINE
    if not doc.startswith(head):
        return None
    pred_end = doc.find(nl, len(head))
    if pred_end < 0 or not doc.startswith(middle, pred_end - 1):
        return None
    try:
        # Decoded here, strictly, as the whole document must be UTF-8: json.loads would guess
        # another encoding (or skip a BOM) for the slice alone.
        pred_text = doc[len(head):pred_end - 1]
        if raw:
            pred_text = pred_text.decode("utf-8")
        if not pred_text.startswith("{"):
            return None
        pred = json.loads(pred_text, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError):
        return None
    if (not isinstance(pred, dict) or set(pred) != {"algorithm", "params", "rootDigest"}
            or not isinstance(pred["algorithm"], str) or not isinstance(pred["params"], dict)
            or not isinstance(pred["rootDigest"], str)
            or not pred["rootDigest"].startswith("sha256:")
            or not _HEX64.fullmatch(pred["rootDigest"], 7)):
        return None
    start = pred_end - 1 + len(middle)
    for tail in tails:
        if doc.endswith(tail):
            end = len(doc) - len(tail)
            break
    else:
        return None
    # One match at a time; each must start where the previous one ended, and only the last
    # may lack the comma.
    entries: list[ManifestEntry] = []
    append = entries.append
    pos, comma = start, True
    try:
        for m in pattern.finditer(doc, start, end):
            if m.start() != pos or not comma:
                return None
            pos, comma = m.end(), bool(m[5])
            if raw:
                append(ManifestEntry(m[4].decode(), int(m[1]),
                                     f"{m[2].decode()}:{m[3].decode()}"))
            else:
                append(ManifestEntry(m[4], int(m[1]), f"{m[2]}:{m[3]}"))
    except UnicodeDecodeError:
        return None
    if pos != end or (entries and comma):
        return None
    return pred["algorithm"], pred["params"], tuple(entries), pred["rootDigest"]


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return out


def _validate(algorithm: str, params: Mapping[str, Any], entries: tuple[ManifestEntry, ...]) -> str:
    problems = _param_problems(algorithm, params)
    if problems:
        raise ManifestError("manifest parameters are invalid", subject=algorithm, details=problems)
    bad: list[tuple[str, str]] = []
    seen: set[str] = set()
    prev: str | None = None
    shard = int(params.get("shard_size", 0)) if algorithm == "sha256" else 0
    fast_safe, hex_ok = _FAST_SAFE.fullmatch, _HEX64.fullmatch
    # One tight loop: this runs for every manifest built or parsed (100,000 entries and more).
    for e in entries:
        if type(e) is not ManifestEntry:
            raise ManifestError("manifest entries must be ManifestEntry values")
        path, size, digest = e.path, e.size, e.digest
        if type(path) is not str:
            bad.append((repr(path), "path is not a string"))
            continue
        if not fast_safe(path):
            bad += [(path, p) for p in path_problems(path)]
        if path in seen:
            bad.append((path, "duplicated entry"))
        elif prev is not None and path < prev:
            bad.append((path, "entries are not sorted by path"))
        seen.add(path)
        prev = path
        if type(size) is not int or not 0 <= size <= _MAX_SIZE:
            bad.append((path, "size must be a non-negative integer"))
            continue
        if algorithm == "sha256":
            want = "sha256-sharded" if shard and size > shard else "sha256"
        else:
            want = algorithm
        n = len(want)
        if type(digest) is not str or not digest.startswith(want) or digest[n:n + 1] != ":":
            bad.append((path, f"digest must be {want}:<hex>, got {str(digest)[:24]!r}"))
        elif not hex_ok(digest, n + 1):
            bad.append((path, "digest must be 64 lowercase hex characters"))
    if params.get("root") == "file" and len(entries) != 1:
        bad.append(("<root>", "a single-file manifest must have exactly one entry"))
    if not bad:
        for a, b in find_collisions(e.path for e in entries):
            bad.append((b, f"collides with {a!r} after Unicode NFC normalization/case folding"
                        if not b.endswith("/...") else "is both a file and a directory"))
    if bad:
        raise ManifestError(
            "manifest has unsafe or malformed entries",
            subject=bad[0][0],
            details=tuple(f"{p}: {why}" for p, why in bad),
        )
    return root_digest_of(algorithm, params, entries)
