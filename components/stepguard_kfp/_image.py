"""The runtime image every stepguard component runs in, pinned by digest.

Components never ``pip install`` at run time: a runtime install needs egress from the training pod
and resolves whatever the index serves that day, unpinned by hash. Instead every component runs
from one image built from the stepguard wheel (``components/image/Containerfile``, installing
``requirements.lock`` with ``--require-hashes``) and is referenced by digest, never by tag, so the
bytes a compiled pipeline runs are the bytes that were reviewed.

The release process builds and pushes the image, then regenerates the component YAMLs with
``scripts/compile_components.py --image REPO@sha256:DIGEST``. No image is built in this
repository's own test runs: :data:`IMAGE_DIGEST` below is the placeholder the checked-in YAMLs
carry until a release pins the real one (the all-zero digest cannot be pulled, so an unreleased
YAML fails closed instead of running some other image).

>>> from stepguard_kfp._image import check_pinned, DEFAULT_IMAGE
>>> check_pinned(DEFAULT_IMAGE) == DEFAULT_IMAGE
True
>>> check_pinned("ghcr.io/stepguard/stepguard:latest")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
stepguard.errors.ConfigurationError: component image must be pinned by digest ...:latest
"""

from __future__ import annotations

import re

from stepguard.errors import ConfigurationError

__all__ = ["DEFAULT_IMAGE", "IMAGE_DIGEST", "IMAGE_REPOSITORY", "check_pinned"]

#: Where release builds of the runtime image are pushed.
IMAGE_REPOSITORY = "ghcr.io/stepguard/stepguard-runtime"
#: Placeholder until a release pins the pushed image (see module docs); never a tag.
IMAGE_DIGEST = "sha256:" + "0" * 64
#: The image reference compiled into the component YAMLs.
DEFAULT_IMAGE = f"{IMAGE_REPOSITORY}@{IMAGE_DIGEST}"

_PINNED = re.compile(r"^[a-z0-9][a-z0-9._/:-]*@sha256:[0-9a-f]{64}$")


def check_pinned(image: str) -> str:
    """Return ``image`` if it is referenced by a sha256 digest, else raise ConfigurationError."""
    if not _PINNED.match(image):
        raise ConfigurationError(
            "component image must be pinned by digest (repo@sha256:<64 hex>)",
            subject=image,
            hint="a tag can be moved to other bytes after review; a digest cannot",
        )
    return image
