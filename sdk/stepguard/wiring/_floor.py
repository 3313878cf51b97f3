"""The run-time floor check: the step runner refuses a step that breaches the settings' floor.

The floor in :class:`~stepguard.settings.Settings` is the platform's copy (the workers' settings
file, the image's), so a step is checked against it wherever it runs, whatever the DAG file or
the spec says. The TTL rule uses the settings' ``vault.ttl_margin_s``; the ``signed`` rule also
requires the signer of a published output to be one the floor's policy accepts (the same
Transit key, or the same kind of signer).
"""

from __future__ import annotations

from stepguard.floor import FloorViolation, raise_violations
from stepguard.settings import Settings
from stepguard.spec import StepSpec


def enforce_floor(spec: StepSpec, settings: Settings) -> None:
    """Raise :class:`~stepguard.errors.PolicyViolation` naming the rule when ``spec`` breaches
    ``settings.floor``; nothing when there is no floor."""
    floor = settings.floor
    if floor is None:
        return
    found = floor.violations(spec, ttl_margin_s=settings.vault.ttl_margin_s)
    name = floor.signature_policy
    publishes = [o.name for o in spec.outputs if o.publish is not None]
    if name is not None and publishes and spec.signing is not None:
        policy = settings.policies.get(name)
        signer = spec.signing
        accepted = policy is not None and signer.signer == policy.kind and (
            policy.kind != "transit" or signer.key == policy.key)
        if not accepted:
            shown = f"{signer.signer}:{signer.key}" if signer.key else signer.signer
            found.append(FloorViolation(
                "signed", f"{spec.name}.signing",
                f"output {publishes[0]!r} is signed by {shown}, which policy {name!r} "
                "does not accept"))
    raise_violations(found)
