"""``python -m cervl.cli`` (e.g. under torchrun)."""

import sys

from cervl.cli import main

sys.exit(main())
