"""`python -m argen.cli` (what torchrun launches)."""

import sys

from argen.cli import main

sys.exit(main())
