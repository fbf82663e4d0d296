"""``python -m ferflow STAGE ...``: the ``ferflow`` command (:func:`ferflow.cli.main`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
