"""The organisation's policy floor: controls no pipeline, template instance or step may weaken.

A platform team states the floor once -- in a pipeline template (:mod:`stepguard.template`) and
in the workers' stepguard settings (``floor:``) -- and it is checked three times:

* when a template is instantiated (DAG parse time, KFP compile time), by the template;
* when a step runs, by the step runner against the floor in the settings of the worker or pod
  (the authoritative copy: a DAG file cannot edit it);
* in CI, by ``stepguard lint --floor FILE`` over DAG files.

Each rule has a name, and a breach is a :class:`~stepguard.errors.PolicyViolation` (a security
verdict: never retried) whose text names the rule and the field:

===================  ============================================================================
rule                 what it requires
===================  ============================================================================
``isolated``         steps matching ``isolated_steps`` run in the sandbox or a pod
``no-egress``        steps matching ``no_egress_steps`` have network ``none`` (no allowlist, no
                     host network)
``signed``           every published output is signed; a verification gate uses
                     ``signature_policy``
``credential-ttl``   a step holding credentials asks for a TTL (deadline + margin) of at most
                     ``max_credential_ttl_s``
``inputs-verified``  no input is used ``unsafe_unverified``
===================  ============================================================================

Step patterns are shell globs matched against the step name, the name without the index of a
mapped instance (``train.3``), and its last dotted part (a task group's ``churn.train``).

>>> from stepguard.floor import Floor
>>> from stepguard.spec import StepSpec
>>> floor = Floor(isolated_steps=("train",), no_egress_steps=("train",))
>>> spec = StepSpec.from_dict({"name": "train", "isolation": {"mode": "process"}})
>>> [v.rule for v in floor.violations(spec)]
['isolated']
>>> floor.enforce(spec)
Traceback (most recent call last):
...
stepguard.errors.PolicyViolation: floor rule 'isolated' violated: step 'train' runs in isolation \
mode 'process' (the floor needs sandbox or pod): train.isolation.mode
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepguard._private.schema import from_mapping, load_yaml, to_plain
from stepguard.errors import ConfigurationError, PolicyViolation
from stepguard.spec import StepSpec

__all__ = [
    "DEFAULT_TTL_MARGIN_S",
    "RULES",
    "Floor",
    "FloorViolation",
    "raise_violations",
    "step_matches",
]

#: The rules a floor can state, by name.
RULES = ("isolated", "no-egress", "signed", "credential-ttl", "inputs-verified")

#: The margin a credential lease outlives its step's deadline by when no settings say otherwise
#: (``vault.ttl_margin_s``'s default).
DEFAULT_TTL_MARGIN_S = 300.0

_INDEX = re.compile(r"\.\d+$")


def step_matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether step ``name`` is one of ``patterns`` (globs; see the module docs).

    >>> step_matches("train.3", ["train"]), step_matches("churn.train", ["train"])
    (True, True)
    >>> step_matches("sign_and_publish", ["train*"])
    False
    """
    base = _INDEX.sub("", name)
    last = base.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in (name, base, last))


@dataclass(frozen=True)
class FloorViolation:
    """One breach of the floor: the rule's name, the field that breaches it, what is wrong."""

    rule: str
    subject: str
    message: str

    def __str__(self) -> str:
        return f"floor rule {self.rule!r} violated: {self.message}: {self.subject}"


@dataclass(frozen=True)
class Floor:
    """The controls every pipeline of the organisation keeps (see the module docs).

    An empty floor (the default) requires nothing. ``from_dict`` reads the YAML form::

        floor:
          isolated_steps: [train]
          no_egress_steps: [train]
          signature_policy: release
          max_credential_ttl_s: 3600
          inputs_verified: true

    >>> Floor.from_dict({"isolated_steps": ["train"], "signature_policy": "release"}).rules()
    ('isolated', 'signed')
    """

    isolated_steps: tuple[str, ...] = ()
    no_egress_steps: tuple[str, ...] = ()
    signature_policy: str | None = None
    max_credential_ttl_s: float | None = None
    inputs_verified: bool = False

    def __post_init__(self) -> None:
        if self.max_credential_ttl_s is not None and self.max_credential_ttl_s <= 0:
            raise ConfigurationError("must be > 0", subject="floor.max_credential_ttl_s")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Floor:
        """A floor from plain data, refusing unknown keys and wrong types."""
        return from_mapping(cls, data, "floor")

    @classmethod
    def from_file(cls, path: str | Path) -> Floor:
        """The floor in a YAML/JSON file: a floor mapping, or the ``floor:`` section of any file
        that has one (a pipeline template, stepguard settings).

        >>> import pathlib, tempfile
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "settings.yaml"
        >>> _ = f.write_text("floor: {isolated_steps: [train]}")
        >>> Floor.from_file(f).isolated_steps
        ('train',)
        """
        data = load_yaml(Path(path), "floor")
        if isinstance(data, Mapping) and isinstance(data.get("floor"), Mapping):
            data = data["floor"]
        if not isinstance(data, Mapping):
            raise ConfigurationError("expected a floor mapping or a 'floor:' section",
                                     subject=str(path))
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (round-trips through :meth:`from_dict`)."""
        out: dict[str, Any] = to_plain(self)
        return out

    def rules(self) -> tuple[str, ...]:
        """The names of the rules this floor states."""
        stated = {
            "isolated": bool(self.isolated_steps),
            "no-egress": bool(self.no_egress_steps),
            "signed": self.signature_policy is not None,
            "credential-ttl": self.max_credential_ttl_s is not None,
            "inputs-verified": self.inputs_verified,
        }
        return tuple(r for r in RULES if stated[r])

    # -- checks ---------------------------------------------------------------------------

    def violations(self, spec: StepSpec, *, ttl_margin_s: float = DEFAULT_TTL_MARGIN_S,
                   where: str = "") -> list[FloorViolation]:
        """Every breach of this floor by one step spec (``where`` prefixes the subjects)."""
        at = f"{where}{spec.name}"
        out: list[FloorViolation] = []
        iso = spec.isolation
        if step_matches(spec.name, self.isolated_steps) and iso.mode not in ("sandbox", "pod"):
            out.append(FloorViolation(
                "isolated", f"{at}.isolation.mode",
                f"step {spec.name!r} runs in isolation mode {iso.mode!r} "
                "(the floor needs sandbox or pod)"))
        if step_matches(spec.name, self.no_egress_steps) and (
                iso.network != "none" or iso.unsafe_host_network):
            shown = "host network" if iso.unsafe_host_network else f"egress to {iso.network!r}"
            out.append(FloorViolation(
                "no-egress", f"{at}.isolation.network",
                f"step {spec.name!r} has {shown} (the floor allows no network egress)"))
        if self.signature_policy is not None:
            for o in spec.outputs:
                if o.publish is not None and spec.signing is None:
                    out.append(FloorViolation(
                        "signed", f"{at}.outputs.{o.name}.publish",
                        f"output {o.name!r} is published unsigned (the floor needs every "
                        f"published model signed under policy {self.signature_policy!r})"))
        if self.max_credential_ttl_s is not None and spec.credentials:
            ttl = spec.deadline_s + ttl_margin_s
            if ttl > self.max_credential_ttl_s:
                out.append(FloorViolation(
                    "credential-ttl", f"{at}.deadline_s",
                    f"step {spec.name!r} asks for credentials for {ttl:g} s (deadline "
                    f"{spec.deadline_s:g} s + margin {ttl_margin_s:g} s; the floor allows "
                    f"{self.max_credential_ttl_s:g} s)"))
        if self.inputs_verified:
            for i in spec.inputs:
                if i.unsafe_unverified:
                    out.append(FloorViolation(
                        "inputs-verified", f"{at}.inputs.{i.name}.unsafe_unverified",
                        f"input {i.name!r} is used unverified (the floor needs every input "
                        "verified)"))
        return out

    def gate_violations(self, policy: str | None, subject: str) -> list[FloorViolation]:
        """A breach when a verification gate does not use the floor's signature policy."""
        if self.signature_policy is None or policy == self.signature_policy:
            return []
        return [FloorViolation(
            "signed", subject,
            f"the gate verifies under policy {policy!r} (the floor needs "
            f"{self.signature_policy!r})")]

    def enforce(self, spec: StepSpec, *, ttl_margin_s: float = DEFAULT_TTL_MARGIN_S) -> None:
        """Raise :class:`~stepguard.errors.PolicyViolation` naming the first rule ``spec``
        breaches (every breach is listed in its details)."""
        raise_violations(self.violations(spec, ttl_margin_s=ttl_margin_s))


def raise_violations(found: Iterable[FloorViolation]) -> None:
    """Raise one :class:`~stepguard.errors.PolicyViolation` for ``found`` (nothing if empty).

    ``str()`` of the error is the first breach: its rule, what is wrong and the field.
    """
    items = list(found)
    if not items:
        return
    first = items[0]
    raise PolicyViolation(
        f"floor rule {first.rule!r} violated: {first.message}", subject=first.subject,
        details=[str(v) for v in items],
        hint="the organisation's floor cannot be weakened by a pipeline; ask the platform "
             "team to change the floor if this is intended")
