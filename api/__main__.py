"""`python -m api` is the `sandboxd` command, for a checkout without the console script."""

import sys

from api.cli import main

sys.exit(main())
