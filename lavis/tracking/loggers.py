"""Experiment loggers (registry kind ``logger``): Weights & Biases and TensorBoard.

Each registered logger has a block ``run.<name>`` (its typed settings in :mod:`lavis.common.config`,
its defaults in ``configs/loggers/<name>.yaml``) that turns it on: ``run.wandb.project``,
``run.tensorboard.log_dir``. The runner builds the enabled ones on the main process only; its
:class:`~lavis.tracking.logging.MetricsWriter` sends them the numbers of every ``metrics.jsonl`` record
and each evaluation's results table and sample predictions. ``evaluate.py`` logs its evaluation the same way.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lavis.common.config import Config, TensorBoardConfig, WandbConfig
from lavis.common.registry import registry
from lavis.processors.image import load_image
from lavis.tracking.tables import SAMPLE_COLUMNS, TABLE_COLUMNS, markdown_table

SAMPLE_IMAGE_SIZE = 512  # longest side of a logged sample image


class Logger:
    """The interface of a registered logger; built as ``cls(settings, cfg, output_dir, resume_step)``.

    ``rows`` of :meth:`log_evaluation` are the results table's (:data:`TABLE_COLUMNS`), ``samples``
    the first predictions of each evaluation by its name (:data:`SAMPLE_COLUMNS`; ``image`` a path or None).
    """

    def log_metrics(self, record: dict[str, float | int], step: int) -> None:
        """The numbers of a metrics record (``loss``, ``lr``, ``eval/<name>/<metric>``, ...) at ``step``."""
        raise NotImplementedError

    def log_evaluation(self, rows: list[dict[str, Any]], samples: dict[str, list[dict[str, Any]]], step: int) -> None:
        """An evaluation's results table and sample predictions at ``step``."""
        raise NotImplementedError

    def finish(self) -> None:
        """Write out what is buffered and close the run."""
        raise NotImplementedError


def sample_image(path: str) -> Image.Image:
    """A logged sample's image, scaled down to :data:`SAMPLE_IMAGE_SIZE` on its longest side."""
    image = load_image(path)
    image.thumbnail((SAMPLE_IMAGE_SIZE, SAMPLE_IMAGE_SIZE))
    return image


@registry.register("logger", "wandb")
class WandbLogger(Logger):
    """A Weights & Biases run in ``<output_dir>/wandb`` with the resolved config; ``WANDB_MODE=offline``
    writes it locally (``wandb sync`` uploads it later), ``WANDB_MODE=disabled`` turns it off."""

    def __init__(self, settings: WandbConfig, cfg: Config, output_dir: Path, resume_step: int | None = None) -> None:
        import wandb  # slow to import: only when the run logs to W&B

        self.wandb = wandb
        output_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=settings.project, entity=settings.entity, name=settings.name, tags=list(settings.tags) or None,
            config=cfg.raw, dir=str(output_dir), resume="allow",
        )

    def log_metrics(self, record: dict[str, float | int], step: int) -> None:
        self.run.log(record, step=step)

    def log_evaluation(self, rows: list[dict[str, Any]], samples: dict[str, list[dict[str, Any]]], step: int) -> None:
        logged = {"eval/results": self.wandb.Table(columns=list(TABLE_COLUMNS), data=[[row[c] for c in TABLE_COLUMNS] for row in rows])}
        for name, entries in samples.items():
            cells = [{**entry, "image": self.wandb.Image(sample_image(entry["image"])) if entry["image"] else None} for entry in entries]
            logged[f"eval/samples/{name}"] = self.wandb.Table(
                columns=list(SAMPLE_COLUMNS), data=[[row[c] for c in SAMPLE_COLUMNS] for row in cells]
            )
        self.run.log(logged, step=step)

    def finish(self) -> None:
        self.run.finish()


@registry.register("logger", "tensorboard")
class TensorBoardLogger(Logger):
    """TensorBoard event files in ``run.tensorboard.log_dir``: metrics as scalars, the config and each
    evaluation's tables as Markdown text, the sample images as images."""

    def __init__(self, settings: TensorBoardConfig, cfg: Config, output_dir: Path, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = output_dir / settings.log_dir
        self.resume_step = resume_step
        # A resumed run's events replace those the interrupted run wrote after its last checkpoint
        # (as in metrics.jsonl): TensorBoard drops the earlier events from purge_step on.
        self.writer = SummaryWriter(str(self.log_dir), purge_step=None if resume_step is None else resume_step + 1)
        self.writer.add_text("config", textwrap.indent(cfg.to_yaml(), "    "), global_step=resume_step or 0)

    def log_metrics(self, record: dict[str, float | int], step: int) -> None:
        if self.resume_step is not None and step <= self.resume_step:
            return  # a resumed run replays metrics.jsonl up to its checkpoint: these events are on disk already
        for key, value in record.items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_evaluation(self, rows: list[dict[str, Any]], samples: dict[str, list[dict[str, Any]]], step: int) -> None:
        self.writer.add_text("eval/results", markdown_table(rows), global_step=step)
        for name, entries in samples.items():
            self.writer.add_text(f"eval/samples/{name}", markdown_table(entries, SAMPLE_COLUMNS), global_step=step)
            for index, entry in enumerate(entries):
                if entry["image"]:
                    pixels = np.asarray(sample_image(entry["image"]))
                    self.writer.add_image(f"eval/samples/{name}/{index}", pixels, global_step=step, dataformats="HWC")
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


def build_loggers(cfg: Config, output_dir: Path, resume_step: int | None = None) -> list[Logger]:
    """The registered loggers whose ``run.<name>`` block turns them on (call on the main process only).
    ``resume_step``: the step a resumed run continues from (None: a new run)."""
    return [
        registry.get("logger", name)(getattr(cfg.run, name), cfg, Path(output_dir), resume_step)
        for name in registry.list("logger")
        if getattr(cfg.run, name).enabled
    ]
