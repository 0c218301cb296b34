"""Evaluate a trained model: ``python evaluate.py --cfg-path PROJECT [--options k=v ...]`` (also ``lavis-evaluate``).

The command lives in :mod:`lavis.cli.evaluate`; this file keeps the documented command working in a checkout.
"""

import sys

from lavis.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
