"""The stepguard Airflow plugin: registers the task-instance audit listener.

Loaded through the ``airflow.plugins`` entry point (and the provider's ``plugins`` entry).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from stepguard_airflow import listener

__all__ = ["StepguardPlugin"]


class StepguardPlugin(AirflowPlugin):
    """Adds :mod:`stepguard_airflow.listener` to every Airflow process that loads plugins."""

    name = "stepguard"
    listeners = [listener]  # noqa: RUF012 -- Airflow's plugin API is a class attribute list
