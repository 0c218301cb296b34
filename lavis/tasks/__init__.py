"""Tasks: what a training step means and which data it reads."""

from lavis.tasks import sft  # noqa: F401  (registers sft)
