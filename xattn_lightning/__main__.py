import sys

from xattn_lightning.cli import main

sys.exit(main())
