"""A registry in a local (or network-mounted) directory."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from stepguard._private.fileio import write_all
from stepguard.errors import RegistryError
from stepguard.integrity import copy_file
from stepguard.registry._base import Registry

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


class LocalRegistry(Registry):
    """``file:///path``: one directory tree; files created exclusively, never overwritten."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.url = "file://" + str(self.root)

    def __repr__(self) -> str:
        return f"LocalRegistry({self.url!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _uri(self, key: str) -> str:
        return f"{self.url}/{key}"

    def _any_under(self, prefix: str) -> bool:
        return os.path.lexists(self._path(prefix.rstrip("/")))

    def _open_new(self, key: str) -> int:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return os.open(path, _FLAGS, 0o644)
        except FileExistsError as exc:
            raise RegistryError("object already exists (versions are immutable)",
                                subject=self._uri(key)) from exc

    def _put_file(self, key: str, src: Path, size: int) -> str:
        fd = self._open_new(key)
        try:
            return copy_file(src, fd)
        finally:
            os.close(fd)

    def _put_bytes(self, key: str, data: bytes, *, exclusive: bool) -> None:
        fd = self._open_new(key)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _get_bytes(self, key: str) -> bytes | None:
        try:
            with open(self._path(key), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def _list_keys(self, prefix: str) -> list[str]:
        start = self._path(prefix.rstrip("/")) if prefix else self.root
        if not start.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(start):
            for f in files:
                full = Path(dirpath) / f
                out.append(full.relative_to(self.root).as_posix())
        return out

    def _download(self, key: str, dest: Path) -> str:
        fd = os.open(dest, _FLAGS, 0o644)
        try:
            return copy_file(self._path(key), fd)
        finally:
            os.close(fd)

    def _delete(self, keys: list[str]) -> None:
        dirs: set[Path] = set()
        for key in keys:
            path = self._path(key)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            dirs.update(path.parents)
        for d in sorted(dirs, key=lambda p: -len(p.parts)):
            if d == self.root or self.root not in d.parents:
                continue
            with contextlib.suppress(OSError):
                d.rmdir()
