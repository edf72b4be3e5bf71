"""``python -m scdlcore`` is the ``scdl`` command (used by the Slicer module to start child processes)."""

import sys

from scdlcore.cli import main

sys.exit(main())
