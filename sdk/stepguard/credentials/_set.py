"""Issued credentials and the ways a step body receives them: a mapping of ``SecretMapping``s,
environment variables, or 0400 files (on a tmpfs) -- :class:`CredentialSet`.

A :class:`~stepguard.credentials.CredentialSession` holds one for the credentials it minted;
:class:`~stepguard.credentials.DeliveredCredentials` is one, unwrapped inside a step runner.
Every value is registered with the process's secret registry as it is added.

>>> s = CredentialSet()
>>> s._add("train-db", "database", "env", env_prefix("train-db", None),
...        {"username": "v-step-1", "password": "pw-set-doctest-42"})
>>> s
CredentialSet(credentials=['train-db'])
>>> sorted(s.env())
['TRAIN_DB_PASSWORD', 'TRAIN_DB_USERNAME']
>>> s.values["train-db"]["password"]
SecretStr('**********')
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from stepguard._private.fileio import write_all
from stepguard.credentials._secret import SecretMapping, guard
from stepguard.errors import ConfigurationError

log = logging.getLogger("stepguard.credentials")

_ENV_UNSAFE = re.compile(r"[^A-Za-z0-9]")


def env_prefix(name: str, explicit: str | None) -> str:
    """Variable prefix of a credential: ``env_prefix`` as given, else ``NAME_``.

    >>> env_prefix("train-db", None), env_prefix("aws", "")
    ('TRAIN_DB_', '')
    """
    if explicit is not None:
        return explicit
    return _ENV_UNSAFE.sub("_", name).upper() + "_"


def _env_key(prefix: str, key: str) -> str:
    return prefix + _ENV_UNSAFE.sub("_", key).upper()


def filesystem_type(path: str | Path) -> str | None:
    """The filesystem type of the mount holding ``path`` (Linux), e.g. ``tmpfs``."""
    target = os.path.realpath(path)
    best, fstype = "", None
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        parts = left.split()
        if len(parts) < 5 or not right:
            continue
        mount = parts[4].replace("\\040", " ")
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and \
                len(mount) >= len(best):
            best, fstype = mount, right.split()[0]
    return fstype


@dataclass
class _Item:
    name: str
    kind: str
    delivery: str
    prefix: str
    values: SecretMapping


class CredentialSet:
    """Issued credentials and the ways a body receives them (mapping, environment, files)."""

    def __init__(self) -> None:
        self._items: list[_Item] = []
        self._files: list[Path] = []
        self._dirs: list[Path] = []

    @property
    def values(self) -> Mapping[str, SecretMapping]:
        """Credential name -> its values (``SecretMapping``; nothing here prints a value)."""
        return MappingProxyType({i.name: i.values for i in self._items})

    def env(self, *, all_credentials: bool = False) -> dict[str, str]:
        """Environment variables for a subprocess or sandbox: ``<PREFIX><KEY>`` per value.

        Only credentials with ``delivery: env`` unless ``all_credentials``. The prefix is the
        request's ``env_prefix`` (``""`` gives plain ``AWS_ACCESS_KEY_ID`` etc.), else ``NAME_``.
        The returned dict holds plain values: pass it to the child process, never log it.
        """
        out: dict[str, str] = {}
        for item in self._items:
            if item.delivery != "env" and not all_credentials:
                continue
            for key in item.values:
                out[_env_key(item.prefix, key)] = item.values.reveal(key)
        return out

    def file_payloads(self, *, all_credentials: bool = False) -> dict[str, bytes]:
        """``<PREFIX><KEY>_FILE`` -> value, for a runner that writes the files itself (the
        sandbox's private tmpfs, 0400). Only ``delivery: file`` credentials unless
        ``all_credentials``. Plain values: hand them to the runner, never log them."""
        out: dict[str, bytes] = {}
        for item in self._items:
            if item.delivery != "file" and not all_credentials:
                continue
            for key in item.values:
                out[_env_key(item.prefix, key) + "_FILE"] = item.values.reveal(key).encode()
        return out

    def write_files(self, directory: str | Path, *, all_credentials: bool = False,
                    uid: int | None = None, gid: int | None = None,
                    require_tmpfs: bool = False) -> dict[str, str]:
        """Write each value to ``directory/<name>/<key>`` (mode 0400) and return
        ``<PREFIX><KEY>_FILE`` variables pointing at them.

        Only credentials with ``delivery: file`` unless ``all_credentials``. Give a tmpfs
        directory so values never reach a disk (``require_tmpfs`` refuses anything else; without
        it a non-tmpfs directory is logged as a warning). ``uid``/``gid`` hand the files to the
        sandbox user. Files are removed when the session ends.
        """
        root = Path(directory)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fstype = filesystem_type(root)
        if fstype != "tmpfs":
            if require_tmpfs:
                raise ConfigurationError("credential files must go to a tmpfs",
                                         subject=str(root), details=(f"filesystem: {fstype}",))
            log.warning("credential files written to a %s filesystem, not tmpfs: %s",
                        fstype or "unknown", root)
        out: dict[str, str] = {}
        for item in self._items:
            if item.delivery != "file" and not all_credentials:
                continue
            sub = root / item.name
            sub.mkdir(mode=0o700, exist_ok=False)
            self._dirs.append(sub)
            if uid is not None or gid is not None:
                os.chown(sub, -1 if uid is None else uid, -1 if gid is None else gid)
            for key in item.values:
                path = sub / _ENV_UNSAFE.sub("_", key)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
                try:
                    if uid is not None or gid is not None:
                        os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
                    write_all(fd, item.values.reveal(key).encode("utf-8"))
                finally:
                    os.close(fd)
                self._files.append(path)
                out[_env_key(item.prefix, key) + "_FILE"] = str(path)
        return out

    def _remove_files(self) -> None:
        for path in self._files:
            with contextlib.suppress(OSError):
                path.unlink()
        for d in reversed(self._dirs):
            with contextlib.suppress(OSError):
                d.rmdir()
        self._files.clear()
        self._dirs.clear()

    def _add(self, name: str, kind: str, delivery: str, prefix: str,
             values: Mapping[str, str]) -> None:
        """Add one credential's plain values (registered with the secret registry first)."""
        for v in values.values():
            guard(v)
        self._items.append(_Item(name, kind, delivery, prefix, SecretMapping(values)))

    def _export(self) -> list[dict[str, Any]]:
        """Every credential as plain data, values included -- the inverse of :meth:`_add`, for
        wrapping them for another process. Never log it."""
        return [{"name": i.name, "kind": i.kind, "delivery": i.delivery, "prefix": i.prefix,
                 "values": i.values.reveal_all()} for i in self._items]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(credentials={[i.name for i in self._items]!r})"
