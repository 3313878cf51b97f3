"""``stepguard credentials check``: issue and revoke a step's credentials, print only records.

Lets an operator prove a spec's Vault setup (auth, policies, roles, revocation) before a
pipeline depends on it. No value is ever printed.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``credentials`` command group."""
    group = sub.add_parser("credentials", help="check a step's just-in-time Vault credentials",
                           description="Issue and revoke a step's credentials; no value printed.")
    actions = group.add_subparsers(dest="credentials_command", metavar="{check}")
    actions.required = True
    check = actions.add_parser(
        "check", help="issue every credential of a step spec, revoke them, report (no values)")
    check.add_argument("--spec", required=True, help="step spec (YAML or JSON)")
    check.add_argument("--settings", default=None,
                       help="settings file (default: $STEPGUARD_CONFIG or ./stepguard.yaml)")
    check.add_argument("--ttl", type=float, default=120.0,
                       help="TTL of the check's child token in seconds (default 120)")
    check.add_argument("--json", action="store_true", help="print the records as JSON")
    check.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    from stepguard.credentials import open_session
    from stepguard.errors import CredentialError
    from stepguard.settings import Settings
    from stepguard.spec import RunContext, StepSpec
    from stepguard.wiring import vault_config

    spec = StepSpec.from_file(args.spec)
    settings = Settings.load(args.settings) if args.settings else Settings.load()
    ctx = RunContext(pipeline="credentials-check", step=spec.name, orchestrator="cli")
    with open_session(spec.credentials, settings=vault_config(settings), context=ctx,
                      ttl_s=args.ttl, policies=spec.policies, handle_sigterm=True) as session:
        issued = [r.to_dict() for r in session.leases]
    records = [r.to_dict() for r in session.leases]
    token = session.token.to_dict() if session.token else None
    ok = session.revocation_ok
    if args.json:
        json.dump({"step": spec.name, "issued": len(issued), "credentials": records,
                   "token": token, "revocation_ok": ok}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for r in records:
            state = ("revoked" if r["revoked"] else "NOT REVOKED") if r["revocable"] else (
                "static" if r["static"] else "expires only")
            print(f"{r['name']:<20} {r['kind']:<17} ttl {r['ttl_s']:>6}s  {state}"
                  f"  lease {r['lease_id_hash'] or '-'}")
        if token:
            print(f"{'step token':<20} policies {','.join(token['policies'])}  "
                  f"{'revoked' if token['revoked'] else 'NOT REVOKED'}")
    if not ok:
        raise CredentialError("some credentials were not revoked", subject=spec.name,
                              details=[f"{r['name']}: {r['error'] or 'not revoked'}"
                                       for r in records if r["revocable"] and not r["revoked"]])
    return 0
