"""A small text transformer with MoE FFNs: the text tower of the retrieval dual encoder (docs/retrieval.md).

Token embeddings plus learned positions, ``depth`` pre-norm timm ``Block`` s with a key-padding mask, a final
LayerNorm, and the mean over a caption's real tokens. MoE layers replace (or, for EMoE, sit beside) the FFN of the
chosen blocks, as in the ViTs (:class:`~ermoe.models.vit.MoESpec`); they route the real tokens only: padding never
reaches a router, so it never counts in a load. ``depth=0, positions=False`` is the bag-of-words baseline: the
mean of the word embeddings, blind to word order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from timm.models.vision_transformer import Block

from ..moe import MoE
from .protocol import TokenMoELayer
from .checkpointing import checkpointed
from .vit import MoESpec, ParallelMoE, block_token_sites, select_blocks


class PaddedTokenMoE(TokenMoELayer):
    """An MoE over the real tokens of padded ``(B, L, D)`` input; ``valid`` ((B, L) bool) is set by the tower
    before each forward. Padding positions get zeros."""

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.moe = moe
        self.valid: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        valid = self.valid
        if valid is None or valid.shape != x.shape[:2]:
            raise RuntimeError("PaddedTokenMoE: the text tower did not set the padding mask for this input")
        out = x.new_zeros(x.shape)
        out[valid] = self.moe(x[valid])
        return out

    def token_mask(self) -> Tensor | None:
        return self.valid


class TextTransformer(nn.Module):
    """Token ids ``(B, L)`` (``pad_id`` padding) -> caption features ``(B, width)``."""

    def __init__(self, vocab_size: int, context_length: int, width: int, depth: int, num_heads: int,
                 mlp_ratio: float, moe: MoESpec | None, positions: bool, pad_id: int) -> None:
        super().__init__()
        self.pad_id, self.width, self.context_length = pad_id, width, context_length
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width)) if positions else None
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.token_embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.moe_layers: list[PaddedTokenMoE] = []
        if moe is not None:
            placement = moe.resolved_placement()
            if placement not in ("replace", "parallel"):
                raise ValueError(f"the text tower's MoE placement must be 'replace' or 'parallel', got {placement!r}")
            if depth == 0:
                raise ValueError("a text tower of depth 0 has no FFN for an MoE: set text depth >= 1 or moe: null")
            for i in select_blocks(moe.blocks, depth):
                block = self.blocks[i]
                hidden = moe.hidden_dim or (block.mlp.fc1.out_features if placement == "replace" else max(1, width // 4))
                layer = PaddedTokenMoE(MoE(width, hidden, moe.num_experts, moe.router, moe.top_k,
                                           capacity_factor=moe.capacity_factor, learn_alpha=moe.learn_alpha,
                                           router_kwargs=dict(moe.router_kwargs)))
                block.mlp = layer if placement == "replace" else ParallelMoE(block.mlp, layer)
                self.moe_layers.append(layer)

    checkpoint: bool = False  # activation checkpointing of the blocks (set_grad_checkpointing)

    def no_weight_decay(self) -> set[str]:
        """The token and position embeddings (timm's ViT exempts its position embedding the same way)."""
        return {"token_embed.weight", "pos_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.checkpoint = enable

    @property
    def token_sites(self) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
        """Every block's token-wise layer (``blocks.<i>``) over the ``(context_length,)`` positions, padding
        included (a probe drops it by its labels)."""
        return block_token_sites(self.blocks, (self.context_length,))

    def forward(self, ids_BL: Tensor) -> Tensor:
        valid = ids_BL != self.pad_id
        # checked on the CPU only, as the MoE layer scans its input for NaN there: on a GPU the check would stall
        # the queue every step (an empty caption there gives NaN features, which the non-finite guard catches)
        if ids_BL.device.type == "cpu" and not valid.any(dim=1).all():
            raise ValueError("a caption has no tokens (every position is padding)")
        x = self.token_embed(ids_BL)
        if self.pos_embed is not None:
            if ids_BL.shape[1] > self.pos_embed.shape[1]:
                raise ValueError(f"captions of {ids_BL.shape[1]} tokens exceed the context length "
                                 f"{self.pos_embed.shape[1]}")
            x = x + self.pos_embed[:, :ids_BL.shape[1]]
        for layer in self.moe_layers:
            layer.valid = valid
        mask = valid[:, None, None, :]  # (B, 1, 1, L): every query attends to the real tokens only
        for block in self.blocks:
            x = checkpointed(block, x, mask) if self.checkpoint else block(x, attn_mask=mask)
        x = self.norm(x)
        w = valid.unsqueeze(-1).to(x.dtype)
        return (x * w).sum(1) / w.sum(1)


def text_tower(vocab_size: int, context_length: int, pad_id: int, *, width: int = 128, depth: int = 2,
               num_heads: int = 4, mlp_ratio: float = 4.0, positions: bool = True,
               moe: MoESpec | dict[str, Any] | None = None) -> TextTransformer:
    """The text tower from its settings (the dual encoder's ``text`` section)."""
    for key, value in (("width", width), ("num_heads", num_heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"text.{key} must be a positive int, got {value!r}")
    if not isinstance(depth, int) or depth < 0:
        raise ValueError(f"text.depth must be an int >= 0, got {depth!r}")
    if width % num_heads:
        raise ValueError(f"text.width {width} must be divisible by text.num_heads {num_heads}")
    spec = MoESpec(**moe) if isinstance(moe, dict) else moe
    return TextTransformer(vocab_size, context_length, width, depth, num_heads, mlp_ratio, spec, positions, pad_id)
