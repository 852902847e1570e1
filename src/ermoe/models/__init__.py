"""Models with MoE layers: vision transformers built on timm."""

from .vit import (PLACEMENTS, VIT_SIZES, MoESpec, PatchMoE, create_model, freeze_except_moe_and_head,
                  init_moe_from_data, inject_moe, list_models, patch_moe_layers, select_blocks)

__all__ = ["PLACEMENTS", "VIT_SIZES", "MoESpec", "PatchMoE", "create_model", "freeze_except_moe_and_head",
           "init_moe_from_data", "inject_moe", "list_models", "patch_moe_layers", "select_blocks"]
