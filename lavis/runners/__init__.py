"""Runners: the training loop."""

from lavis.runners.iter_runner import IterRunner, build_runner  # noqa: F401  (registers iter_runner)
