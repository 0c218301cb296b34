"""Shared plumbing that knows no model or data: config, registry, checkpoints, distributed set-up,
optimiser, precision, output directories, resources. The bottom layer: imports only :mod:`lavis.common`.
"""
