"""What a model file *is*, decided from its bytes -- never from its name, and never by loading it.

:func:`sniff` returns the file's kind and, for anything pickle-based, why. Pickles are recognised
in every protocol, by parsing the first opcodes statically with :mod:`pickletools`: protocols
2-5 by their ``PROTO`` header followed by a valid opcode; protocols 0 and 1 (which have no
header) when the opcodes form a complete stream, an import followed by a call, or a long run.
Wrappers are opened:

* gzip, bzip2, xz/lzma and zlib streams are decompressed (a bounded prefix only, so a
  decompression bomb costs nothing) and their content sniffed in turn;
* every member of a zip archive is sniffed by content, whatever its name (torch, ``.npz`` and
  joblib archives included); nested archives and wrappers up to a small depth;
* numpy ``.npy`` headers are read (never the data): an object dtype is a pickle;
* zstd and lz4 streams, encrypted zip members and archives too deep to open are "uninspectable":
  they may hide a pickle, so they are refused as such when pickles are not allowed.

Recognised kinds (what a policy's format allow-list names): ``safetensors``, ``onnx``, ``gguf``,
``numpy`` (numeric ``.npy``/``.npz``), ``json``, ``text``, ``zip`` and ``compressed`` (no pickle
inside), ``pickle``, ``uninspectable``; anything else is ``unknown``.

>>> import pickle, gzip, tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "weights.safetensors").write_bytes(pickle.dumps({"w": 1}, protocol=0))
>>> sniff(d / "weights.safetensors")
Sniffed(kind='pickle', reason='pickle stream (protocol 0/1, no header)')
>>> _ = (d / "model.dat").write_bytes(gzip.compress(pickle.dumps([1], protocol=4)))
>>> sniff(d / "model.dat").reason
'gzip stream containing: pickle data (protocol 4 header)'
>>> _ = (d / "config.json").write_text('{"hidden": 8}')
>>> sniff(d / "config.json").kind
'json'
"""

from __future__ import annotations

import bz2
import io
import json
import lzma
import pickletools
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

#: How many (decompressed) bytes of a stream are examined.
PREFIX_BYTES = 1 << 20
#: How many bytes of opcodes are parsed when looking for a header-less pickle.
OPCODE_BYTES = 64 << 10
_MAX_DEPTH = 4
_MAX_MEMBERS = 100_000
_MAX_JSON = 64 << 20
_IMPORTS = {"GLOBAL", "STACK_GLOBAL", "INST", "EXT1", "EXT2", "EXT4"}
_CALLS = {"REDUCE", "OBJ", "INST", "NEWOBJ", "NEWOBJ_EX", "BUILD"}
KINDS = frozenset({"safetensors", "onnx", "gguf", "numpy", "json", "text", "zip", "compressed",
                   "pickle", "uninspectable", "unknown"})


@dataclass(frozen=True)
class Sniffed:
    """The kind of a file or stream, and for pickles (and uninspectable content) why."""

    kind: str
    reason: str | None = None

    @property
    def unsafe(self) -> bool:
        """True for pickle-based content."""
        return self.kind == "pickle"


def _pickle_reason(data: bytes, complete: bool) -> str | None:
    names: list[str] = []
    stopped = unknown = False
    try:
        for op, _arg, _pos in pickletools.genops(io.BytesIO(data[:OPCODE_BYTES])):
            names.append(op.name)
            if op.name == "STOP":
                stopped = True
                break
    except Exception as exc:  # any parse failure just ends the opcode run
        unknown = "unknown" in str(exc)
    if names[:1] == ["PROTO"] and len(names) >= 2:
        # A header alone is not enough: a safetensors header length of 384 starts b"\x80\x01".
        return f"pickle data (protocol {data[1]} header)"
    if stopped and len(names) >= 2:
        return "pickle stream (protocol 0/1, no header)"
    first_import = next((i for i, n in enumerate(names) if n in _IMPORTS), None)
    if first_import is not None and any(n in _CALLS for n in names[first_import + 1:]):
        return "pickle opcodes that import and call (protocol 0/1, no header)"
    cut_short = not complete or len(data) > OPCODE_BYTES
    if cut_short and not unknown and len(names) >= 8:
        return "long pickle opcode stream (protocol 0/1, no header)"
    return None


def _npy(head: bytes) -> Sniffed:
    try:
        major = head[6]
        if major == 1:
            hlen, start = struct.unpack("<H", head[8:10])[0], 10
        else:
            hlen, start = struct.unpack("<I", head[8:12])[0], 12
        header = head[start:start + min(hlen, 65536)].decode("latin-1")
        import ast

        meta = ast.literal_eval(header)  # a dict literal; literal_eval evaluates no code
        descr = meta.get("descr") if isinstance(meta, dict) else None
    except (ValueError, SyntaxError, IndexError, struct.error, UnicodeDecodeError):
        return Sniffed("uninspectable", "unreadable .npy header")
    if "O" in repr(descr):
        return Sniffed("pickle", "object array in .npy (pickle)")
    return Sniffed("numpy")


def _decompressor(head: bytes) -> tuple[str, Callable[[IO[bytes]], IO[bytes]]] | None:
    if head[:2] == b"\x1f\x8b":
        import gzip

        return "gzip", lambda f: gzip.GzipFile(fileobj=f)  # type: ignore[return-value]
    if head[:3] == b"BZh":
        return "bzip2", bz2.BZ2File
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz", lambda f: lzma.LZMAFile(f, format=lzma.FORMAT_XZ)
    if head[:3] == b"\x5d\x00\x00":
        return "lzma", lambda f: lzma.LZMAFile(f, format=lzma.FORMAT_ALONE)
    if len(head) >= 2 and head[0] == 0x78 and (head[0] << 8 | head[1]) % 31 == 0:
        return "zlib", lambda f: io.BufferedReader(_ZlibReader(f))
    return None


class _ZlibReader(io.RawIOBase):
    """A read-only stream of a zlib stream's decompressed bytes."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw, self._z, self._buf = raw, zlib.decompressobj(), b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        want = PREFIX_BYTES if size is None or size < 0 else size
        while len(self._buf) < want and not self._z.eof:
            chunk = self._raw.read(64 << 10)
            if not chunk:
                break
            self._buf += self._z.decompress(chunk, want - len(self._buf) + 1)
            while self._z.unconsumed_tail and len(self._buf) < want:
                self._buf += self._z.decompress(self._z.unconsumed_tail,
                                                want - len(self._buf) + 1)
        out, self._buf = self._buf[:want], self._buf[want:]
        return out

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def _read_prefix(stream: IO[bytes]) -> tuple[bytes, bool]:
    data = stream.read(PREFIX_BYTES)
    complete = len(data) < PREFIX_BYTES or not stream.read(1)
    return data, complete


def _text_or_json(data: bytes, complete: bool, whole: Callable[[], bytes] | None) -> Sniffed:
    if b"\0" in data:
        return Sniffed("unknown")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if complete or exc.start < len(data) - 4:
            return Sniffed("unknown")
        text = data[:exc.start].decode("utf-8")
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped[:1] in ("{", "[") and whole is not None:
        try:
            json.loads(whole())
            return Sniffed("json")
        except (ValueError, OSError):
            pass
    return Sniffed("text")


def _zip(zf: zipfile.ZipFile, depth: int) -> Sniffed:
    infos = zf.infolist()
    if len(infos) > _MAX_MEMBERS:
        return Sniffed("uninspectable", f"zip archive with {len(infos)} members")
    kinds: set[str] = set()
    for info in infos:
        if info.is_dir():
            continue
        if info.filename.endswith((".pkl", ".pickle")):
            return Sniffed("pickle", f"zip member {info.filename} (pickle by name)")
        if info.flag_bits & 0x1:
            return Sniffed("uninspectable", f"zip member {info.filename} is encrypted")
        try:
            with zf.open(info) as member:
                inner = _stream(member, depth + 1, seekable_zip=True)
        except (zipfile.BadZipFile, NotImplementedError, OSError, EOFError,
                lzma.LZMAError, zlib.error, RuntimeError) as exc:
            return Sniffed("uninspectable", f"zip member {info.filename} unreadable ({exc})")
        if inner.kind in ("pickle", "uninspectable"):
            return Sniffed(inner.kind, f"zip member {info.filename}: {inner.reason}")
        kinds.add(inner.kind)
    return Sniffed("numpy" if kinds == {"numpy"} else "zip")


def _stream(stream: IO[bytes], depth: int, *, seekable_zip: bool = False) -> Sniffed:
    """Sniff a (possibly non-seekable) stream from its current position."""
    if depth > _MAX_DEPTH:
        return Sniffed("uninspectable", "wrappers nested too deeply")
    data, complete = _read_prefix(stream)
    return _bytes(data, complete, depth, stream if seekable_zip else None)


def _bytes(data: bytes, complete: bool, depth: int, reopen: IO[bytes] | None) -> Sniffed:
    reason = _pickle_reason(data, complete)
    if reason is not None:
        return Sniffed("pickle", reason)
    if data[:6] == b"\x93NUMPY":
        return _npy(data)
    wrapper = _decompressor(data)
    if wrapper is not None:
        name, opener = wrapper
        try:
            inner = _stream(opener(io.BytesIO(data)) if complete or reopen is None
                            else opener(_rewound(reopen)), depth + 1)
        except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError):
            inner = Sniffed("unknown")  # not really that wrapper: judge the raw bytes below
        else:
            if inner.kind in ("pickle", "uninspectable"):
                return Sniffed(inner.kind, f"{name} stream containing: {inner.reason}")
            return Sniffed("compressed")
    if data[:4] in (b"(\xb5/\xfd", b"\x04\"M\x18"):
        return Sniffed("uninspectable", "zstd/lz4 stream (cannot be opened to look for pickles)")
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        if not complete and reopen is None:
            return Sniffed("uninspectable", "zip archive inside a stream too large to open")
        try:
            src = io.BytesIO(data) if complete else _rewound(reopen)  # type: ignore[arg-type]
            with zipfile.ZipFile(src) as zf:
                return _zip(zf, depth)
        except (zipfile.BadZipFile, OSError):
            return Sniffed("uninspectable", "damaged zip archive")
    if data[:4] == b"GGUF" and len(data) >= 8 and 1 <= struct.unpack("<I", data[4:8])[0] <= 3:
        return Sniffed("gguf")
    return _text_or_json(data, complete, (lambda: data) if complete else None)


def _rewound(stream: IO[bytes]) -> IO[bytes]:
    stream.seek(0)
    return stream


def _safetensors(fh: IO[bytes], size: int) -> bool:
    fh.seek(0)
    head = fh.read(8)
    if len(head) < 8:
        return False
    n = struct.unpack("<Q", head)[0]
    if not 2 <= n <= min(size - 8, 100 << 20):
        return False
    raw = fh.read(n)
    if raw[:1] != b"{":
        return False
    try:
        meta = json.loads(raw)
    except ValueError:
        return False
    return isinstance(meta, dict)


_ONNX_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2}


def _varint(fh: IO[bytes]) -> int | None:
    value = shift = 0
    while shift < 64:
        b = fh.read(1)
        if not b:
            return None
        value |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return value
        shift += 7
    return None


def _onnx(fh: IO[bytes], size: int) -> bool:
    """A ModelProto: top-level fields only from ONNX's numbering, ir_version and a graph."""
    fh.seek(0)
    seen: set[int] = set()
    for _ in range(100_000):
        if fh.tell() == size:
            return {1, 7} <= seen
        key = _varint(fh)
        if key is None:
            return False
        num, wire = key >> 3, key & 7
        if _ONNX_FIELDS.get(num) != wire:
            return False
        seen.add(num)
        if wire == 0:
            if _varint(fh) is None:
                return False
        else:
            length = _varint(fh)
            if length is None or fh.tell() + length > size:
                return False
            fh.seek(length, io.SEEK_CUR)
    return False


def sniff(path: Path) -> Sniffed:
    """The kind of the file at ``path`` (see the module docstring). Never unpickles."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, io.SEEK_END)
            fh.seek(0)
            data, complete = _read_prefix(fh)
            found = _bytes(data, complete, 0, fh)
            if found.kind in ("pickle", "uninspectable", "numpy", "gguf", "zip", "compressed"):
                return found
            if zipfile.is_zipfile(fh):
                # A zip that does not start at offset 0 (anything prepended to it).
                try:
                    with zipfile.ZipFile(_rewound(fh)) as zf:
                        inner = _zip(zf, 0)
                except (zipfile.BadZipFile, OSError):
                    inner = Sniffed("uninspectable", "damaged zip archive")
                if inner.kind in ("pickle", "uninspectable"):
                    return Sniffed(inner.kind, f"embedded zip archive: {inner.reason}")
            if _safetensors(fh, size):
                return Sniffed("safetensors")
            if _onnx(fh, size):
                return Sniffed("onnx")
            if (found.kind == "text" and not complete and size <= _MAX_JSON
                    and data.lstrip()[:1] in (b"{", b"[")):
                fh.seek(0)
                try:
                    json.loads(fh.read())
                    return Sniffed("json")
                except ValueError:
                    pass
            return found
    except OSError as exc:
        return Sniffed("uninspectable", f"unreadable file ({exc.strerror})")
