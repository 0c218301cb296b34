"""``python -m lavis.serve``: the OpenAI-compatible API (the command; the code is :mod:`lavis.serving.api`)."""

import sys

from lavis.serving.api.app import main

if __name__ == "__main__":
    sys.exit(main())
