"""The runtime image every stepguard component runs in, pinned by digest.

Components never ``pip install`` at run time: a runtime install needs egress from the training pod
and resolves whatever the index serves that day, unpinned by hash. Instead every component runs
from one image built from the stepguard wheel (``components/image/Containerfile``, installing
``requirements.lock`` with ``--require-hashes``) and is referenced by digest, never by tag, so the
bytes a compiled pipeline runs are the bytes that were reviewed.

The image is the one image setting, ``pods.image`` (``STEPGUARD_PODS_IMAGE``): ``harden`` puts
it on every task and compiled pipelines carry it. :data:`IMAGE_DIGEST` below is the all-zero
placeholder the checked-in component YAMLs carry (they are templates: ``scripts/
compile_components.py --image REPO@sha256:DIGEST`` or ``--image-from-settings`` writes the real
digest, and refuses the placeholder). :func:`check_pinned` refuses the placeholder like a tag, so
``harden`` fails on a task that would run it, and no registry could serve it anyway: an
unreleased YAML fails closed instead of running some other image.

>>> from stepguard_kfp._image import check_pinned
>>> image = "ghcr.io/stepguard/stepguard-runtime@sha256:" + "5" * 64
>>> check_pinned(image) == image
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
    """Return ``image`` if it is referenced by a sha256 digest, else raise ConfigurationError.
    The all-zero placeholder digest is refused too: it names no image anyone reviewed.

    >>> check_pinned(IMAGE_REPOSITORY + "@" + IMAGE_DIGEST)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    stepguard.errors.ConfigurationError: the all-zero placeholder digest is not an image: ...
    """
    from stepguard.settings import PLACEHOLDER_DIGEST

    if image.endswith("@" + PLACEHOLDER_DIGEST):
        raise ConfigurationError(
            "the all-zero placeholder digest is not an image", subject=image,
            hint="set pods.image (STEPGUARD_PODS_IMAGE or the settings file) to the digest of the "
                 "runtime image you built and reviewed (components/image/Containerfile)")
    if not _PINNED.match(image):
        raise ConfigurationError(
            "component image must be pinned by digest (repo@sha256:<64 hex>)",
            subject=image,
            hint="a tag can be moved to other bytes after review; a digest cannot",
        )
    return image
