"""``python -m lavis.convert``: Qwen-VL's released checkpoints in and out (the command; the code is :mod:`lavis.interop.convert`)."""

import sys

from lavis.interop.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
