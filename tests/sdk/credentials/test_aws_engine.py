"""Vault's AWS secrets engine (``iam_user`` and the STS types).

HashiCorp Vault's AWS engine cannot run here (OpenBao ships it only as an external plugin), so
these tests check our request shapes against a small local HTTP server replaying the responses
documented for ``GET /aws/creds/:name`` and ``POST /aws/sts/:name``, and standing in for STS
``GetCallerIdentity`` (refusing fresh keys twice, as IAM's eventual consistency does).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stepguard.credentials import TokenAuth, VaultConfig, open_session
from stepguard.errors import TransientCredentialError
from stepguard.spec import CredentialRequest, RunContext

TOKEN = "hvs.replay-step-token"

IAM_USER = {
    "request_id": "r1", "lease_id": "aws/creds/deploy/0d042c53-aa8a-7ce7-9dfd-310351c465e5",
    "renewable": True, "lease_duration": 3600,
    "data": {"access_key": "AKIAIOSFODNN7EXAMPLE",
             "secret_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
             "security_token": None},
}
STS = {
    "request_id": "r2", "lease_id": "aws/sts/deploy/31d771a6-fb39-f46b-fdc5-945109106422",
    "renewable": False, "lease_duration": 3600,
    "data": {"access_key": "ASIAJELUVRSJ2EXAMPLE", "secret_key": "sts-secret-EXAMPLE/abc",
             "session_token": "FwoGZXIvYXdzEXAMPLE//session", "ttl": 3599,
             "arn": "arn:aws:sts::123456789012:assumed-role/deploy/sg.run.step.1"},
}
CALLER_OK = (b'<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
             b"<GetCallerIdentityResult><Arn>arn:aws:iam::123456789012:user/vault-deploy</Arn>"
             b"<UserId>AIDAEXAMPLE</UserId><Account>123456789012</Account>"
             b"</GetCallerIdentityResult><ResponseMetadata><RequestId>x</RequestId>"
             b"</ResponseMetadata></GetCallerIdentityResponse>")
CALLER_DENIED = (b'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error>'
                 b"<Type>Sender</Type><Code>InvalidClientTokenId</Code><Message>The security "
                 b"token included in the request is invalid.</Message></Error>"
                 b"<RequestId>x</RequestId></ErrorResponse>")


class Replay:
    def __init__(self, iam_refusals: int = 2) -> None:
        self.calls: list[tuple[str, str, dict, dict]] = []
        self.iam_refusals = iam_refusals
        self.sts_calls = 0
        replay = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, status, body, ctype="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _do(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                if path == "/":  # STS, form-encoded
                    form = dict(urllib.parse.parse_qsl(raw.decode()))
                    replay.calls.append((self.command, "sts", form, dict(self.headers)))
                    replay.sts_calls += 1
                    if replay.sts_calls <= replay.iam_refusals:
                        return self._reply(403, CALLER_DENIED, "text/xml")
                    return self._reply(200, CALLER_OK, "text/xml")
                body = json.loads(raw) if raw else {}
                replay.calls.append((self.command, path, body, dict(self.headers)))
                if self.headers.get("X-Vault-Token") != TOKEN:
                    return self._reply(403, b'{"errors":["permission denied"]}')
                if path == "/v1/auth/token/lookup-self":
                    return self._reply(200, json.dumps({"data": {
                        "accessor": "acc", "ttl": 3600, "renewable": True,
                        "policies": ["default"]}}).encode())
                if path == "/v1/aws/creds/deploy" and self.command == "GET":
                    return self._reply(200, json.dumps(IAM_USER).encode())
                if path == "/v1/aws/sts/deploy" and self.command in ("POST", "PUT"):
                    return self._reply(200, json.dumps(STS).encode())
                if path == "/v1/sys/leases/revoke" and self.command == "PUT":
                    self.send_response(204)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return self._reply(404, b'{"errors":[]}')

            do_GET = do_POST = do_PUT = _do

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def replay():
    r = Replay()
    yield r
    r.close()


def _cfg(replay, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auth = TokenAuth(TOKEN)
    return VaultConfig(addr=replay.url, auth=auth, child_token=False, sts_endpoint=replay.url,
                       **kw)


def test_iam_user_waits_until_keys_work_and_is_revoked(replay):
    req = CredentialRequest(name="deploy", kind="aws_iam", role="deploy", env_prefix="")
    t0 = time.monotonic()
    with open_session([req], settings=_cfg(replay), context=RunContext(), ttl_s=600) as s:
        # Two refusals from "IAM", then the keys work: only then does the body start.
        assert replay.sts_calls == 3
        env = s.env()
        assert env["AWS_ACCESS_KEY_ID"] == "AKIAIOSFODNN7EXAMPLE"
        assert "AWS_SESSION_TOKEN" not in env
    assert time.monotonic() - t0 < 10
    method, path, _, headers = replay.calls[1]
    assert (method, path) == ("GET", "/v1/aws/creds/deploy")
    assert headers["X-Vault-Token"] == TOKEN and headers.get("X-Vault-Request") == "true"
    sts_form = [c[2] for c in replay.calls if c[1] == "sts"][0]
    assert sts_form["Action"] == "GetCallerIdentity"
    revoke = [c for c in replay.calls if c[1] == "/v1/sys/leases/revoke"]
    assert revoke and revoke[0][2] == {"lease_id": IAM_USER["lease_id"]}
    rec = s.leases[0]
    assert rec.revocable and rec.revoked and rec.revoked_by == "lease"


def test_iam_user_keys_never_usable_is_bounded(replay):
    replay.iam_refusals = 10**6
    req = CredentialRequest(name="deploy", kind="aws_iam", role="deploy",
                            params={"propagation_timeout_s": "2"})
    t0 = time.monotonic()
    with pytest.raises(TransientCredentialError, match="did not become usable"):
        with open_session([req], settings=_cfg(replay), context=RunContext(), ttl_s=600):
            pass
    assert time.monotonic() - t0 < 6
    # The issued IAM user is not left behind.
    assert [c for c in replay.calls if c[1] == "/v1/sys/leases/revoke"]


def test_sts_request_shape_and_not_revocable(replay):
    req = CredentialRequest(name="deploy", kind="aws_sts", role="deploy",
                            params={"role_arn": "arn:aws:iam::123456789012:role/deploy"})
    ctx = RunContext(pipeline="p", run_id="manual__7", step="publish", try_number=3)
    with open_session([req], settings=_cfg(replay), context=ctx, ttl_s=1200) as s:
        assert s.values["deploy"].reveal("aws_session_token").startswith("FwoG")
        assert s.env()["DEPLOY_AWS_SESSION_TOKEN"]
    method, path, body, _ = [c for c in replay.calls if c[1].startswith("/v1/aws/")][0]
    assert (method, path) == ("POST", "/v1/aws/sts/deploy")
    assert body == {"ttl": "1200s", "role_arn": "arn:aws:iam::123456789012:role/deploy",
                    "role_session_name": "sg.manual__7.publish.3"}
    rec = s.leases[0]
    assert not rec.revocable and not rec.revoked
    # STS credentials only expire: nothing pretends to revoke them.
    assert not [c for c in replay.calls if c[1] == "/v1/sys/leases/revoke"]
