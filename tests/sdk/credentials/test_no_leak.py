"""Secret values never leak: a canary issued through a full session is searched for as-is,
upper-cased, lower-cased, base64 and URL-encoded in logs, stdout/stderr, exceptions, reprs,
records and pickles -- and found nowhere. Plus the masker registration of derived forms."""

from __future__ import annotations

import base64
import copy
import json
import logging
import pickle
import sys
import traceback
import urllib.parse

import pytest

from stepguard.credentials import (
    SecretMapping,
    SecretStr,
    derived_forms,
    open_session,
    register_secret,
    unwrap_delivery,
    wrap_for_delivery,
)
from stepguard.errors import CredentialDenied
from stepguard.spec import CredentialRequest, RunContext

CANARY = "Canary+Secret/9f3e=ZZ"


def forms(value: str) -> list[str]:
    raw = value.encode()
    return [value, value.upper(), value.lower(), base64.b64encode(raw).decode(),
            base64.b64encode(raw).decode().rstrip("="), base64.urlsafe_b64encode(raw).decode(),
            urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)]


def assert_absent(values: list[str], *haystacks: str) -> None:
    for hay in haystacks:
        for v in values:
            for f in forms(v):
                assert f not in hay, "secret form found"


def test_secretstr_and_mapping_never_print():
    s = SecretStr(CANARY)
    m = SecretMapping({"password": CANARY})
    outs = [repr(s), str(s), f"{s}", f"{s!r}", f"{s:>40}", "%s %r" % (s, s),  # noqa: UP031
            repr(m), str(m), repr(dict(m)), repr(list(m.values())), str([s]),
            repr(copy.deepcopy(m)), json.dumps({"p": str(s)})]
    assert_absent([CANARY], *outs)
    for obj in (s, m):
        with pytest.raises(TypeError):
            pickle.dumps(obj)
    with pytest.raises(AttributeError):
        s._value = "x"  # type: ignore[misc]
    assert s.get_secret_value() == CANARY and m.reveal("password") == CANARY
    assert s == SecretStr(CANARY) and s != SecretStr("other")


def test_derived_forms_cover_the_masker_gaps():
    got = derived_forms(CANARY)
    for f in forms(CANARY):
        assert f in got
    assert derived_forms("abc") == set()  # too short to mask without redacting other text


@pytest.mark.services
def test_canary_found_nowhere_after_a_full_session(vault_cfg, vault_client, caplog, capfd,
                                                   tmp_path):
    caplog.set_level(logging.DEBUG)
    vault_client.secrets.kv.v2.create_or_update_secret(
        path="stepguard/canary", secret={"token": CANARY}, mount_point="secret")
    reqs = [CredentialRequest(name="canary", kind="kv", path="stepguard/canary"),
            CredentialRequest(name="db", kind="database", role="stepguard-step",
                              delivery="file")]
    errors: list[BaseException] = []
    texts: list[str] = []
    try:
        with open_session(reqs, settings=vault_cfg, context=RunContext(step="leak"),
                          ttl_s=60) as s:
            issued = [CANARY, s.values["db"].reveal("password"), s._step_token]
            wrapped = wrap_for_delivery(s)
            issued.append(wrapped.token.get_secret_value())
            got = unwrap_delivery(wrapped.token, settings=vault_cfg)
            try:
                unwrap_delivery(wrapped.token, settings=vault_cfg)
            except CredentialDenied as exc:
                errors.append(exc)
            s.write_files(tmp_path / "f")
            texts += [repr(s), str(s), repr(s.values), repr(dict(s.values)), repr(got),
                      repr(got.values), repr(wrapped), repr(s.token), repr(s.leases),
                      json.dumps([r.to_dict() for r in s.leases]), json.dumps(s.token.to_dict()),
                      repr(vault_cfg), repr(s.timings)]
            logging.getLogger("stepguard.test").info("values: %s %r", s.values["canary"],
                                                     s.values)
            raise RuntimeError(f"body failed with {s.values['canary']['token']}")
    except RuntimeError as exc:
        errors.append(exc)
    texts += [repr(s.leases), json.dumps([r.to_dict() for r in s.leases])]
    for exc in errors:
        texts += [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
        if hasattr(exc, "diagnostics"):
            texts.append(exc.diagnostics())
    out, err = capfd.readouterr()
    texts += [caplog.text, out, err]
    assert caplog.records, "the session logged nothing: the log check would be vacuous"
    assert len(issued) == 4 and all(issued)
    assert_absent(issued, *texts)
    # The lease ids are secrets too (they allow lease lookup): only hashes appear.
    assert_absent([i.lease_id for i in s._issued if i.lease_id], *texts)


@pytest.mark.airflow
@pytest.mark.slow
def test_values_and_derived_forms_reach_airflow_masker(monkeypatch):
    pytest.importorskip("airflow.sdk")
    import airflow.sdk.log  # noqa: F401  (loaded as in a running task)
    from airflow.sdk._shared.secrets_masker import _secrets_masker, redact

    value = "af-canary-Secret/42+x"
    assert "airflow.sdk" in sys.modules
    assert register_secret(value) >= 5
    masker = _secrets_masker()
    for f in forms(value):
        assert redact(f"line {f} end") == "line *** end", f
    assert masker.patterns
