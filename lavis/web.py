"""``python -m lavis.web``: the web chat demo (the command; the code is :mod:`lavis.serving.web`)."""

import sys

from lavis.serving.web import main

if __name__ == "__main__":
    sys.exit(main())
