"""stepguard's OpenLineage custom facets: what a lineage backend learns from a secured step.

Three facets, each a proper OpenLineage custom facet (an ``attrs`` class derived from the
client's ``DatasetFacet``/``RunFacet``, with ``_producer`` and ``_schemaURL``), each with its JSON
Schema shipped next to this module and published under :data:`SCHEMA_BASE`:

==========================  =======================================  ========================
key in the event            class                                    on
==========================  =======================================  ========================
``stepguard_manifest``      ``StepguardManifestDatasetFacet``        every input and output
``stepguard_signature``     ``StepguardSignatureDatasetFacet``       signed / gated models
``stepguard_verdicts``      ``StepguardVerdictsRunFacet``            the task's run
==========================  =======================================  ========================

The classes need ``openlineage-python`` (installed with the Airflow OpenLineage provider); they
load on first attribute access, so importing this package stays cheap:

>>> from stepguard_airflow import facets
>>> facets.schema_url("StepguardVerdictsRunFacet")
'https://stepguard.dev/spec/facets/1-0-0/StepguardVerdictsRunFacet.json#/$defs/StepguardVerdictsRunFacet'
>>> sorted(facets.FACET_KEYS.values())
['StepguardManifestDatasetFacet', 'StepguardSignatureDatasetFacet', 'StepguardVerdictsRunFacet']
>>> facets.schema_path("StepguardManifestDatasetFacet").is_file()
True
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stepguard_airflow.facets._model import (
        StepguardManifestDatasetFacet,
        StepguardSignatureDatasetFacet,
        StepguardVerdictsRunFacet,
    )

__all__ = [
    "FACET_KEYS",
    "PRODUCER",
    "SCHEMA_BASE",
    "StepguardManifestDatasetFacet",
    "StepguardSignatureDatasetFacet",
    "StepguardVerdictsRunFacet",
    "schema_path",
    "schema_url",
]

#: Where the facets' JSON Schemas are published (one file per facet, versioned).
SCHEMA_BASE = "https://stepguard.dev/spec/facets/1-0-0/"
#: The ``_producer`` of every stepguard facet.
PRODUCER = "https://stepguard.dev/stepguard-airflow"
#: Facet key in an OpenLineage event -> facet class name.
FACET_KEYS = {
    "stepguard_manifest": "StepguardManifestDatasetFacet",
    "stepguard_signature": "StepguardSignatureDatasetFacet",
    "stepguard_verdicts": "StepguardVerdictsRunFacet",
}


def schema_url(name: str) -> str:
    """The ``_schemaURL`` of the facet class ``name``."""
    return f"{SCHEMA_BASE}{name}.json#/$defs/{name}"


def schema_path(name: str) -> Path:
    """The JSON Schema of the facet class ``name``, as shipped in this package."""
    return Path(__file__).with_name(f"{name}.json")


def __getattr__(name: str) -> Any:
    if name in FACET_KEYS.values():
        from stepguard_airflow.facets import _model

        return getattr(_model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
