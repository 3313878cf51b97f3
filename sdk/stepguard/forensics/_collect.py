"""Building a :class:`~stepguard.forensics.Trace`: from a model, a run or a receipt back to the
data, through receipts, the registry and the audit trail.

The walk: the model's registry record (signature bundle, provenance) names the run and the
digest of what was published; the publishing receipt is the one whose output was published as
that name and version. From there every input is followed to the receipt of the step that
produced it -- the receipt its input record names when that is still readable (a path or an
``s3://`` URI, or ``<location>/receipt.json`` beside an object-store input), else the receipt,
among those found, whose output has the input's digest. Steps of the same run after publishing
(the gate, the deployment) are included. Each step's checks come from its audit records (verdict
events under its step span) when the trail holds them, else from its receipt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from stepguard.errors import EvidenceNotFound, StepguardError
from stepguard.forensics._evidence import (
    BUNDLE_NAME,
    PROVENANCE_NAME,
    Found,
    Store,
    load_receipts,
    parse_head,
    payload,
    read_receipt,
    registry_version,
    verify_log,
    verify_stored_segments,
)
from stepguard.forensics._model import (
    Artifact,
    Check,
    Credential,
    CredentialState,
    Gate,
    Model,
    Segment,
    Signature,
    Source,
    Stage,
    Step,
    Trace,
    Verdict,
)
from stepguard.receipt import LeaseRecord, Receipt

_STEP_SPAN = "stepguard.step"
_VERDICT = "stepguard.verdict"
_NR = "not recorded"


def parse_model(value: str) -> tuple[str, str] | None:
    """``name@version`` -> (name, version); None for anything else.

    >>> parse_model("churn-model@20260101T000000"), parse_model("receipt.json")
    (('churn-model', '20260101T000000'), None)
    """
    name, sep, version = value.partition("@")
    if not sep or not name or not version or "/" in value or value.endswith(".json"):
        return None
    return name, version


def collect(*, model: tuple[str, str] | None = None, registry: str | None = None,
            run_id: str | None = None, receipt: str | None = None,
            receipts: Sequence[str] = (), audit_logs: Sequence[str] = (),
            store: Store | None = None, now: datetime | None = None,
            check_receipt: Callable[[Receipt], object] | None = None) -> Trace:
    """The trace of a model (``model`` in ``registry``), a run (``run_id``) or a ``receipt``
    (path or ``s3://`` URI), from the receipts under ``receipts`` (directories or ``s3://``
    prefixes) and the local audit logs ``audit_logs``; audit segments the receipts name are read
    from where they name. ``check_receipt`` verifies a receipt's signature (raising
    :class:`~stepguard.errors.SignatureError`). :class:`~stepguard.errors.EvidenceNotFound`
    when what was named is not there."""
    store = store or Store()
    pool = _Pool(store)
    anchor: Found | None = None
    subject = ""
    model_rec: Model | None = None
    signature: Signature | None = None
    source = Source()
    if receipt is not None:
        anchor = read_receipt(store, receipt)
        pool.add(anchor)
        subject = f"receipt {receipt}"
    pool.load(receipts)
    if model is not None:
        subject = f"model {model[0]}@{model[1]}"
        model_rec, signature, source, prov_run = _registry(store, registry, *model)
        anchor = pool.publisher(*model, model_rec.digest) or anchor
        run_id = run_id or (anchor.receipt.context.run_id if anchor else prov_run)
    if run_id is not None and not subject:
        subject = f"run {run_id}"
    if anchor is not None and run_id is None:
        run_id = anchor.receipt.context.run_id
    if run_id is None:
        raise EvidenceNotFound("nothing to trace: give a model, a run id or a receipt",
                               subject="trace")
    chosen = pool.walk(run_id, anchor)
    if not chosen:
        raise EvidenceNotFound("no receipts of this run were found", subject=run_id,
                               details=[f"searched: {w}" for w in receipts] or
                               ["searched: nowhere (give --receipts)"],
                               hint="give the state dir or the s3:// prefix holding them")
    if model_rec is None:
        published = [(f, o.published) for f in chosen for o in f.receipt.outputs
                     if o.published is not None]
        if published:
            found, pub = published[-1]
            assert pub is not None
            model_rec = Model(pub.name, pub.version, pub.registry,
                              found.receipt.output(_out_name(found.receipt)).digest, pub.uri)
            _m, signature, source, _r = _registry(store, pub.registry, pub.name, pub.version,
                                                  missing_ok=True)
    heads = {f.receipt.step: h for f in chosen if (h := parse_head(f.receipt.audit_head))}
    audit, records, problems = _audit(store, chosen, audit_logs, heads)
    spans = _Spans(records)
    steps = [_step(f, spans, now or datetime.now(UTC)) for f in chosen]
    if check_receipt is not None:
        steps = [_checked(s, f, check_receipt, problems) for s, f in zip(steps, chosen,
                                                                          strict=True)]
    focus = model_rec.digest if model_rec else next(  # no model: what the receipt wrote
        (o.digest for o in anchor.receipt.outputs), None) if anchor else None
    steps = _stages(steps, focus)
    signature = _signature(signature, chosen, model_rec)
    if signature is not None and signature.bundle_matches is False:
        problems.append("the registry's signature bundle is not the one the publishing "
                        "receipt names")
    gate = _gate(steps, model_rec)
    source = _source(source, chosen, steps)
    run_ids = tuple(dict.fromkeys(s.run_id for s in steps))
    trace = Trace(subject=subject, run_ids=run_ids, steps=tuple(steps), model=model_rec,
                  signature=signature, gate=gate, source=source, audit=tuple(audit),
                  problems=tuple(problems), unsecured=tuple(spans.unsecured(run_ids)))
    return replace(trace, chain=_chain(trace))


def _out_name(r: Receipt) -> str:
    return next(o.name for o in r.outputs if o.published is not None)


class _Pool:
    """Receipts found, by digest of what they wrote."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.found: dict[str, Found] = {}

    def add(self, found: Found) -> None:
        self.found.setdefault(found.receipt.digest, found)

    def load(self, sources: Iterable[str]) -> None:
        for found in load_receipts(self.store, sources):
            self.add(found)

    def publisher(self, name: str, version: str, digest: str | None) -> Found | None:
        for found in self.found.values():
            for out in found.receipt.outputs:
                pub = out.published
                if pub is not None and (pub.name, pub.version) == (name, version) and \
                        found.receipt.status == "succeeded":
                    return found
        return None

    def producer(self, inp: Any, run_id: str) -> Found | None:
        """The receipt of the step that wrote input ``inp``."""
        for where in _named(inp):
            try:
                data = self.store.read(where, "receipt")
            except StepguardError:  # a stale reference is not evidence either way
                data = None
            if data is not None:
                try:
                    found = Found(Receipt.from_json(data), where)
                except StepguardError:  # not a receipt: keep looking
                    continue
                if any(o.digest == inp.digest for o in found.receipt.outputs):
                    self.add(found)
                    return self.found[found.receipt.digest]
        candidates = [f for f in self.found.values() if f.receipt.status == "succeeded" and
                      any(o.digest == inp.digest for o in f.receipt.outputs) and
                      not any(i.digest == inp.digest for i in f.receipt.inputs)]
        candidates.sort(key=lambda f: (f.receipt.context.run_id != run_id,
                                       f.receipt.started_at or ""))
        return candidates[0] if candidates else None

    def walk(self, run_id: str, anchor: Found | None) -> list[Found]:
        """The run's receipts and, upstream, the producers of every input (any run)."""
        chosen = {d: f for d, f in self.found.items() if f.receipt.context.run_id == run_id}
        if anchor is not None:
            chosen[anchor.receipt.digest] = anchor
        todo = list(chosen.values())
        while todo:
            found = todo.pop()
            for inp in found.receipt.inputs:
                if not inp.digest:
                    continue
                prod = self.producer(inp, found.receipt.context.run_id)
                if prod is not None and prod.receipt.digest not in chosen:
                    chosen[prod.receipt.digest] = prod
                    todo.append(prod)
        # One receipt per step run: the object-store copy and the worker's copy are the same.
        return sorted(chosen.values(), key=lambda f: (f.receipt.started_at or "",
                                                      f.receipt.step))


def _named(inp: Any) -> list[str]:
    """Where an input record says its producer's receipt is."""
    out = []
    source = inp.source or ""
    if source.startswith("receipt:"):
        label = source[len("receipt:"):].rsplit("#", 1)[0]
        if label.startswith(("/", "s3://", "file://")):
            out.append(label)
    path = inp.path or ""
    if path.startswith("s3://") and path.rstrip("/").endswith("/data"):
        out.append(path.rstrip("/")[: -len("data")] + "receipt.json")
    return out


def _registry(store: Store, registry: str | None, name: str, version: str, *,
              missing_ok: bool = False) -> tuple[Model, Signature | None, Source, str | None]:
    if not registry:
        raise EvidenceNotFound("no registry given and none in the settings",
                               subject="registry.url", hint="give --registry URL")
    base = registry_version(registry, name, version)
    bundle = store.read(base + BUNDLE_NAME, "signature bundle")
    if bundle is None:
        if missing_ok:
            return Model(name, version, registry, None, base), None, Source(), None
        raise EvidenceNotFound("model version not in the registry (no signature bundle)",
                               subject=f"{name}@{version}",
                               details=[f"looked for {base}{BUNDLE_NAME}"],
                               hint="check the name, the version and --registry")
    statement = payload(bundle) or {}
    own = (statement.get("predicate") or {}).get("stepguard") or {}
    subjects = tuple(f"{k}:{v}" for s in statement.get("subject") or ()
                     for k, v in (s.get("digest") or {}).items())
    hint = ((_json(bundle).get("verificationMaterial") or {}).get("publicKey") or {}).get("hint")
    sig = Signature(signer=None, bundle_uri=base + BUNDLE_NAME, bundle_digest=None,
                    registry_bundle_digest="sha256:" + hashlib.sha256(bundle).hexdigest(),
                    subjects=subjects, key_hint=hint)
    prov_raw = store.read(base + PROVENANCE_NAME, "provenance")
    prov = payload(prov_raw) or {}
    build = (prov.get("predicate") or {}).get("buildDefinition") or {}
    run = (build.get("internalParameters") or {}).get("run_id")
    source = Source(builder=((prov.get("predicate") or {}).get("runDetails") or {}).get(
        "builder", {}).get("id"), invocation=(((prov.get("predicate") or {}).get(
            "runDetails") or {}).get("metadata") or {}).get("invocationId"))
    for dep in build.get("resolvedDependencies") or ():
        digest = dep.get("digest") or {}
        if dep.get("name") == "code":
            source = replace(source, code=digest.get("gitCommit"), code_uri=dep.get("uri"))
        elif dep.get("name") == "image":
            source = replace(source, image=next((f"{k}:{v}" for k, v in digest.items()), None))
    if prov_raw is not None:
        sig = replace(sig, provenance_uri=base + PROVENANCE_NAME)
    model = Model(name, version, registry, own.get("manifest_digest"), base)
    return model, sig, source, str(run) if run else None


def _json(raw: bytes) -> dict[str, Any]:
    import json

    try:
        doc = json.loads(raw)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _signature(sig: Signature | None, chosen: list[Found], model: Model | None) -> \
        Signature | None:
    if model is None:
        return sig
    for found in chosen:
        for out in found.receipt.outputs:
            pub = out.published
            if pub is not None and (pub.name, pub.version) == (model.name, model.version):
                base = sig or Signature(signer=None, bundle_uri=None, bundle_digest=None)
                return replace(base, signer=pub.signer, bundle_digest=pub.bundle_digest,
                               bundle_uri=base.bundle_uri or pub.bundle_uri,
                               provenance_uri=base.provenance_uri or pub.provenance_uri)
    return sig


def _audit(store: Store, chosen: list[Found], logs: Sequence[str],
           heads: Mapping[str, tuple[int, str]]) -> tuple[list[Segment], list[dict[str, Any]],
                                                          list[str]]:
    wanted = {f.receipt.audit_segment: (f.receipt.step, h) for f in chosen
              if f.receipt.audit_segment and (h := parse_head(f.receipt.audit_head))}
    segments, records, problems = verify_stored_segments(store, wanted)
    for path in dict.fromkeys(logs):
        seg, recs = verify_log(path, dict(heads))
        segments.append(seg)
        records += recs
    return segments, records, problems


class _Spans:
    """Span records by step: (run id, step name, try) -> the verdict events under it."""

    def __init__(self, records: Iterable[dict[str, Any]]) -> None:
        spans = [r for r in records if r.get("kind") == "span" or "span_id" in r]
        by_id = {(s.get("trace_id"), s.get("span_id")): s for s in spans}
        self.steps: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
        self.tasks = [s for s in by_id.values() if s.get("name") == "stepguard.task"]
        for span in by_id.values():  # a span in the local log and in a segment counts once
            owner = self._owner(span, by_id)
            if owner is None:
                continue
            attrs = owner.get("attributes") or {}
            key = (str(attrs.get("cicd.pipeline.run.id")), str(
                attrs.get("stepguard.step.name") or attrs.get("stepguard.step")),
                int(attrs.get("stepguard.try_number") or 1))
            self.steps.setdefault(key, []).append(span)

    @staticmethod
    def _owner(span: dict[str, Any], by_id: Mapping[tuple[Any, Any], dict[str, Any]]
               ) -> dict[str, Any] | None:
        cur: dict[str, Any] | None = span
        for _ in range(64):
            if cur is None:
                return None
            if cur.get("name") == _STEP_SPAN:
                return cur
            cur = by_id.get((cur.get("trace_id"), cur.get("parent_span_id")))
        return None

    def checks(self, step: str, run_id: str, try_number: int) -> list[Check]:
        out = []
        for span in sorted(self.steps.get((run_id, step, try_number), []),
                           key=lambda s: s.get("start_ns") or 0):
            control = str(span.get("name", "")).removeprefix("stepguard.")
            attrs = {k: str(v) for k, v in (span.get("attributes") or {}).items()
                     if _signing_key(k)}
            events = span.get("events") or ()
            failed = span.get("status") == "ERROR" and span.get("name") != _STEP_SPAN
            if failed and not any(e.get("name") == _VERDICT for e in events):
                exc = next((e.get("attributes") or {} for e in events
                            if e.get("name") == "exception"), {})
                out.append(Check(step=step, name=control, passed=False, source="audit",
                                 control=control, details={k: _short(v) for k, v in {
                                     "error.type": (span.get("attributes") or {}).get(
                                         "error.type"),
                                     "message": exc.get("exception.message")}.items() if v}))
            for event in events:
                if event.get("name") != _VERDICT:
                    continue
                ea = event.get("attributes") or {}
                details = {k.removeprefix("stepguard.verdict."): _short(v)
                           for k, v in ea.items()
                           if k not in ("stepguard.verdict.name", "stepguard.verdict.passed")}
                details.update({k.removeprefix("stepguard."): _short(v)
                                for k, v in attrs.items()})
                out.append(Check(step=step, name=str(ea.get("stepguard.verdict.name")),
                                 passed=bool(ea.get("stepguard.verdict.passed")),
                                 source="audit", control=control, details=details))
        return out

    def unsecured(self, run_ids: Iterable[str]) -> list[str]:
        """Tasks of these runs whose task span says they ran without stepguard."""
        wanted = set(run_ids)
        return sorted({str(a.get("cicd.pipeline.task.name")) for a in (
            s.get("attributes") or {} for s in self.tasks)
            if a.get("stepguard.secured") is False and
            str(a.get("cicd.pipeline.run.id")) in wanted})

    def has(self, step: str, run_id: str, try_number: int) -> bool:
        return (run_id, step, try_number) in self.steps

    def signing(self, step: str, run_id: str, try_number: int) -> dict[str, str]:
        """Signer, policy and identity attributes any span of the step recorded (the step span
        included), first value per key."""
        out: dict[str, str] = {}
        for span in self.steps.get((run_id, step, try_number), []):
            for key, value in (span.get("attributes") or {}).items():
                if _signing_key(key):
                    out.setdefault(key.removeprefix("stepguard."), _short(value))
        return out


def _signing_key(key: str) -> bool:
    return any(w in key for w in ("signer", "policy", "identity"))


def _short(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _state(rec: LeaseRecord, finished: str | None, now: datetime) -> CredentialState:
    if rec.revoked:
        return "revoked"
    if rec.static:
        return "static"
    if rec.revocable:
        return "unknown"
    if finished and rec.ttl_s:
        try:
            end = datetime.fromisoformat(finished).timestamp() + rec.ttl_s
        except ValueError:
            return "expiring"
        return "expired" if end <= now.timestamp() else "expiring"
    return "expiring"


def _step(found: Found, spans: _Spans, now: datetime) -> Step:
    r = found.receipt
    ctx = r.context
    creds = tuple(Credential(step=r.step, name=c.name, kind=c.kind, lease_hash=c.lease,
                             state=_state(c, r.finished_at, now), revocable=c.revocable,
                             ttl_s=c.ttl_s, revoked_by=c.revoked_by, error=c.error)
                  for c in r.credentials)
    # The step span names the step as the receipt does, or as its context does (a mapped
    # instance: "train.0").
    name = next((n for n in (r.step, ctx.step) if spans.has(n, ctx.run_id, ctx.try_number)),
                None)
    checks = spans.checks(name, ctx.run_id, ctx.try_number) if name else _receipt_checks(r)
    signing = spans.signing(name, ctx.run_id, ctx.try_number) if name else {}
    iso = dict(r.isolation)
    return Step(
        step=r.step, run_id=ctx.run_id, pipeline=ctx.pipeline, try_number=ctx.try_number,
        status=r.status, receipt=found.where, receipt_digest=r.digest,
        receipt_signed=r.signature is not None,
        inputs=tuple(Artifact(i.name, i.digest, i.path, None, i.files, i.bytes, i.verified,
                              i.source) for i in r.inputs),
        outputs=tuple(Artifact(o.name, o.digest, o.path, o.manifest, o.files, o.bytes)
                      for o in r.outputs),
        credentials=creds, checks=tuple(checks), signing=signing, isolation=iso.get("mode"),
        image=iso.get("image_digest") or iso.get("image") or None,
        trace_id=r.trace_id, audit_segment=r.audit_segment, audit_head=r.audit_head,
        started_at=r.started_at, finished_at=r.finished_at,
        error=f"{r.error.type}: {r.error.message}" if r.error else None)


def _checked(step: Step, found: Found, check: Callable[[Receipt], object],
             problems: list[str]) -> Step:
    """``step`` with its receipt's signature verified: True, False (a problem is added), or
    None when it could not be checked (the policy's key out of reach)."""
    from stepguard.errors import SignatureError

    try:
        check(found.receipt)
    except SignatureError as err:
        problems.append(f"receipt of step {step.step} ({found.where}): {err.message}"
                        + "".join(f"; {d}" for d in err.details))
        return replace(step, receipt_verified=False)
    except StepguardError:
        return step
    return replace(step, receipt_verified=True)


def _receipt_checks(r: Receipt) -> list[Check]:
    out = [Check(r.step, "integrity.verified", bool(i.verified), "receipt", "integrity",
                 {"input": i.name, "digest": str(i.digest)}) for i in r.inputs]
    out += [Check(r.step, "integrity.hashed", True, "receipt", "integrity",
                  {"output": o.name, "digest": o.digest}) for o in r.outputs]
    out += [Check(r.step, "credentials.revoked", c.revoked, "receipt", "credentials",
                  {"lease": str(c.lease), "kind": c.kind}) for c in r.credentials
            if c.revocable]
    if r.status != "succeeded":
        out.append(Check(r.step, "step.succeeded", False, "receipt", None,
                         {"error": r.error.type if r.error else "unknown"}))
    return out


def _stages(steps: list[Step], model: str | None) -> list[Step]:
    """Place each step on the drawn chain (see :data:`~stepguard.forensics.STAGES`)."""
    by_out: dict[str | None, list[Step]] = {}
    for s in steps:
        for o in s.outputs:
            by_out.setdefault(o.digest, []).append(s)
    stage: dict[int, str] = {}
    train = next((s for s in steps if any(o.digest == model for o in s.outputs) and
                  not any(i.digest == model for i in s.inputs)), None) if model else None
    data_digests: set[str | None] = set()
    if train is None:  # no model (a run stopped early): the sources and their checks
        for s in steps:
            if not s.inputs and s.outputs:
                stage[id(s)] = "data"
                data_digests.update(o.digest for o in s.outputs)
            elif s.inputs and all(i.digest in data_digests for i in s.inputs) and \
                    not s.outputs:
                stage[id(s)] = "data"
            elif s.status != "succeeded":  # where the run stopped
                stage[id(s)] = "data" if (s.error or "").startswith("IntegrityError") \
                    else "train"
        return [replace(s, stage=stage.get(id(s))) for s in steps]
    stage[id(train)] = "train"
    todo = [train]
    while todo:
        cur = todo.pop()
        for inp in cur.inputs:
            for prod in by_out.get(inp.digest, []):
                if id(prod) not in stage:
                    stage[id(prod)] = "data"
                    data_digests.update(o.digest for o in prod.outputs)
                    todo.append(prod)
    publish_at = ""
    for s in steps:
        if id(s) in stage:
            continue
        if s.inputs and all(i.digest in data_digests for i in s.inputs) and not any(
                o.digest == model for o in s.outputs):
            stage[id(s)] = "data"  # a check of the data (verify_dataset)
        elif any(o.digest == model for o in s.outputs) and any(
                i.digest == model for i in s.inputs) and not publish_at:
            stage[id(s)] = "signature"
            publish_at = s.finished_at or ""
    gate: Step | None = None
    for s in steps:
        if id(s) in stage or (s.started_at or "") < publish_at:
            continue
        if gate is None and not any(i.digest == model for i in s.inputs):
            gate = s
            stage[id(s)] = "gate"
        elif gate is not None:
            stage[id(s)] = "deploy"
    return [replace(s, stage=stage.get(id(s))) for s in steps]


def _gate(steps: list[Step], model: Model | None) -> Gate | None:
    step = next((s for s in steps if s.stage == "gate"), None)
    if step is None:
        return None
    policy = signer = None
    for details in (step.signing, *(c.details for c in step.checks)):
        for key, value in details.items():
            if "policy" in key and policy is None:
                policy = value
            if ("signer" in key or "identity" in key) and signer is None:
                signer = value
    verdict: Verdict = "pass" if step.status == "succeeded" and all(
        c.passed for c in step.checks) else "fail"
    digest = next((o.digest for o in step.outputs), None)
    return Gate(step=step.step, verdict=verdict, policy=policy, signer=signer, digest=digest)


def _source(source: Source, chosen: list[Found], steps: list[Step]) -> Source:
    train = next((s for s in steps if s.stage == "train"), None)
    if train is None:
        return source
    raw = next(f.receipt for f in chosen if f.receipt.digest == train.receipt_digest)
    iso = dict(raw.isolation)
    image = source.image or iso.get("image_digest") or iso.get("image") or None
    return replace(source, image=image)


def _verdict(steps: Iterable[Step]) -> Verdict:
    steps = list(steps)
    if not steps:
        return "not recorded"
    ok = all(s.status == "succeeded" and all(c.passed for c in s.checks) for s in steps)
    return "pass" if ok else "fail"


def _chain(trace: Trace) -> tuple[Stage, ...]:
    def of(kind: str) -> list[Step]:
        return [s for s in trace.steps if s.stage == kind]

    data = trace.data
    model = trace.model
    sig = trace.signature
    out = [
        Stage("data", ", ".join(s.step for s in of("data")) or "data",
              _verdict(of("data")), ", ".join(f"{a.name} {a.digest}" for a in data)),
        Stage("train", ", ".join(s.step for s in of("train")) or "train",
              _verdict(of("train")), ", ".join(f"{s.isolation}" for s in of("train"))),
        Stage("model", f"{model.name}@{model.version}" if model else "model",
              "pass" if model and model.digest else "not recorded",
              model.digest or "" if model else ""),
    ]
    if sig is None:
        out.append(Stage("signature", "signature", "not recorded"))
    else:
        verdict: Verdict = "fail" if sig.bundle_matches is False else \
            "pass" if sig.signer or sig.registry_bundle_digest else "not recorded"
        out.append(Stage("signature", sig.signer or "signer not recorded", verdict,
                         f"bundle {sig.registry_bundle_digest or sig.bundle_digest or _NR}"))
    gate = trace.gate
    out.append(Stage("gate", f"{gate.step}: policy {gate.policy or _NR}", gate.verdict,
                     f"accepted signer {gate.signer or _NR}") if gate
               else Stage("gate", "gate", "not recorded"))
    out.append(Stage("deploy", ", ".join(s.step for s in of("deploy")) or "deploy",
                     _verdict(of("deploy")),
                     ", ".join(o.uri for s in of("deploy") for o in s.outputs)))
    return tuple(out)
