"""Data integrity: content manifests, verification, staging and S3 checksums.

A manifest records every file of a dataset or model (relative POSIX path, size, digest), the
algorithm and parameters, and one root digest. It is an in-toto Statement v1, so it can be signed
as-is. Verification re-hashes every byte (no mtime/inode cache) and reports every difference.

>>> import tempfile, pathlib
>>> from stepguard.integrity import create_manifest, verify_manifest, Manifest
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "train.csv").write_text("a,b\\n1,2\\n")
>>> m = create_manifest(d)
>>> report = verify_manifest(d, Manifest.from_json(m.to_json()))
>>> report.files, report.manifest_digest == m.digest
(1, True)

Other controls hash files through :func:`file_digests` (plain SHA-256 of a tree's files, read
with the same checks as the manifest operations) and :func:`copy_file` (copy while hashing).
S3 helpers live in :mod:`stepguard.integrity.s3` (boto3 is imported only when used).
"""

from __future__ import annotations

from stepguard.integrity._digests import copy_file, file_digests, plain_sha256_digests
from stepguard.integrity._engine import ProgressCallback
from stepguard.integrity._manifest import (
    DEFAULT_SHARD_SIZE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    Manifest,
    ManifestEntry,
)
from stepguard.integrity._tree import (
    VerificationReport,
    create_manifest,
    default_jobs,
    stage_and_verify,
    verify_manifest,
)

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "PREDICATE_TYPE",
    "STATEMENT_TYPE",
    "Manifest",
    "ManifestEntry",
    "ProgressCallback",
    "VerificationReport",
    "copy_file",
    "create_manifest",
    "default_jobs",
    "file_digests",
    "plain_sha256_digests",
    "stage_and_verify",
    "verify_manifest",
]
