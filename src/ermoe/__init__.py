"""ermoe: eigenbasis-guided sparse Mixture-of-Experts (EMoE, ERMoE) and the baselines they are compared against."""

from .experts import EigenExperts, MLPExperts, matched_eigen_hidden_dim
from .models import (MoESpec, RoutedModel, create_model, from_pretrained, list_models, load_emoe_release,
                     save_pretrained, upcycle)
from .moe import MoE, after_step, aux_loss, moe_layers, routing_stats
from .orthogonal import OrthonormalBasis, orthonormality_error, pca_basis, principal_angles
from .routing import Router, RouterOutput, RoutingInfo, create_router, list_routers, register_router

from .version import __version__

__all__ = ["MoE", "Router", "RouterOutput", "RoutingInfo", "EigenExperts", "MLPExperts", "OrthonormalBasis",
           "MoESpec", "RoutedModel", "after_step", "matched_eigen_hidden_dim", "aux_loss", "create_model",
           "create_router", "list_models", "list_routers", "moe_layers", "orthonormality_error", "pca_basis",
           "principal_angles", "register_router", "routing_stats", "upcycle", "from_pretrained", "save_pretrained",
           "load_emoe_release"]
