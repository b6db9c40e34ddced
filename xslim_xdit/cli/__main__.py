"""``python -m xslim_xdit.cli``: the ``xslim-xdit`` console script."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
