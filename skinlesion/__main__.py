"""`python -m skinlesion` is the `skinlesion` command (and what `accelerate launch -m` runs)."""

import sys

from skinlesion.cli import main

sys.exit(main())
