"""``python -m ermoe ...`` (and ``torchrun --nproc_per_node=N -m ermoe train ...``): the ``ermoe`` command."""

import sys

from .cli import main

sys.exit(main())
