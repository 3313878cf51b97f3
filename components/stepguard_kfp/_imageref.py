"""Which runtime image the components run: the one image setting, never the placeholder.

The stepguard runtime image is one setting, ``pods.image`` (``STEPGUARD_PODS_IMAGE``, or
``pods.image`` in the settings file), shared with the Airflow operator and ``stepguard pod
render``. The components follow it three ways:

* the Python API: the component decorators take :func:`component_image` when
  ``stepguard_kfp`` is first imported;
* every task :func:`~stepguard_kfp.harden` touches gets the setting's image again (a pipeline
  module may have imported the components before the setting was in place), so a hardened
  pipeline's compiled IR carries the configured digest;
* ``scripts/compile_components.py`` writes it (or ``--image``) into the component YAMLs.

:func:`assert_ir_runnable` refuses a compiled pipeline or component YAML that still names the
all-zero placeholder digest, which no registry serves: the example's ``--compile`` and the
compile script call it before anything leaves the machine.

>>> component_image(environ={"STEPGUARD_PODS_IMAGE": "r.example/sg@sha256:" + "ab" * 32})
... # doctest: +ELLIPSIS
'r.example/sg@sha256:abab...'
"""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stepguard.errors import ConfigurationError
from stepguard_kfp._image import DEFAULT_IMAGE, IMAGE_DIGEST, check_pinned

__all__ = ["assert_ir_runnable", "component_image", "configured_image", "set_task_image"]

_HINT = ("set the runtime image you built and reviewed: STEPGUARD_PODS_IMAGE=REPO@sha256:DIGEST "
         "or pods.image in the settings file (components/image/Containerfile builds it)")


def configured_image(environ: Mapping[str, str] | None = None) -> str | None:
    """``pods.image`` from the settings (environment first), or None where it is not set."""
    from stepguard.settings import Settings

    env = os.environ if environ is None else environ
    settings = Settings.load(environ=env)
    pods = getattr(settings, "pods", None)
    image = getattr(pods, "image", None)
    return check_pinned(str(image)) if image else None


def component_image(environ: Mapping[str, str] | None = None, *, strict: bool = True) -> str:
    """The image components run: the setting, else the placeholder (refused when compiled
    for a cluster by :func:`assert_ir_runnable`). ``strict=False`` (component import time)
    falls back to the placeholder on unreadable settings instead of failing the import; the
    same settings are read again, strictly, by ``harden`` and at run time."""
    try:
        return configured_image(environ) or DEFAULT_IMAGE
    except ConfigurationError:
        if strict:
            raise
        return DEFAULT_IMAGE


def set_task_image(task: Any, image: str | None = None) -> str | None:
    """Point a KFP task at ``image`` (default: the setting) when it runs the stepguard runtime
    image; returns the image now set, or None when nothing was set."""
    spec = getattr(task, "container_spec", None)
    current = getattr(spec, "image", None)
    if spec is None or not isinstance(current, str):
        return None
    wanted = image or configured_image()
    if not wanted or wanted == current:
        return None
    if current != DEFAULT_IMAGE and not current.endswith("@" + IMAGE_DIGEST) \
            and image is None:
        return None  # a task of another image (not ours): leave it alone
    spec.image = check_pinned(wanted)
    return wanted


def assert_ir_runnable(path: str | Path) -> Path:
    """Refuse a compiled YAML that still carries the placeholder digest; returns ``path``.

    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "p.yaml"
    >>> _ = f.write_text("image: " + DEFAULT_IMAGE)
    >>> assert_ir_runnable(f)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    stepguard.errors.ConfigurationError: compiled pipeline names the all-zero placeholder image...
    """
    p = Path(path)
    if IMAGE_DIGEST in p.read_text():
        raise ConfigurationError(
            "compiled pipeline names the all-zero placeholder image, which no registry serves",
            subject=str(p), hint=_HINT)
    return p
