"""``python -m zdcp``: the same as the ``zdcp`` command."""

import sys

from .cli import main

sys.exit(main())
