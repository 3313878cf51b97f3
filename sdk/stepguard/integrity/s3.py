"""S3 integrity: checksummed uploads (a tree with :func:`upload`, one file with
:func:`put_file`, which the S3 registry uses too), manifests from stored checksums, in-place
verification and download-while-hashing into a staging directory. boto3 is imported only when a
function runs.

Pass a boto3 S3 client as ``client=`` (for example one made from the step's just-in-time
credentials); without one, ``boto3.client("s3")`` is used.

>>> from stepguard.integrity.s3 import S3Location
>>> str(S3Location("datasets", "iris/v3"))
's3://datasets/iris/v3/'
"""

from __future__ import annotations

from stepguard.integrity._s3 import (
    S3Location,
    S3ManifestReport,
    download_and_verify,
    manifest_from_s3,
    verify_s3,
)
from stepguard.integrity._s3upload import S3Put, put_file, upload

__all__ = [
    "S3Location",
    "S3ManifestReport",
    "S3Put",
    "download_and_verify",
    "manifest_from_s3",
    "put_file",
    "upload",
    "verify_s3",
]
