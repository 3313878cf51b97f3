"""``python -m stepguard.cli``: the same as the ``stepguard`` command."""

import sys

from stepguard.cli import main

sys.exit(main())
