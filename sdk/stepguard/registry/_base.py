"""The registry interface and the publish/fetch protocol shared by every backend.

Layout of one version under the registry root (a directory or an S3 prefix)::

    <name>/<version>/files/<relative path>      model files (uploaded first, with SHA-256)
    <name>/<version>/manifest.json              integrity manifest (optional)
    <name>/<version>/provenance.sigstore.json   signed SLSA provenance (optional)
    <name>/<version>/model.sig                  signature bundle: written LAST, the commit marker

A version without ``model.sig`` does not exist for ``fetch`` and ``list``. ``model.sig`` is
created exclusively (``O_EXCL`` / S3 ``If-None-Match: *``), so a version is published once.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepguard.errors import (
    ConfigurationError,
    IntegrityError,
    RegistryError,
    StepguardError,
    VerificationError,
    VersionConflict,
)

BUNDLE_NAME = "model.sig"
PROVENANCE_NAME = "provenance.sigstore.json"
MANIFEST_NAME = "manifest.json"
FILES_DIR = "files"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


def _check(kind: str, value: str, pattern: re.Pattern[str]) -> None:
    if not isinstance(value, str) or not pattern.match(value) or ".." in value:
        raise ConfigurationError(f"invalid model {kind} {value!r}", subject=str(value))


@dataclass(frozen=True)
class PublishedModel:
    """What a publish produced: where it is, what was signed, by whom (no secrets)."""

    name: str
    version: str
    registry: str
    uri: str
    bundle_uri: str
    bundle_digest: str
    root_digest: str
    signer: str
    files: int
    size: int
    provenance_uri: str | None = None
    manifest_uri: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for receipts and ``--json`` output."""
        from dataclasses import asdict

        return asdict(self)


@dataclass(frozen=True)
class RegistryEntry:
    """One committed version (its bundle exists; with a policy, its signature verified)."""

    name: str
    version: str
    signer: str | None = None


@dataclass(frozen=True)
class FetchedModel:
    """A version fetched and verified: where its files are and who signed them (the signer
    the verification policy accepted, from the bundle itself)."""

    path: Path
    name: str
    version: str
    signer: str


@dataclass
class _Upload:
    keys: list[str] = field(default_factory=list)


def _check_manifest(manifest: Any, files: Mapping[str, str],
                    plain_of_sharded: Mapping[str, str], sizes: Mapping[str, int]) -> None:
    """The integrity manifest bound into the signature must describe exactly the signed files.

    ``files``: plain SHA-256 of the bytes stored. Sharded manifest entries (big files) are
    compared through ``plain_of_sharded``: the plain SHA-256 of bytes whose shards were checked
    against the manifest before the upload, so the stored bytes are the verified bytes."""
    problems = []
    entries = {e.path: e for e in manifest.entries}
    for path in sorted(entries.keys() - files.keys()):
        problems.append(f"in manifest, not in model: {path}")
    for path in sorted(files.keys() - entries.keys()):
        problems.append(f"in model, not in manifest: {path}")
    for path in sorted(entries.keys() & files.keys()):
        e = entries[path]
        if sizes.get(path, e.size) != e.size:
            problems.append(f"size differs: {path}")
        elif e.scheme == "sha256":
            if e.hexdigest != files[path]:
                problems.append(f"digest differs: {path}")
        elif plain_of_sharded.get(path) != files[path]:
            problems.append(f"digest differs: {path}")
    if problems:
        raise IntegrityError("integrity manifest does not describe this model",
                             subject=problems[0].split(": ", 1)[-1], details=problems)


class Registry(abc.ABC):
    """A model registry: publish signs and uploads; fetch downloads and verifies first."""

    url: str

    # -- storage primitives (keys are '/'-joined, relative to the registry root) --------------

    @abc.abstractmethod
    def _any_under(self, prefix: str) -> bool: ...

    @abc.abstractmethod
    def _put_file(self, key: str, src: Path, size: int) -> str:
        """Store ``src`` under ``key`` (exclusively); return the SHA-256 hex of what was sent."""

    @abc.abstractmethod
    def _put_bytes(self, key: str, data: bytes, *, exclusive: bool) -> None: ...

    @abc.abstractmethod
    def _get_bytes(self, key: str) -> bytes | None: ...

    @abc.abstractmethod
    def _list_keys(self, prefix: str) -> list[str]: ...

    @abc.abstractmethod
    def _download(self, key: str, dest: Path) -> str:
        """Copy an object to ``dest`` (created exclusively); return its SHA-256 hex."""

    @abc.abstractmethod
    def _delete(self, keys: list[str]) -> None: ...

    @abc.abstractmethod
    def _uri(self, key: str) -> str: ...

    # -- protocol -----------------------------------------------------------------------------

    def publish(self, model_dir: str | Path, name: str, version: str, *, signer: Any,
                provenance: Any = None, manifest: Any = None,
                allow_pickle: bool = False) -> PublishedModel:
        """Upload ``model_dir`` as ``name``/``version``, sign what was stored; bundle goes last.

        Each file is read once: hashed while it is uploaded, and the signature covers those
        digests, so the signature describes exactly the bytes in the registry. With
        ``manifest``, the stored digests must match it (a file changed after the manifest was
        taken fails the publish).

        ``signer``: a :class:`~stepguard.signing.Signer`. ``provenance``: a step receipt (dict
        or ``Receipt``; see :func:`~stepguard.signing.build_provenance`), signed with the same
        signer and stored beside the model. ``manifest``: an integrity ``Manifest`` of the same
        tree; its root digest is bound into the signed statement. On any failure everything this
        call uploaded is removed.

        Publishing is idempotent: when ``name``/``version`` already exists with the same root
        digest (the same bytes), nothing is uploaded and the existing version's record is
        returned, so a re-run of a cleared pipeline run succeeds. Different bytes raise
        :class:`~stepguard.errors.VersionConflict` (versions are immutable; never retried); a
        version that exists but was never committed raises :class:`RegistryError`.
        """
        from stepguard.signing import check_formats, model_files, sign_digests, sign_provenance

        _check("name", name, _NAME)
        _check("version", version, _VERSION)
        base = f"{name}/{version}/"
        binding: dict[str, Any] = {"registry_name": name, "version": version}
        if manifest is not None:
            binding["manifest_digest"] = manifest.digest
        root = Path(model_dir)
        files = model_files(root)
        if set(files) == {"."}:
            # A single file is published as a one-file model directory.
            files = {root.name: root}
        if not files:
            raise ConfigurationError("model directory is empty", subject=str(root))
        check_formats(files, allow_pickle=allow_pickle)
        if self._any_under(base):
            return self._republish(files, name, version, signer)
        up = _Upload()
        total = 0
        prov_uri = man_uri = None
        try:
            jobs = []
            for rel, src in sorted(files.items()):
                size = os.lstat(src).st_size
                key = f"{base}{FILES_DIR}/{rel}"
                up.keys.append(key)
                jobs.append((rel, key, src, size))
                total += size
            # One read per file: what is hashed (and then signed) is exactly what was stored.
            plain_of_sharded: dict[str, str] = {}
            if manifest is not None and any(e.scheme != "sha256" for e in manifest.entries):
                from stepguard.integrity import plain_sha256_digests

                # Big files carry sharded digests: check their shards against the manifest and
                # learn their plain digests, to compare with what the upload stores.
                plain_of_sharded = plain_sha256_digests(root, manifest)
            digests = self._put_files(jobs)
            if manifest is not None:
                _check_manifest(manifest, digests, plain_of_sharded,
                                {rel: size for rel, _key, _src, size in jobs})
            signed = sign_digests(digests, signer, name=name, binding=binding)
            if manifest is not None:
                key = base + MANIFEST_NAME
                up.keys.append(key)
                self._put_bytes(key, manifest.to_json().encode(), exclusive=True)
                man_uri = self._uri(key)
            if provenance is not None:
                key = base + PROVENANCE_NAME
                bundle = sign_provenance(provenance, {name: signed.root_digest}, signer)
                up.keys.append(key)
                self._put_bytes(key, bundle, exclusive=True)
                prov_uri = self._uri(key)
            key = base + BUNDLE_NAME
            up.keys.append(key)
            self._put_bytes(key, signed.bundle, exclusive=True)
        except BaseException as exc:
            self._cleanup(up.keys)
            if isinstance(exc, StepguardError):
                raise
            if isinstance(exc, Exception):
                raise RegistryError("publish failed; partial upload removed",
                                    subject=f"{name}:{version}",
                                    details=(f"{type(exc).__name__}: {exc}"[:300],)) from exc
            raise
        return PublishedModel(
            name=name, version=version, registry=self.url, uri=self._uri(base),
            bundle_uri=self._uri(base + BUNDLE_NAME),
            bundle_digest="sha256:" + hashlib.sha256(signed.bundle).hexdigest(),
            root_digest=signed.root_digest, signer=signed.signer, files=len(signed.files),
            size=total, provenance_uri=prov_uri, manifest_uri=man_uri)

    def _republish(self, files: Mapping[str, Path], name: str, version: str,
                   signer: Any) -> PublishedModel:
        """``publish`` of a version that exists: the existing record for the same bytes, else
        :class:`~stepguard.errors.VersionConflict`.

        The stored statement is read, not verified: nothing is trusted from it except the
        digests compared here, and a consumer verifies the version against its policy on fetch.
        """
        from stepguard.signing._bundle import load_bundle, parse_envelope, parse_model_statement
        from stepguard.signing._hashing import hash_files

        base = f"{name}/{version}/"
        label = f"{name}:{version}"
        raw = self._get_bytes(base + BUNDLE_NAME)
        if raw is None:
            raise RegistryError("version exists but is not committed (a publish is in progress "
                                "or failed)", subject=label,
                                hint="remove the partial version, or publish another version")
        envelope = parse_envelope(load_bundle(raw, subject=label), subject=label)
        stored = parse_model_statement(envelope.payload_type, envelope.payload, subject=label)
        local = hash_files(dict(files))
        if dict(stored.files) != local:
            changed = sorted(k for k in stored.files.keys() | local.keys()
                             if stored.files.get(k) != local.get(k))
            raise VersionConflict(
                "version exists with other content (immutable)",
                subject=label, details=[f"differs: {k}" for k in changed[:20]],
                hint="publish under a new version")
        prov = base + PROVENANCE_NAME
        man = base + MANIFEST_NAME
        hint = envelope.hint or ""
        mine = str(getattr(signer, "identity", ""))
        # The signer who committed the version: ours when the key hint matches, else the hint.
        signed_by = mine if hint and mine.endswith(hint) else f"sha256:{hint or envelope.keyid}"
        return PublishedModel(
            name=name, version=version, registry=self.url, uri=self._uri(base),
            bundle_uri=self._uri(base + BUNDLE_NAME),
            bundle_digest="sha256:" + hashlib.sha256(raw).hexdigest(),
            root_digest=stored.root_digest, signer=signed_by,
            files=len(stored.files), size=sum(os.lstat(p).st_size for p in files.values()),
            provenance_uri=self._uri(prov) if self._get_bytes(prov) is not None else None,
            manifest_uri=self._uri(man) if self._get_bytes(man) is not None else None)

    #: Files uploaded concurrently by one publish (each backend bounds its own memory per file).
    upload_workers: int = 4

    def _put_files(self, jobs: list[tuple[str, str, Path, int]]) -> dict[str, str]:
        """Upload (rel, key, src, size) jobs; return rel -> SHA-256 of the bytes stored."""
        if len(jobs) <= 1 or self.upload_workers <= 1:
            return {rel: self._put_file(key, src, size) for rel, key, src, size in jobs}
        from concurrent.futures import ThreadPoolExecutor, wait

        with ThreadPoolExecutor(max_workers=min(self.upload_workers, len(jobs))) as pool:
            futures = {rel: pool.submit(self._put_file, key, src, size)
                       for rel, key, src, size in jobs}
            wait(futures.values())
        # First failure only after every upload has stopped, so cleanup sees them all.
        return {rel: fut.result() for rel, fut in futures.items()}

    def _cleanup(self, keys: list[str]) -> None:
        # The original error matters more than a failed cleanup; nothing was committed.
        with contextlib.suppress(Exception):
            self._delete(keys)

    def fetch(self, name: str, version: str, *, policy: Any, dest: str | Path) -> Path:
        """Download ``name``/``version`` into a staging directory, verify, then move to ``dest``.

        Verified before the path is returned: the bundle signature against ``policy``
        (mandatory), the signed name/version binding, every file's digest, no unsigned extra
        objects, unsafe formats. ``dest`` must not exist. Nothing is returned (or left behind)
        when any check fails.
        """
        return self.fetch_model(name, version, policy=policy, dest=dest).path

    def fetch_model(self, name: str, version: str, *, policy: Any,
                    dest: str | Path) -> FetchedModel:
        """:meth:`fetch`, returning also who signed the version (as verified)."""
        from stepguard.signing import Policy, load_bundle, parse_model_statement, verify_model

        if not isinstance(policy, Policy):
            raise ConfigurationError("fetch needs an explicit verification policy",
                                     subject="policy")
        _check("name", name, _NAME)
        _check("version", version, _VERSION)
        dest = Path(dest)
        if os.path.lexists(dest):
            raise ConfigurationError("destination already exists", subject=str(dest))
        base = f"{name}/{version}/"
        raw = self._get_bytes(base + BUNDLE_NAME)
        if raw is None:
            raise RegistryError("no such model version (or not committed)",
                                subject=f"{name}:{version}")
        label = self._uri(base + BUNDLE_NAME)
        verified = policy.verify_bundle(load_bundle(raw, subject=label), subject=label)
        signed = parse_model_statement(verified.payload_type, verified.payload, subject=label)
        prefix = f"{base}{FILES_DIR}/"
        stored = {k[len(prefix):] for k in self._list_keys(prefix)}
        extra = sorted(stored - set(signed.files))
        missing = sorted(set(signed.files) - stored)
        if extra or missing:
            raise IntegrityError(
                "registry version does not match its signature",
                subject=(extra or missing)[0],
                details=[f"unsigned file (not in signature): {e}" for e in extra]
                + [f"missing: {m}" for m in missing])
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.parent / f".{dest.name}.staging-{uuid.uuid4().hex[:8]}"
        staging.mkdir(mode=0o700)
        try:
            for rel, want in sorted(signed.files.items()):
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                got = self._download(prefix + rel, target)
                if got != want:
                    raise IntegrityError("downloaded file does not match its signature",
                                         subject=rel, details=(f"modified: {rel}",))
            verify_model(staging, raw, policy, expected_name=name,
                         expected_binding={"registry_name": name, "version": version})
            os.rename(staging, dest)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, StepguardError | KeyboardInterrupt | SystemExit):
                raise
            if isinstance(exc, Exception):
                raise RegistryError("fetch failed", subject=f"{name}:{version}",
                                    details=(f"{type(exc).__name__}: {exc}"[:300],)) from exc
            raise
        return FetchedModel(dest, name, version, verified.signer)

    def list(self, name: str | None = None, *, policy: Any = None) -> list[RegistryEntry]:
        """Committed versions (bundle present). With ``policy``, only those whose bundle
        verifies under it and is bound to its own name and version."""
        from stepguard.signing import load_bundle, parse_model_statement

        out: list[RegistryEntry] = []
        for key in sorted(self._list_keys(f"{name}/" if name else "")):
            parts = key.split("/")
            if len(parts) != 3 or parts[2] != BUNDLE_NAME:
                continue
            mname, mversion = parts[0], parts[1]
            signer = None
            if policy is not None:
                raw = self._get_bytes(key)
                if raw is None:
                    continue
                try:
                    verified = policy.verify_bundle(load_bundle(raw, subject=key), subject=key)
                    signed = parse_model_statement(verified.payload_type, verified.payload,
                                                   subject=key)
                except VerificationError:
                    continue
                if signed.binding.get("registry_name") != mname or \
                        signed.binding.get("version") != mversion:
                    continue
                signer = verified.signer
            out.append(RegistryEntry(mname, mversion, signer))
        return out
