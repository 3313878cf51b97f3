"""The stepguard Airflow plugin: the task-instance audit listener and the chain-of-custody UI.

Loaded through the ``airflow.plugins`` entry point (and the provider's ``plugins`` entry) by
every Airflow process, so it stays cheap to import: the UI's FastAPI app is built on its first
request and the extra link resolves our operator classes only when the api-server asks
(:mod:`stepguard_airflow._ui`).

* ``listeners`` -- :mod:`stepguard_airflow.listener` (an audit span per task instance);
* ``fastapi_apps`` -- the chain-of-custody views under ``/stepguard`` on the api-server;
* ``external_views`` -- a nav entry, a DAG-run tab and a task-instance tab showing them;
* ``operator_extra_links`` -- "stepguard receipt" on every secured task instance.

See docs/reference/airflow-ui.md.
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin

from stepguard_airflow import listener
from stepguard_airflow._ui import EXTERNAL_VIEWS, FASTAPI_APPS, ReceiptLink

__all__ = ["StepguardPlugin"]


class StepguardPlugin(AirflowPlugin):
    """The listener, the chain-of-custody app, its views and the receipt extra link."""

    name = "stepguard"
    listeners = [listener]  # noqa: RUF012 -- Airflow's plugin API is a class attribute list
    fastapi_apps: list[Any] = FASTAPI_APPS
    external_views: list[Any] = EXTERNAL_VIEWS
    operator_extra_links: list[Any] = [ReceiptLink()]  # noqa: RUF012
