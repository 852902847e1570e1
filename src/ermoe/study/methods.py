"""The methods the study compares: each turns the study's base model section into its own, on the same data and
budget.

Every MoE method uses the same backbone, the same blocks, the same expert count and width, top-1 routing (so the
same active parameters per token, except the adapter placements of EMoE, which add a branch beside a dense FFN), and
trains the same steps on the same data order (same seeds). The two whole-model baselines differ by design: the
single-gated MoE runs a dense base branch beside the chosen expert (its active parameters are the dense ViT's plus
one expert FFN per MoE block), and DeepMoE is a CNN, sized to the dense ViT's parameter count, whose "experts" are
conv channels. Rows that are the papers' methods read as written are marked ``paper``; the variants that try to
balance eigen routing without a loss (docs/method.md, "Balancing without a loss") are marked ``variant``.
"""

from __future__ import annotations

from typing import Any

from ..experts import matched_eigen_hidden_dim
from ..models.vit import VIT_SIZES, MoESpec
from ..routing.eigenbasis import default_eigen_rank

# name -> (role, description, overrides of model.moe; "_init": moe_init; "_match_active": ERMoE experts widened to the
# MLP experts' active parameters; "_no_moe": the dense model; "_model": a whole model, built from the base ViT's
# settings with the other keys as its arguments)
METHODS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "dense": ("reference", "dense ViT, no MoE", {"_no_moe": True}),
    "ermoe": ("paper", "ERMoE replacing the FFN (papers' reading)", {"router": "ermoe", "placement": "replace"}),
    "emoe_parallel": ("paper", "EMoE branch beside the FFN", {"router": "emoe", "placement": "parallel"}),
    "emoe_post_block": ("paper", "EMoE adapter on the block output (reference code)",
                        {"router": "emoe", "placement": "post-block"}),
    "ermoe_standardize": ("variant", "ERMoE + per-expert score standardisation",
                          {"router": "ermoe", "router_kwargs": {"standardize": True}}),
    "ermoe_learn_tau": ("variant", "ERMoE + learned temperature (from 0.1), gate = prob",
                        {"router": "ermoe", "router_kwargs": {"learn_tau": True, "tau": 0.1, "gate": "prob"}}),
    "ermoe_mutual": ("variant", "ERMoE with mutually orthogonal bases",
                     {"router": "ermoe", "router_kwargs": {"mutually_orthogonal": True}}),
    "ermoe_pca": ("variant", "ERMoE with PCA-initialised bases", {"router": "ermoe", "_init": "pca"}),
    "emoe_whiten": ("variant", "EMoE + whitened energies", {"router": "emoe", "router_kwargs": {"whiten": True}}),
    "emoe_standardize": ("variant", "EMoE + per-expert score standardisation",
                         {"router": "emoe", "router_kwargs": {"standardize": True}}),
    "emoe_pca": ("variant", "EMoE with PCA-initialised basis", {"router": "emoe", "_init": "pca"}),
    "ermoe_matched": ("variant", "ERMoE with experts widened to the MLP experts' active parameters",
                      {"router": "ermoe", "_match_active": True}),
    "ermoe_standardize_matched": ("variant", "ERMoE + standardisation, widened experts",
                                  {"router": "ermoe", "router_kwargs": {"standardize": True}, "_match_active": True}),
    "ermoe_standardize_prob": ("variant", "ERMoE + standardisation, learned temperature (from 1), gate = prob",
                               {"router": "ermoe", "router_kwargs": {"standardize": True, "learn_tau": True,
                                                                     "tau": 1.0, "gate": "prob"}}),
    "ermoe_tau_matched": ("variant", "ERMoE + learned temperature (from 0.1), gate = prob, widened experts",
                          {"router": "ermoe", "router_kwargs": {"learn_tau": True, "tau": 0.1, "gate": "prob"},
                           "_match_active": True}),
    "emoe_pi_small": ("variant", "EMoE with Pi initialised at std 0.1", {"router": "emoe",
                                                                         "router_kwargs": {"pi_init_std": 0.1}}),
    "emoe_pi_large": ("variant", "EMoE with Pi initialised at std 3", {"router": "emoe",
                                                                       "router_kwargs": {"pi_init_std": 3.0}}),
    "softmax_noloss": ("baseline", "softmax top-1, no balancing loss",
                       {"router": "softmax_topk", "router_kwargs": {"balance_weight": 0.0}}),
    "switch": ("baseline", "Switch/GShard: softmax top-1 + balancing loss 0.01",
               {"router": "softmax_topk", "router_kwargs": {"balance_weight": 0.01}}),
    "switch_tuned": ("baseline", "Switch/GShard: softmax top-1 + balancing loss, its coefficient the one the study "
                                 "config fixed before the runs (study.router_kwargs, chosen on validation loads)",
                     {"router": "softmax_topk", "router_kwargs": {"balance_weight": 0.01}}),
    "vmoe": ("baseline", "V-MoE: noisy top-1, importance + load losses, capacity 1.05, BPR", {"router": "vmoe"}),
    "loss_free_bias": ("baseline", "auxiliary-loss-free bias balancing", {"router": "loss_free_bias"}),
    "cosine": ("baseline", "cosine routing (X-MoE)", {"router": "cosine"}),
    "expert_choice": ("baseline", "expert choice", {"router": "expert_choice"}),
    "oracle": ("control", "positive control: every token of an image on its class's expert (class mod experts, "
               "ground truth, also at test)", {"router": "oracle"}),
    "single_gate": ("baseline", "single-gated MoE (Royer 2023): one gate per image, dense base branch as early exit "
                    "and ensemble member, k-means gate after 1/3 of training",
                    {"_model": "single_gated_vit", "kmeans_step": 0.33}),
    "deepmoe": ("baseline", "DeepMoE (Wang 2020): CNN, conv channels gated per image by ReLU(W e), L1 penalty",
                {"_model": "deepmoe_cnn"}),
}

# What `ermoe study` runs by default; the other METHODS rows are follow-ups of the variants, run with
# `--methods=[...]` (docs/study.md says which ran where).
EXTRA_METHODS = ("ermoe_standardize_matched", "ermoe_tau_matched", "emoe_pi_large", "switch_tuned")
# Methods whose router settings a study config must fix (study.router_kwargs), with how they were chosen.
STUDY_SET_METHODS = ("switch_tuned",)
DEFAULT_METHODS = [name for name in METHODS if name not in EXTRA_METHODS]
# Rows added after looking at an earlier study's test-split results (the variants sweep of session 4): exploratory
# leads, marked as such in the report, not held-out evidence.
EXPLORATORY = frozenset({"ermoe_matched", "ermoe_standardize_prob", "emoe_pi_small", *EXTRA_METHODS})


def deepmoe_widths(embed_dim: int) -> list[int]:
    """DeepMoE's stage widths for a study whose ViT has width ``embed_dim``: (40, 80, 160) at 96, which gives the
    CNN about the parameters of the dense depth-4 ViT (489k against 455k), scaled linearly with the width."""
    unit = max(4, round(40 * embed_dim / 96))
    return [unit, 2 * unit, 4 * unit]


def method_model(name: str, base_model: dict[str, Any]) -> dict[str, Any]:
    """The whole model section (``TrainConfig.model``, flat) of method ``name`` on the study's base model section."""
    if name not in METHODS:
        raise ValueError(f"unknown study method {name!r}; choose from {list(METHODS)}")
    spec = dict(METHODS[name][2])
    base_moe = base_model.get("moe") or {}
    vit = {k: v for k, v in base_model.items() if k not in ("moe", "moe_init", "moe_init_batches")}
    whole = spec.pop("_model", None)
    if whole == "deepmoe_cnn":
        size = VIT_SIZES.get(base_model.get("name", "vit_tiny"), (96,))[0]
        return {"name": whole, "widths": deepmoe_widths(base_model.get("embed_dim") or size)}
    if whole == "single_gated_vit":
        blocks = {k: base_moe[k] for k in ("num_experts", "blocks") if k in base_moe}
        return {"name": whole, "base": vit.pop("name", "vit_tiny"), **vit, **blocks, **spec}
    if spec.pop("_no_moe", False):
        return {**vit, "moe": None}
    if spec.pop("_match_active", False):
        spec["hidden_dim"] = _matched_hidden(base_model, spec.get("router_kwargs", {}).get("rank"))
    init = spec.pop("_init", "random")
    # Router options and placement come from the method alone (None: the router's own default placement).
    moe = {**base_moe, "router_kwargs": {}, "placement": None, **spec}
    return {**vit, "moe": moe, "moe_init": init}


def _matched_hidden(base_model: dict[str, Any], rank: int | None) -> int:
    """ERMoE's expert width at which it uses the MLP experts' active parameters per token (``matched_eigen_hidden_dim``)."""
    moe = base_model.get("moe", {})
    dim = base_model.get("embed_dim") or VIT_SIZES.get(base_model.get("name", "vit_tiny"), (96,))[0]
    experts = moe.get("num_experts", MoESpec.num_experts)
    hidden = moe.get("hidden_dim") or int(dim * base_model.get("mlp_ratio", 4.0))
    rank = rank or default_eigen_rank(dim, experts)
    return matched_eigen_hidden_dim(dim, hidden, experts, rank, moe.get("top_k", MoESpec.top_k))
