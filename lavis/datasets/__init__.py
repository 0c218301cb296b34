"""Datasets: builders (one per annotation format), collators, samplers."""

from lavis.datasets import builders  # noqa: F401  (registers the builders)
