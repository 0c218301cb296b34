"""``python -m lavis.plot``: loss and lr curves of a run (the command; the code is :mod:`lavis.tracking.plots`)."""

import sys

from lavis.tracking.plots import main

if __name__ == "__main__":
    sys.exit(main())
