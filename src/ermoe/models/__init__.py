"""Models by name (``create_model``, ``list_models``): vision transformers built on timm with MoE layers, and the
two whole-model baselines (the single-gated ViT of Royer et al. 2023 and the DeepMoE CNN of Wang et al. 2020), and
the brain-age models over 3D volumes (``brain.py``: an SFCN-style CNN and a 3D ViT; ``regional.py``: regional
experts routed per volume), and the retrieval dual encoder (``dual.py``, with the text tower of ``text.py``).
Every model is a :class:`RoutedModel` (``protocol.py`` says what the rest of ermoe may call on it)."""

from .brain import SFCN3d, ViT3d
from .deepmoe import DeepMoECNN, GatedConv
from .dual import DualEncoder
from .regional import RegionalSFCN
from .text import TextTransformer
from .protocol import RoutedLayer, RoutedModel, RoutingLayer, router_has_data_init
from .emoe_release import ReleaseError, load_emoe_release
from .hub import HubError, from_pretrained, push_to_hub, save_pretrained
from .registry import create_model, describe, list_models, model_families, model_parameters, register_model
from .single_gate import ImageGateRouter, SingleGatedViT
from .upcycling import DenseFFN, UpcycledMoE, find_dense_ffns, upcycle
from .weights import LoadReport, WeightShapeError, load_matching
from .vit import PLACEMENTS, VIT_SIZES, MoESpec, MoEViT, PatchMoE, inject_moe, select_blocks

__all__ = ["PLACEMENTS", "VIT_SIZES", "SFCN3d", "ViT3d", "DeepMoECNN", "DualEncoder", "GatedConv", "ImageGateRouter", "MoESpec", "MoEViT",
           "PatchMoE", "RegionalSFCN", "RoutedLayer", "RoutedModel", "RoutingLayer", "SingleGatedViT", "TextTransformer", "create_model", "describe",
           "inject_moe", "list_models", "model_families", "model_parameters", "register_model", "router_has_data_init",
           "select_blocks", "DenseFFN", "UpcycledMoE", "find_dense_ffns", "upcycle",
           "LoadReport", "WeightShapeError", "load_matching", "HubError", "from_pretrained", "push_to_hub",
           "save_pretrained", "ReleaseError", "load_emoe_release"]
