"""What the runner asks of every training task beyond building its data and taking a step: the hooks, with the
next-token tasks' answers as defaults, so a task (or a test's stand-in) overrides only what it changes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lavis.processors.conversation import IGNORE_INDEX


class TrainingTask:
    """The runner's hooks of a training task (``sample_processor``, ``collator``, ``build_sources`` and
    ``train_step`` are each task's own)."""

    def setup(self, model: nn.Module, place: Callable[[nn.Module], nn.Module]) -> None:
        """Called by the runner before ``model`` is wrapped (``place``: put a frozen module beside it as the
        strategy places the model). Nothing to keep for next-token tasks."""

    def before_training(self, runner: Any) -> None:
        """Called by the runner before the first step and before a checkpoint is loaded (the starting weights)."""

    def loss_count(self, batch: dict[str, Any]) -> int:
        """What the runner normalises the summed loss by, over the whole step: the supervised tokens."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
