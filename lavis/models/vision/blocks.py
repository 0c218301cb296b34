"""What the vision encoders share: their transformer blocks (``model.blocks``) as the units of
sharding, activation checkpointing and layer-wise learning-rate decay."""

from __future__ import annotations

from torch import nn


class ViTBlocks:
    """Mixin for an encoder holding its ViT as ``self.model`` with blocks ``self.model.blocks``;
    ``EMBEDDING_PARTS``: the ``self.model`` children that come before the blocks (depth 0)."""

    model: nn.Module
    EMBEDDING_PARTS: tuple[str, ...] = ()

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks (units of sharding and activation checkpointing)."""
        return list(self.model.blocks)

    @property
    def num_layers(self) -> int:
        """Transformer blocks, for layer-wise learning-rate decay."""
        return len(self.model.blocks)

    def layer_id(self, name: str) -> int:
        """Depth of a parameter (name relative to this module): 0 for the embeddings, i+1 for block i,
        ``num_layers + 1`` for what follows the blocks (e.g. a final norm)."""
        parts = name.split(".")
        if parts[1] == "blocks":
            return int(parts[2]) + 1
        if parts[1] in self.EMBEDDING_PARTS:
            return 0
        return self.num_layers + 1
