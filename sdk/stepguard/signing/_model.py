"""Sign and verify model directories as OpenSSF model-signing bundles.

Git metadata at the top of a model directory (``.git/``, ``.gitattributes``, ``.github/``,
``.gitignore``: every Hugging Face checkout has a ``.gitattributes``) is handled exactly as the
stock ``model_signing`` tool does by default (``ignore_git_paths``): left out of the signed
resources and recorded in ``ignore_paths``. Verification ignores those paths when the signature
does not cover them, so a model signed by either tool verifies with the other. They are not part
of the model: nothing in them is verified, and a registry fetch never materialises them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepguard.errors import ConfigurationError, IntegrityError, SignatureError
from stepguard.signing._bundle import (
    GIT_IGNORE_PATHS,
    build_model_statement,
    load_bundle,
    parse_model_statement,
)
from stepguard.signing._formats import check_formats
from stepguard.signing._hashing import WalkResult, diff, hash_files, walk
from stepguard.signing._policy import Policy
from stepguard.signing._signers import Signer


@dataclass(frozen=True)
class SignedArtifact:
    """The result of signing: the bundle bytes and what they cover."""

    bundle: bytes = field(repr=False)
    root_digest: str
    files: Mapping[str, str]
    signer: str
    name: str


@dataclass(frozen=True)
class VerifiedModel:
    """A model that passed signature, policy, integrity and format checks."""

    path: Path
    name: str
    root_digest: str
    files: Mapping[str, str]
    signer: str
    policy: str
    binding: Mapping[str, Any]
    pickles_scanned: tuple[str, ...] = ()


def _inside(model_dir: Path, bundle_path: Path | None) -> str | None:
    if bundle_path is None:
        return None
    try:
        rel = os.path.relpath(os.path.abspath(bundle_path), os.path.abspath(model_dir))
    except ValueError:
        return None
    return None if rel.startswith("..") else rel.replace(os.sep, "/")


def _model_files(model: Path, skip: set[str]) -> dict[str, Path]:
    """Relative name -> path. A single file is named ``.``, as ``model_signing`` does."""
    st = _lstat(model)
    if stat.S_ISLNK(st.st_mode):
        raise IntegrityError("model path is a symlink (refused)", subject=str(model))
    if stat.S_ISREG(st.st_mode):
        return {".": model}
    if not stat.S_ISDIR(st.st_mode):
        raise IntegrityError("model path is not a regular file or directory", subject=str(model))
    result = walk(model, skip=set(skip) | GIT_IGNORE_PATHS)
    if result.problems:
        raise IntegrityError("model contains entries that cannot be signed or verified",
                             subject=result.problems[0].split(": ", 1)[-1],
                             details=result.problems)
    return result.files


def model_files(model: str | Path, *, skip: Collection[str] = ()) -> dict[str, Path]:
    """The files a model signature covers: relative POSIX name -> path.

    Every regular file under the directory ``model`` except the names in ``skip``; a single
    file is named ``"."``, as ``model_signing`` does. Symlinks and special files are refused
    (:class:`~stepguard.errors.IntegrityError` listing each), never followed.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "w.bin").write_bytes(b"1")
    >>> _ = (d / "model.sig").write_bytes(b"{}")
    >>> sorted(model_files(d, skip={"model.sig"}))
    ['w.bin']
    """
    return _model_files(Path(model), set(skip))


def _lstat(path: Path) -> os.stat_result:
    try:
        return os.lstat(path)
    except OSError as exc:
        raise ConfigurationError(f"cannot read model path ({exc.strerror})",
                                 subject=str(path)) from exc


def sign_files(files: Mapping[str, Path], signer: Signer, *, name: str,
               binding: Mapping[str, Any] | None = None, allow_pickle: bool = False,
               jobs: int | None = None) -> SignedArtifact:
    """Sign an explicit file set (relative name -> path); the building block of sign_model."""
    if not files:
        raise ConfigurationError("nothing to sign (no files)", subject=name)
    check_formats(files, allow_pickle=allow_pickle)
    return sign_digests(hash_files(dict(files), jobs=jobs), signer, name=name, binding=binding)


def sign_digests(digests: Mapping[str, str], signer: Signer, *, name: str,
                 binding: Mapping[str, Any] | None = None) -> SignedArtifact:
    """Sign already computed per-file SHA-256 digests (e.g. of the bytes a registry stored)."""
    statement = build_model_statement(name, digests, binding=binding)
    bundle = signer.sign_dsse(statement)
    signed = parse_model_statement("application/vnd.in-toto+json", statement)
    return SignedArtifact(bundle=bundle, root_digest=signed.root_digest, files=dict(digests),
                          signer=signer.identity, name=name)


def sign_model(model_dir: str | Path, signer: Signer, *, bundle_path: str | Path | None = None,
               name: str | None = None, binding: Mapping[str, Any] | None = None,
               allow_pickle: bool = False, jobs: int | None = None) -> SignedArtifact:
    """Hash every file of ``model_dir`` (a directory, or one file) and sign the statement.

    Refuses symlinks, special files and (unless ``allow_pickle``) pickle-based files. Writes
    the bundle to ``bundle_path`` when given (a bundle inside the model directory is left out
    of the signature, as ``model_signing`` does).
    """
    model_dir = Path(model_dir)
    bpath = Path(bundle_path) if bundle_path is not None else None
    inside = _inside(model_dir, bpath)
    files = _model_files(model_dir, {inside} if inside else set())
    signed = sign_files(files, signer, name=name or model_dir.resolve().name, binding=binding,
                        allow_pickle=allow_pickle, jobs=jobs)
    if bpath is not None:
        bpath.write_bytes(signed.bundle)
    return signed


def verify_model(model_dir: str | Path, bundle: str | Path | bytes, policy: Policy, *,
                 expected_name: str | None = None,
                 expected_binding: Mapping[str, Any] | None = None,
                 jobs: int | None = None) -> VerifiedModel:
    """Verify ``model_dir`` against a bundle under ``policy`` (mandatory, no default).

    Order: the bundle's signature against the policy; the signed statement against the
    serialization allow-list (files/sha256, no symlinks, only git paths ignorable, no unsafe
    names); every file on disk against the signed digests (nothing missing, modified or
    unsigned, no links); the binding (name, registry coordinates); finally unsafe formats.
    Nothing in the directory is loaded or executed.
    """
    if not isinstance(policy, Policy):
        raise ConfigurationError("verification needs an explicit policy (KeyPolicy, "
                                 "TransitPolicy, SigstorePolicy)", subject="policy")
    model_dir = Path(model_dir)
    inside = None
    if isinstance(bundle, bytes):
        raw, label = bundle, "bundle"
    else:
        bpath = Path(bundle)
        label = str(bpath)
        inside = _inside(model_dir, bpath)
        try:
            raw = bpath.read_bytes()
        except OSError as exc:
            raise SignatureError(f"cannot read signature bundle ({exc.strerror})",
                                 subject=label) from exc
    verified = policy.verify_bundle(load_bundle(raw, subject=label), subject=label)
    signed = parse_model_statement(verified.payload_type, verified.payload, subject=label,
                                   extra_ignored=frozenset({inside}) if inside else frozenset())
    if stat.S_ISREG(_lstat(model_dir).st_mode):
        walked = WalkResult({".": model_dir}, ())
    else:
        # Git metadata the signature does not cover is not part of the model (see above).
        unsigned_git = {g for g in GIT_IGNORE_PATHS
                        if not any(f == g or f.startswith(g + "/") for f in signed.files)}
        walked = walk(model_dir, skip=unsigned_git | ({inside} if inside else set()))
    actual = hash_files(walked.files, jobs=jobs)
    problems = diff(dict(signed.files), actual, walked.problems)
    if problems:
        first = problems[0].split(": ", 1)[-1]
        if first == ".":
            first = str(model_dir)
        raise IntegrityError("model does not match its signature", subject=first,
                             details=problems)
    if expected_name is not None and signed.name != expected_name:
        raise SignatureError("bundle was signed for a different model", subject=label,
                             details=(f"signed name {signed.name!r}, expected {expected_name!r}",))
    for key, want in (expected_binding or {}).items():
        got = signed.binding.get(key)
        if got != want:
            raise SignatureError("bundle is bound to a different artifact", subject=label,
                                 details=(f"{key}: signed {got!r}, expected {want!r}",))
    scanned = check_formats(walked.files, allow_pickle=policy.allow_pickle,
                            allowed_formats=getattr(policy, "allowed_formats", None))
    return VerifiedModel(path=model_dir, name=signed.name, root_digest=signed.root_digest,
                         files=dict(signed.files), signer=verified.signer,
                         policy=policy.describe(), binding=dict(signed.binding),
                         pickles_scanned=tuple(scanned))
