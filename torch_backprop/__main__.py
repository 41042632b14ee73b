"""``python -m torch_backprop``: the same as the ``torch-backprop`` command."""

import sys

from .cli import main

sys.exit(main())
