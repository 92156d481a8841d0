"""``python -m tl_tensorlens``: the ``tl-tensorlens`` command line."""

import sys

from tl_tensorlens.cli import main

if __name__ == "__main__":
    sys.exit(main())
