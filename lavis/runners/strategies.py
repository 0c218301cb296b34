"""Training strategies: how one run spreads over processes (``run.strategy: single | ddp | fsdp``).

A strategy is one object that owns everything the processes must agree on: joining the process
group, wrapping the model before the optimiser exists, skipping gradient synchronisation on
accumulation steps, clipping, reductions across ranks, evaluation in lock-step, and how the training
state is gathered from the ranks or scattered to them (whole tensors, or one shard per rank under
FSDP); the :class:`~lavis.runners.checkpointer.Checkpointer` writes and reads the files. The runner
only calls it; a new strategy is one registered class here plus one YAML in ``configs/strategies/``.

State goes through ``torch.distributed.checkpoint.state_dict``: weights and optimiser state are keyed
by parameter name whatever the wrapping, so a checkpoint written under one strategy and world size
loads under another.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lavis.common import dist
from lavis.common.registry import registry
from lavis.models.vlm import VisionLanguageModel, canonical_name

log = logging.getLogger(__name__)


class Strategy:
    """Base: one process, no wrapping. Subclasses override what differs."""

    sharded = False  # parameters sharded across ranks: sharded checkpoints, lock-step evaluation
    needs_process_group = False

    @property
    def builds_on_meta(self) -> bool:
        """Whether this rank builds the model on the meta device and receives its weights in :meth:`prepare`."""
        return False

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    # ------------------------------------------------------------------ processes

    def setup(self, device: str = "auto", timeout_s: float = 600.0) -> torch.device:
        """Join the process group (``train.py`` calls this before building anything); return the device."""
        self.device = dist.init_distributed(device, timeout_s, always=self.needs_process_group)
        if not self.is_main:  # rank 0 tells the story; the others speak up for warnings and errors
            logging.getLogger().setLevel(logging.WARNING)
        return self.device

    def teardown(self) -> None:
        dist.shutdown()

    @property
    def rank(self) -> int:
        return dist.rank()

    @property
    def world_size(self) -> int:
        return dist.world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            tdist.barrier()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place; returned for convenience)."""
        if self.world_size > 1:
            tdist.all_reduce(tensor)
        return tensor

    def sum_over_ranks(self, values: list[float | torch.Tensor]) -> list[float]:
        """Each value summed over the ranks, as Python floats (one collective for all of them).
        Tensors among ``values`` (scalars on this rank's device) are read, which waits for them."""
        if self.world_size == 1 and not any(torch.is_tensor(v) for v in values):
            return [float(v) for v in values]
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values])
        return self.all_reduce(stacked).tolist()

    def all_gather_object(self, obj: Any) -> list[Any]:
        return dist.all_gather_objects(obj)

    # ------------------------------------------------------------------ the model

    def prepare(self, model: VisionLanguageModel, precision: str) -> nn.Module:
        """Move ``model`` to the device and wrap it; returns the module the runner calls."""
        return model.to(self.device)

    def prepare_reference(self, model: VisionLanguageModel, precision: str) -> nn.Module:
        """Place a frozen model used beside the trained one (DPO's reference) as the trained one is placed."""
        return self.prepare(model, precision)

    @property
    def gradient_divisor(self) -> int:
        """What the gradient synchronisation divides by (DDP and FSDP average over ranks): the runner
        multiplies the loss by it, so the gradient is that of the summed loss over the global batch."""
        return 1

    def no_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward; ``sync`` on the last of a step."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm (over every rank's shard); returns the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    @contextlib.contextmanager
    def evaluation(self, model: VisionLanguageModel) -> Iterator[None]:
        """Context for generation and scoring on the unwrapped model (sharded parameters gathered)."""
        yield

    # ------------------------------------------------------------------ planning

    def memory_estimate(self, model: VisionLanguageModel, precision: str, world_size: int) -> dict[str, int]:
        """Bytes per rank of parameters, gradients and AdamW state for ``model`` (built on the meta
        device: arithmetic only) at ``world_size`` ranks; activations are not included.

        ``gathered``: when parameters are sharded, the whole parameters held at once in the compute
        dtype: the root unit (embeddings, LM head, norms: gathered for the whole step) and the two
        largest blocks (one in use, one prefetched).
        """
        params = list(model.parameters())
        shards = world_size if self.sharded else 1
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        trainable = [p for p in params if p.requires_grad]
        grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
        estimate = {
            "parameters": param_bytes // shards,
            "gradients": grad_bytes // shards,
            "optimizer": 2 * grad_bytes // shards,  # AdamW: exp_avg and exp_avg_sq, in the parameters' dtype
        }
        if self.sharded:
            def gathered(tensors) -> int:
                return sum(p.numel() * (2 if precision == "bf16" else p.element_size()) for p in tensors)

            blocks = [block for component_blocks in model.blocks().values() for block in component_blocks]
            in_blocks = {id(p) for block in blocks for p in block.parameters()}
            units = sorted((gathered(block.parameters()) for block in blocks), reverse=True)
            estimate["gathered"] = gathered(p for p in params if id(p) not in in_blocks) + sum(units[:2])
        return estimate


    # ------------------------------------------------------------------ state (the Checkpointer writes and reads it)

    def model_state(self, model: nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
        """The parameters named in ``names`` (canonical names): whole tensors on the CPU, or this rank's
        shards when the strategy shards them."""
        whole = not self.sharded
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=whole, cpu_offload=whole))
        return {k: v for k, v in state.items() if k in names}

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, whole: bool | None = None) -> dict[str, Any]:
        """The optimiser's state keyed by parameter name: whole tensors on the CPU (``whole``; by default
        unless the strategy shards), or this rank's shards."""
        whole = not self.sharded if whole is None else whole
        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=whole, cpu_offload=whole))

    def set_model_state(self, model: nn.Module, state: dict[str, torch.Tensor], whole: bool) -> None:
        """Load the weights ``state`` holds (whole tensors, sharded on load; or this rank's shards)."""
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=whole, strict=False))

    def set_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], whole: bool) -> None:
        """Load optimiser state keyed by parameter name (whole tensors, or this rank's shards)."""
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=whole))


@registry.register("strategy", "single")
class SingleProcess(Strategy):
    """One process on one device (``python train.py``)."""

    def setup(self, device: str = "auto", timeout_s: float = 600.0) -> torch.device:
        launched = dist.launched_world_size()
        if launched > 1:
            raise ValueError(
                f"run.strategy=single, but the launcher started {launched} processes: "
                "use run.strategy=ddp or run.strategy=fsdp under torchrun"
            )
        return super().setup(device, timeout_s)


@registry.register("strategy", "ddp")
class DDPStrategy(Strategy):
    """Data parallel: a whole model per rank, gradients all-reduced (``DistributedDataParallel``).

    ``bucket_cap_mb``: gradient bucket size; ``find_unused_parameters``: only for models whose
    forward leaves trained parameters out (ours does not: text-only batches still run the visual
    path); ``static_graph``: the same parameters are used in every step (lets DDP skip checks).
    """

    needs_process_group = True

    def __init__(self, bucket_cap_mb: int = 25, find_unused_parameters: bool = False, static_graph: bool = False) -> None:
        super().__init__()
        self.bucket_cap_mb = bucket_cap_mb
        self.find_unused_parameters = find_unused_parameters
        self.static_graph = static_graph

    def prepare(self, model: VisionLanguageModel, precision: str) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        model.to(self.device)
        return DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            bucket_cap_mb=self.bucket_cap_mb,
            find_unused_parameters=self.find_unused_parameters,
            static_graph=self.static_graph,
            # The model's buffers are constants (sin-cos tables, rotary frequencies): no broadcast per
            # forward, which would also make every forward outside training a collective.
            broadcast_buffers=False,
        )

    def prepare_reference(self, model: VisionLanguageModel, precision: str) -> nn.Module:
        return model.to(self.device)  # a whole copy per rank, like the trained model; nothing to synchronise

    @property
    def gradient_divisor(self) -> int:
        return self.world_size

    def no_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else model.no_sync()


@registry.register("strategy", "fsdp")
class FSDPStrategy(Strategy):
    """Fully sharded data parallel (FSDP2, ``fully_shard``): parameters, gradients and optimiser
    state split over the ranks of a 1-D device mesh.

    Units: every ViT block, every LLM decoder layer, the adapter, then the root (embeddings, norms,
    LM head). Blocks of components with ``gradient_checkpointing: true`` are already wrapped in
    activation checkpointing (see :meth:`VisionLanguageModel.apply_activation_checkpointing`).
    Under ``run.precision: bf16`` parameters are gathered in bf16 and gradients reduced in
    ``reduce_dtype``; the sharded master weights and AdamW state stay fp32.

    ``reshard_after_forward``: free gathered parameters after each unit's forward (less memory, one
    more all-gather in backward). ``encode_images_every_step``: run the visual path on a blank image
    when a rank's batch has none, so every rank issues the same collectives (without it a step in which
    one rank has images and another none fails or hangs; only turn it off to see that).
    ``broadcast_from_rank0``: only rank 0 builds the whole model (and reads its pretrained weights and
    ``model.load_from``); the other ranks build it on the meta device and receive their shards from
    rank 0, so a node holds one CPU copy of the model rather than one per GPU.
    """

    sharded = True
    needs_process_group = True

    def __init__(
        self,
        reshard_after_forward: bool = True,
        reduce_dtype: Literal["float32", "bfloat16"] = "float32",
        encode_images_every_step: bool = True,
        broadcast_from_rank0: bool = True,
    ) -> None:
        super().__init__()
        self.reshard_after_forward = reshard_after_forward
        self.reduce_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[reduce_dtype]
        self.encode_images_every_step = encode_images_every_step
        self.broadcast_from_rank0 = broadcast_from_rank0

    @property
    def builds_on_meta(self) -> bool:
        return self.broadcast_from_rank0 and self.world_size > 1 and self.rank != 0

    def prepare(self, model: VisionLanguageModel, precision: str) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if precision == "fp16":
            raise ValueError("run.strategy=fsdp supports run.precision fp32 or bf16 (fp16 needs a sharded gradient scaler)")
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if precision == "bf16" else None,
            reduce_dtype=self.reduce_dtype if precision == "bf16" else None,
        )
        broadcast = self.broadcast_from_rank0 and self.world_size > 1
        # Rank 0's whole weights (references: no copy), to be scattered once every rank is sharded.
        whole = model.state_dict() if broadcast and self.is_main else {}
        # No model.to(device) first: fully_shard moves one unit at a time to the mesh's device and keeps
        # its shard, so a rank never holds the whole model on its accelerator.
        options = {"mesh": mesh, "mp_policy": policy, "reshard_after_forward": self.reshard_after_forward}
        units = 0
        for blocks in model.blocks().values():
            for block in blocks:
                fully_shard(block, **options)
                units += 1
        fully_shard(model, **options)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            model.to_empty(device=self.device)
        else:
            model.to(self.device)  # buffers outside the units (if any)
        if broadcast:
            set_model_state_dict(
                model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
            )
            for buffer in model.buffers():  # non-persistent ones too (e.g. rotary frequencies)
                tdist.broadcast(buffer, src=0)
            del whole
        model.vision_every_step = self.encode_images_every_step
        log.info(
            "fsdp: %d units + root sharded over %d ranks (%s)%s", units, self.world_size, self.device.type,
            "; ranks 1+ built the model on the meta device and received their shards from rank 0" if broadcast else "",
        )
        return model

    @property
    def gradient_divisor(self) -> int:
        return self.world_size

    def no_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    @contextlib.contextmanager
    def evaluation(self, model: nn.Module) -> Iterator[None]:
        # Generation calls the embeddings and the LM head directly, not through the root's forward:
        # gather the root's parameters for the duration (the blocks gather their own).
        model.unshard()
        try:
            yield
        finally:
            model.reshard()


def build_strategy(component) -> Strategy:
    """The configured strategy (``run.strategy``, a :class:`~lavis.common.config.ComponentConfig`)."""
    return registry.get("strategy", component.type)(**component.params)


def parameter_names(model: VisionLanguageModel) -> set[str]:
    """Every parameter's checkpoint name (no wrapper prefixes)."""
    return {canonical_name(n) for n, _ in model.named_parameters()}
