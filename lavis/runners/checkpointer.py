"""The Checkpointer: a run's directory and its checkpoints, written, verified, chosen and restored.

The runner hands it what to keep (weights by name, optimiser, the loop's state and each rank's);
the strategy says how that state is gathered from, or scattered to, the ranks. Everything between,
the files, their layout and checksums, atomic commits, pruning, which checkpoint ``run.resume``
means and whether ``run.output_dir`` may be written, lives here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lavis.common import checkpoint as ckpt
from lavis.common.output_dir import move_aside

log = logging.getLogger(__name__)

BEST_NAME = "best"


class OutputDirInUse(ValueError):
    """``run.output_dir`` holds an earlier run and the config says neither to continue nor to replace it."""


class Checkpointer:
    """Checkpoints of the run in ``output_dir`` (see :mod:`lavis.common.checkpoint` for the layout).

    ``run``: the run's config (``resume``, ``overwrite``, ``keep_last``); ``strategy``: the run's
    :class:`~lavis.runners.strategies.Strategy` (collectives, and how state is gathered or sharded).
    Every method is called by every rank.
    """

    def __init__(self, output_dir: str | Path, run, strategy) -> None:
        self.output_dir = Path(output_dir)
        self.run = run
        self.strategy = strategy

    @property
    def is_main(self) -> bool:
        return self.strategy.is_main

    # ------------------------------------------------------------------ the run's directory

    def earlier_run(self) -> str | None:
        """What of an earlier run ``output_dir`` holds (``None``: nothing)."""
        found = [name for name in (ckpt.CONFIG_NAME, "metrics.jsonl") if (self.output_dir / name).exists()]
        checkpoints = ckpt.list_checkpoints(self.output_dir)
        if checkpoints:
            found.append(f"{len(checkpoints)} checkpoint(s) up to {checkpoints[-1].name}")
        return ", ".join(found) or None

    def resume_path(self) -> Path | None:
        """The checkpoint to continue from: ``run.resume``'s, or with ``auto`` the newest one in
        ``output_dir`` whose files match their recorded checksums (a damaged one is skipped, with a
        warning, for the one before it); ``None`` when there is none."""
        if self.run.resume is None:
            return None
        if self.run.resume != "auto":
            path = Path(self.run.resume)
            if not (path / ckpt.META_NAME).is_file():
                raise ckpt.CheckpointError(
                    f"run.resume {path} is not a complete checkpoint (no {ckpt.META_NAME}); give a directory "
                    f"<output_dir>/checkpoints/step_<n>, or run.resume=auto for the newest one in run.output_dir"
                )
            problems = self.verify(path)
            if problems:
                raise ckpt.CheckpointError(f"run.resume {path} is damaged: {'; '.join(problems[:5])}")
            return path
        for path in reversed(ckpt.list_checkpoints(self.output_dir)):
            problems = self.verify(path)
            if not problems:
                return path
            if self.is_main:
                log.warning("checkpoint %s is damaged (%s): trying the one before it", path, "; ".join(problems[:5]))
        return None

    def claim(self) -> Path | None:
        """Make sure this run may write into ``output_dir``: a run never destroys another's files.
        Returns the checkpoint to continue from, if any; nothing is written yet.

        An earlier run there is continued (``run.resume`` and a checkpoint to continue from), moved
        aside (``run.overwrite``: to ``<output_dir>.old-<time>``, never deleted) or the run is refused,
        naming the ways out; ``run.resume=auto`` with no checkpoint starts afresh only where no earlier
        run is. Rank 0 decides; every rank gets the same answer.
        """
        resume = self.resume_path()
        refusal = None
        if self.is_main and resume is None and (earlier := self.earlier_run()):
            if self.run.overwrite:
                aside = move_aside(self.output_dir)
                log.warning("run.overwrite: the earlier run in %s (%s) was moved to %s", self.output_dir, earlier, aside)
            elif self.run.resume == "auto":
                refusal = (
                    f"run.resume=auto: run.output_dir {self.output_dir} holds an earlier run ({earlier}) but no complete "
                    "checkpoint to continue from (it stopped before its first save, or every checkpoint is damaged); "
                    "nothing in it was changed. Start afresh with run.overwrite=true (the earlier run is moved aside, "
                    f"to {self.output_dir}.old-<time>), or write this run elsewhere with another run.output_dir"
                )
            else:
                refusal = (
                    f"run.output_dir {self.output_dir} holds an earlier run ({earlier}). Continue it with "
                    f"run.resume=auto, write this run elsewhere with another run.output_dir, or set run.overwrite=true "
                    f"to move the earlier run aside (to {self.output_dir}.old-<time>) and start afresh"
                )
        refusal = self.strategy.all_gather_object(refusal)[0]
        if refusal:
            raise OutputDirInUse(refusal)
        return resume

    # ------------------------------------------------------------------ writing

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        weight_names: set[str],
        state: dict[str, Any],
        rank_state: dict[str, Any] | None,
        meta: dict[str, Any],
        config_yaml: str,
        best: bool = False,
    ) -> Path:
        """Write a checkpoint of ``step`` atomically (or ``checkpoints/best``, never pruned) and prune
        old ones to ``run.keep_last``.

        All ranks write into one staging directory (named by rank 0), and rank 0 renames it into
        place once every rank has finished: a run killed during a save keeps its previous checkpoint.
        ``state`` goes to ``state.pt`` with every rank's ``rank_state``.
        """
        strategy = self.strategy
        target = self.output_dir / "checkpoints" / BEST_NAME if best else ckpt.checkpoint_dir(self.output_dir, step)
        owner = strategy.all_gather_object(os.getpid())[0]
        if self.is_main:
            ckpt.prepare_staging(target, owner)
        strategy.barrier()
        tmp = ckpt.staging_dir(target, owner)
        weights = strategy.model_state(model, weight_names)
        optim = strategy.optimizer_state(model, optimizer) if optimizer is not None else None
        if strategy.sharded:
            import torch.distributed.checkpoint as dcp

            dcp.save(weights, checkpoint_id=str(tmp / ckpt.SHARDED_WEIGHTS_NAME))
            if optim is not None:
                dcp.save(optim, checkpoint_id=str(tmp / ckpt.SHARDED_OPTIMIZER_NAME))
        elif self.is_main:
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / ckpt.WEIGHTS_NAME))
            if optim is not None:
                torch.save(optim, tmp / ckpt.OPTIMIZER_NAME)
        ranks = strategy.all_gather_object(rank_state)
        if self.is_main:
            torch.save({**state, "ranks": ranks, "world_size": strategy.world_size}, tmp / ckpt.STATE_NAME)
            (tmp / ckpt.CONFIG_NAME).write_text(config_yaml)
        strategy.barrier()  # every file is written: the ranks checksum a share of them each
        files = {k: v for part in strategy.all_gather_object(ckpt.file_checksums(tmp, strategy.rank, strategy.world_size))
                 for k, v in part.items()}
        if self.is_main:
            ckpt.commit(tmp, target, {**meta, "world_size": strategy.world_size, "sharded": strategy.sharded, "files": files})
            if not best:
                ckpt.prune_checkpoints(self.output_dir, self.run.keep_last)
        strategy.barrier()
        return target

    # ------------------------------------------------------------------ reading

    def verify(self, checkpoint: Path) -> list[str]:
        """Problems of ``checkpoint`` against its recorded checksums (every rank checks a share)."""
        strategy = self.strategy
        return [p for part in strategy.all_gather_object(ckpt.verify(checkpoint, strategy.rank, strategy.world_size))
                for p in part]

    def check_fits(self, path: Path, trainable: set[str], shapes: dict[str, tuple[int, ...]], all_names: set[str]) -> None:
        """That the checkpoint at ``path`` holds this run's ``trainable`` parameters, nothing unknown
        (``all_names`` where it holds every weight) and the same shapes (``shapes``: this model's)."""
        meta = ckpt.read_meta(path)
        held = ckpt.weight_shapes(path)
        allowed = trainable | (all_names if meta["weights"] == "full" else set())
        missing, unexpected = trainable - set(held), set(held) - allowed
        if missing or unexpected:
            raise ckpt.CheckpointError(
                f"{path} does not match the trainable parameters: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]} (was the freeze policy changed?)"
            )
        changed = [f"{n} {held[n]} in the checkpoint, {shapes[n]} here" for n in sorted(held.keys() & shapes.keys())
                   if held[n] != shapes[n]]
        if changed:
            raise ckpt.CheckpointError(
                f"{path} cannot be continued by this config: {len(changed)} parameter shape(s) differ, e.g. "
                f"{'; '.join(changed[:3])}. A model key was changed since the run began (compare with "
                f"{path / ckpt.CONFIG_NAME}). Continue with the run's own config, or start a new run from these "
                "weights: another run.output_dir with model.load_from=<the checkpoint>"
            )

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """Restore the weights a checkpoint holds and the optimiser state into ``model`` (as the strategy
        wrapped it); returns ``state.pt``. Either layout loads under any strategy and world size: whole
        tensors are sharded on load, shards are re-partitioned by ``torch.distributed.checkpoint``."""
        path = Path(path)
        strategy = self.strategy
        weights = ckpt.weights_path(path)
        if weights.is_dir():
            target = strategy.model_state(model, ckpt.weight_names(path))
            ckpt.load_sharded(target, weights)
            strategy.set_model_state(model, target, whole=False)
        else:
            strategy.set_model_state(model, load_file(str(weights)), whole=True)
        if optimizer is not None:
            sharded_dir = path / ckpt.SHARDED_OPTIMIZER_NAME
            if ckpt.is_sharded(sharded_dir):
                target = strategy.optimizer_state(model, optimizer, whole=False)
                ckpt.load_sharded(target, sharded_dir)
                strategy.set_optimizer_state(model, optimizer, target, whole=False)
            elif (path / ckpt.OPTIMIZER_NAME).is_file():
                whole = torch.load(path / ckpt.OPTIMIZER_NAME, map_location="cpu", weights_only=True)
                strategy.set_optimizer_state(model, optimizer, whole, whole=True)
            else:
                raise ckpt.CheckpointError(f"{path} holds no optimiser state (written by an older version?)")
        return torch.load(path / ckpt.STATE_NAME, map_location="cpu", weights_only=True)
