"""Importing the dev stack package stays light: heavy clients load only when a stack starts."""

from __future__ import annotations

import subprocess
import sys


def test_import_loads_no_heavy_dependency() -> None:
    code = (
        "import sys, stepguard.testing.devstack, stepguard.testing.devstack._cli; "
        "heavy = ('boto3', 'botocore', 'hvac', 'psycopg2', 'moto', 'jwt', 'requests'); "
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
