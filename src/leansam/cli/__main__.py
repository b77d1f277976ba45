"""``python -m leansam.cli`` (and ``torchrun ... -m leansam.cli``): the ``leansam`` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
