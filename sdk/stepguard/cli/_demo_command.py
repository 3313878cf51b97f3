"""``stepguard demo``: the secured example pipeline end to end, with a report.

The ``sdk`` engine is the pipeline through the SDK alone (:mod:`stepguard.cli._demo`). An adapter
adds an engine through the ``stepguard.demo_engines`` entry-point group: the name is the engine,
the value a function ``run(*, workdir, tampered, keep_services) -> int`` whose docstring's first
line is its help. The first engine an installed adapter adds is the default (the Airflow adapter
adds ``airflow``: the example DAG under Airflow). An engine that also takes a ``cluster`` keyword
supports ``--cluster``: the pipeline on a real orchestrator deployment, every task in its own
process and directories (the Airflow engine: scheduler, DAG processor and API server); the other
engines refuse it with a :class:`~stepguard.errors.ConfigurationError`.

``stepguard demo`` owns its process: SIGTERM unwinds through every ``finally``, so the services
and processes the demo started are stopped before it exits (status 143).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["register"]

_SDK_ENGINE_HELP = "the same pipeline through the SDK alone, without Airflow"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``demo``."""
    engines = _engines()
    default = next(iter(engines))
    p = sub.add_parser("demo", help="run the secured example pipeline end to end and report")
    p.add_argument("--engine", choices=sorted(engines), default=default,
                   help="; ".join(f"{name}: {text}" + (" (default)" if name == default else "")
                                  for name, (text, _run) in sorted(engines.items())))
    p.add_argument("--workdir", default=None,
                   help="where to put the demo run (default: .stepguard/demo)")
    p.add_argument("--tampered", action="store_true",
                   help="tamper with the dataset after it was published: the pipeline must stop")
    p.add_argument("--keep-services", action="store_true", help="leave the dev stack running")
    p.add_argument("--cluster", action="store_true",
                   help="run on a real orchestrator deployment (Airflow: scheduler, DAG "
                        "processor, API server), every task in its own process, working "
                        "directory and state dir")
    p.set_defaults(func=_cmd_demo, engines=engines)


_Engine = tuple[str, Callable[..., int]]


def _engines() -> dict[str, _Engine]:
    """Engine name -> (help, run): the adapters' engines in install order, then ``sdk``."""
    from stepguard.cli import _entry_points, _load_entry_point

    engines: dict[str, _Engine] = {}
    for ep in _entry_points("stepguard.demo_engines"):
        if ep.name == "sdk":
            continue
        run = _load_entry_point(ep)
        if run is None:
            continue
        text = (run.__doc__ or ep.name).strip().splitlines()[0].rstrip(".")
        text = text[:1].lower() + text[1:]  # "The example DAG." -> "the example DAG"
        engines[ep.name] = (text, run)
    engines["sdk"] = (_SDK_ENGINE_HELP, _run_sdk_demo)
    return engines


def _run_sdk_demo(*, workdir: str | None, tampered: bool, keep_services: bool) -> int:
    from stepguard.cli._demo import run_demo

    return run_demo(workdir=workdir, tampered=tampered, keep_services=keep_services)


def _cmd_demo(args: argparse.Namespace) -> int:
    import inspect
    import signal

    from stepguard._private.signals import unwind_on
    from stepguard.errors import ConfigurationError

    _text, run = args.engines[args.engine]
    extra: dict[str, bool] = {}
    if args.cluster:
        if "cluster" not in inspect.signature(run).parameters:
            raise ConfigurationError("this demo engine has no cluster mode",
                                     subject=f"demo --engine {args.engine} --cluster",
                                     hint="stepguard demo --engine airflow --cluster")
        extra["cluster"] = True
    with unwind_on(signal.SIGTERM, take_over=True):
        status: int = run(workdir=args.workdir, tampered=args.tampered,
                          keep_services=args.keep_services, **extra)
    return status
