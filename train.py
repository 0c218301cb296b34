"""Train a vision-language model: ``python train.py --cfg-path PROJECT [--options k=v ...]`` (also ``lavis-train``).

The command lives in :mod:`lavis.cli.train`; this file keeps the documented command working in a checkout.
"""

import sys

from lavis.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
