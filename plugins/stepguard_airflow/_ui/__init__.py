"""The chain of custody in the Airflow UI: what :class:`~stepguard_airflow.plugin.StepguardPlugin`
adds to ``airflow api-server``.

* :data:`FASTAPI_APPS` -- one app mounted at :data:`URL_PREFIX` (``/stepguard``) that renders,
  server-side, a DAG run's chain-of-custody graph and each task instance's receipt, read-only
  (:mod:`stepguard_airflow._ui._app`, routes listed there).
* :data:`EXTERNAL_VIEWS` -- where the UI shows them: a "Chain of custody" nav entry (recent
  runs), a tab on every DAG run and a "stepguard receipt" tab on every task instance.
* :class:`ReceiptLink` -- the operator extra link "stepguard receipt" on every secured operator's
  task instances, pointing at its receipt view.

Everything heavy is deferred: importing this package (every Airflow process imports the plugin,
DAG parsing included) loads neither FastAPI nor the operators. The app is built on its first
request (:class:`LazyApp`) and the link's operator classes are resolved when the api-server
first deserializes a DAG (:attr:`ReceiptLink.operators`).

>>> EXTERNAL_VIEWS[1]["href"]
'stepguard/dags/{DAG_ID}/runs/{RUN_ID}'
>>> receipt_path("d", "manual__1", "train", 2)
'/stepguard/dags/d/runs/manual__1/tasks/train?map_index=2'
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

__all__ = ["EXTERNAL_VIEWS", "FASTAPI_APPS", "URL_PREFIX", "LazyApp", "ReceiptLink",
           "receipt_path"]

#: Where the app is mounted on the api-server.
URL_PREFIX = "/stepguard"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


class LazyApp:
    """An ASGI app that builds the real FastAPI app on its first request, so that loading the
    plugin costs nothing in processes that never serve it."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._app: Any = None
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if self._app is None:
            with self._lock:
                if self._app is None:
                    self._app = self._factory()
        await self._app(scope, receive, send)


def _create() -> Any:
    from stepguard_airflow._ui._app import create_app

    return create_app()


FASTAPI_APPS: list[dict[str, Any]] = [
    {"app": LazyApp(_create), "url_prefix": URL_PREFIX, "name": "stepguard chain of custody"},
]

_HREF = URL_PREFIX.lstrip("/")
EXTERNAL_VIEWS: list[dict[str, Any]] = [
    {"name": "Chain of custody", "href": f"{_HREF}/", "destination": "nav",
     "category": "browse", "url_route": "stepguard"},
    {"name": "Chain of custody", "href": f"{_HREF}/dags/{{DAG_ID}}/runs/{{RUN_ID}}",
     "destination": "dag_run", "url_route": "stepguard-run"},
    {"name": "stepguard receipt",
     "href": f"{_HREF}/dags/{{DAG_ID}}/runs/{{RUN_ID}}/tasks/{{TASK_ID}}"
             "?map_index={MAP_INDEX}",
     "destination": "task_instance", "url_route": "stepguard-receipt"},
]


def _root() -> str:
    """The api-server's path prefix (``[api] base_url``), without a trailing slash."""
    from airflow.configuration import conf

    return urlsplit(conf.get("api", "base_url", fallback="") or "/").path.rstrip("/")


def receipt_path(dag_id: str, run_id: str, task_id: str, map_index: int = -1,
                 *, root: str = "") -> str:
    """The receipt view of one task instance, as an absolute path on the api-server."""
    def seg(v: str) -> str:
        return quote(v, safe="")

    url = f"{root}{URL_PREFIX}/dags/{seg(dag_id)}/runs/{seg(run_id)}/tasks/{seg(task_id)}"
    return url if map_index < 0 else f"{url}?map_index={map_index}"


def _secured_operators() -> list[type[Any]]:
    from stepguard_airflow.decorators import _StepguardDecoratedOperator
    from stepguard_airflow.operators import (
        IngestDatasetOperator,
        SecureStepOperator,
        SignAndPublishModelOperator,
        VerifyDatasetOperator,
        VerifyModelOperator,
    )

    found: list[type[Any]] = [SecureStepOperator, IngestDatasetOperator, VerifyDatasetOperator,
                              SignAndPublishModelOperator, VerifyModelOperator,
                              _StepguardDecoratedOperator]
    try:  # the cncf-kubernetes provider is optional
        from stepguard_airflow.operators.kubernetes import SecureKubernetesPodOperator
    except ImportError:
        return found
    return [*found, SecureKubernetesPodOperator]


class ReceiptLink(BaseOperatorLink):
    """"stepguard receipt": from a secured task instance to its receipt view.

    Registered by the plugin (``operator_extra_links``), so the api-server attaches it to every
    task whose operator is one of ours and computes the URL itself: tasks that ran before the
    plugin was installed get the link too, and no task pushes anything for it.
    """

    name = "stepguard receipt"

    @property
    def operators(self) -> list[type[BaseOperator]]:  # type: ignore[override]
        """Our operator classes, imported the first time the api-server asks."""
        return _secured_operators()

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        return receipt_path(ti_key.dag_id, ti_key.run_id, ti_key.task_id, ti_key.map_index,
                            root=_root())
