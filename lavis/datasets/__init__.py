"""Datasets: builders (one per annotation format), streams, collators, loaders, the shard writer, the
synthetic world. May import :mod:`lavis.tracking`, :mod:`lavis.processors` and :mod:`lavis.common` only (never models).
"""

from lavis.datasets import builders  # noqa: F401  (registers the builders)
