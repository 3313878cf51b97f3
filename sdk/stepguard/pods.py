"""A step as a Kubernetes pod: the public surface of :mod:`stepguard._podstep`.

The orchestrator side of ``isolation.mode: pod`` and ``SecureKubernetesPodOperator``: the
ConfigMap (step spec, settings, Vault CA), the wrapped hand-over or the pod's own Vault JWT login,
the egress allowlist from settings, the step runner (``stepguard exec``) as the pod's entrypoint,
and the pod's receipt read back and checked. See ``docs/guides/kubernetes.md``.

>>> from stepguard.pods import pod_egress
>>> from stepguard.settings import Settings
>>> from stepguard.spec import StepSpec
>>> spec = StepSpec.from_dict({"name": "t", "isolation": {"mode": "pod", "network": []},
...                            "credentials": [{"name": "api", "kind": "kv", "path": "x"}]})
>>> pod_egress(spec, Settings.from_dict({"vault": {"addr": "https://10.0.0.5:8200"}}))
('10.0.0.5:8200',)
"""

from __future__ import annotations

from stepguard._podstep import (
    RECEIPT_MARKER,
    check_pod_spec,
    jwt_login,
    pod_config,
    pod_egress,
    run_in_pod,
)

__all__ = ["RECEIPT_MARKER", "check_pod_spec", "jwt_login", "pod_config", "pod_egress",
           "run_in_pod"]
