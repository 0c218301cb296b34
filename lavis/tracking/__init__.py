"""Tracking a run: logging set-up, ``metrics.jsonl`` and ``skipped.jsonl``, the experiment loggers
(W&B, TensorBoard), the results tables and plots. Imports :mod:`lavis.common` and :mod:`lavis.processors` only.
"""
