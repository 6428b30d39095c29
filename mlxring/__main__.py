"""`python -m mlxring` runs the command line."""

import sys

from mlxring.cli import main

sys.exit(main())
