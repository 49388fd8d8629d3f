"""``python -m tasklocks``: the command line (see :mod:`tasklocks.cli`)."""

import sys

from tasklocks.cli import main

if __name__ == "__main__":
    sys.exit(main())
