"""``python -m lavis.export``: a checkpoint as one self-contained model (the command; the code is :mod:`lavis.interop.export`)."""

import sys

from lavis.interop.export import main

if __name__ == "__main__":
    sys.exit(main())
