"""``python -m xattn_lightning``: the command-line interface (:mod:`xattn_lightning.cli`)."""

import sys

from xattn_lightning.cli import main

sys.exit(main())
