"""Models with MoE layers: vision transformers built on timm, and the two whole-model baselines (the single-gated
ViT of Royer et al. 2023 and the DeepMoE CNN of Wang et al. 2020)."""

from .deepmoe import DeepMoECNN, GatedConv
from .routed import routed_layers
from .single_gate import ImageGateRouter, SingleGatedViT
from .vit import (MODEL_METHODS, PLACEMENTS, VIT_SIZES, MoESpec, PatchMoE, create_model, freeze_except_moe_and_head,
                  init_moe_from_data, inject_moe, list_models, patch_moe_layers, select_blocks)

__all__ = ["MODEL_METHODS", "PLACEMENTS", "VIT_SIZES", "DeepMoECNN", "GatedConv", "ImageGateRouter", "MoESpec",
           "PatchMoE", "SingleGatedViT", "create_model", "freeze_except_moe_and_head", "init_moe_from_data",
           "inject_moe", "list_models", "patch_moe_layers", "routed_layers", "select_blocks"]
