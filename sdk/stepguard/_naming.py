"""Names a run gives a step: the instance name of a mapped task and per-run output paths.

Run ids and step names come from the orchestrator and end up in paths and span names, so they
are made path-safe here, in one place.
"""

from __future__ import annotations

import re

from stepguard.errors import ConfigurationError
from stepguard.spec import RunContext

__all__ = ["instance_name", "output_path", "path_component"]


def path_component(value: str) -> str:
    """``value`` as one safe path component: other characters become ``_``, and so do the
    dots of ``.`` and ``..``.

    >>> path_component("manual__2026-11-22T06:00"), path_component("..")
    ('manual__2026-11-22T06_00', '__')
    """
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", value)
    return safe if safe.strip(".") else "_" * max(len(safe), 1)


def instance_name(spec_name: str, context_step: str) -> str:
    """The spec's name, or the orchestrator's name for one numbered instance of it
    (``train.3``, a mapped Airflow task instance) when the run context gives one. Any other
    context step name (the default ``step``, a caller's label such as ``train.eval``, which
    could be another spec's name) does not replace the spec's name.

    >>> instance_name("train", "train.3"), instance_name("train", "step")
    ('train.3', 'train')
    >>> instance_name("train", "train.eval")
    'train'
    """
    suffix = context_step[len(spec_name) + 1:]
    if context_step.startswith(spec_name + ".") and suffix.isascii() and suffix.isdigit():
        return context_step
    return spec_name


def output_path(template: str, ctx: RunContext, step: str) -> str:
    """Expand ``{run_id}``, ``{step}`` and ``{try_number}`` in an output path, so every run
    writes to a fresh directory (run ids and step names are made path-safe first). ``step`` is
    the step's name, for a mapped Airflow task instance ``<task>.<index>``.

    >>> output_path("out/{run_id}/model", RunContext(run_id="manual__2026-11-22T06:00"), "train")
    'out/manual__2026-11-22T06_00/model'
    """
    try:
        return template.format_map({"run_id": path_component(ctx.run_id),
                                    "step": path_component(step),
                                    "try_number": str(ctx.try_number)})
    except (KeyError, ValueError, IndexError) as exc:
        raise ConfigurationError(
            "output path has an unknown placeholder (known: {run_id}, {step}, {try_number})",
            subject=template) from exc
