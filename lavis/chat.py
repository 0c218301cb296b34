"""``python -m lavis.chat``: chat in the terminal (the command; the code is :mod:`lavis.serving.terminal`)."""

import sys

from lavis.serving.terminal import main

if __name__ == "__main__":
    sys.exit(main())
