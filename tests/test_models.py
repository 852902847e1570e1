"""Models by registry: every registered model runs and trains every parameter; ViT placements leave the class token
to the dense path; settings that do not apply are named errors."""

import copy
import warnings

import pytest
import torch

import ermoe
from ermoe.models import (MoESpec, MoEViT, PatchMoE, RoutedModel, create_model, list_models, model_families,
                          select_blocks)
from ermoe.orthogonal import pca_basis, principal_angles

DATA = dict(num_classes=5, img_size=16, in_chans=2)
VIT = dict(patch_size=4, depth=2, embed_dim=32, num_heads=2)
TINY = {**DATA, **VIT}
# Tiny arguments per family (the registered sizes of a family share one builder signature).
FAMILY_ARGS = {
    "vit": dict(**VIT, moe=dict(router="ermoe", num_experts=4, blocks="all")),
    "single_gated_vit": dict(**VIT, num_experts=4, blocks="all", kmeans_step=1, kmeans_samples=8),
    "deepmoe_cnn": dict(widths=[8, 8, 8], embed_dim=6),
}
# Volumetric models take volumes, not images (5 outputs, so the classification loss of the check applies).
VOLUME_ARGS = {
    "sfcn3d": dict(in_chans=2, volume_shape=(16, 16, 16), num_outputs=5, channels=[4, 8, 8],
                   moe=dict(router="ermoe", num_experts=4)),
    "vit3d": dict(in_chans=2, volume_shape=(16, 16, 16), num_outputs=5, patch_size=4, embed_dim=16, depth=2,
                  num_heads=2, moe=dict(router="ermoe", num_experts=4, blocks="all")),
    # the MNI grid at 8 mm; every expert chosen (top_k 4), so that each gets a gradient from 8 volumes
    "regional_sfcn3d": dict(in_chans=2, volume_shape=(23, 28, 23), spacing=8.0, num_outputs=5, channels=[4, 8],
                            gate_channels=[4], top_k=4),
}


def assert_every_param_learns(model, x=None, steps=1):
    """Output shape, no NaN, and every trainable parameter gets a gradient from the model's training loss that is
    not all zeros (a dead MoE's parameters get zeros or nothing). ``steps``: training steps first (``after_step``,
    no optimizer)."""
    x = torch.randn(8, 2, 16, 16) if x is None else x
    model.train()
    for step in range(1, steps + 1):
        model(x)
        model.after_step(step)
    model.zero_grad(set_to_none=True)
    out = model(x)
    assert out.shape == (len(x), 5)
    assert torch.isfinite(out).all()
    target = torch.arange(len(x)) % 5
    loss = model.training_loss(out, target, torch.nn.functional.cross_entropy) + model.aux_loss()
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not dead, dead


def registered():
    families = model_families()
    return [(name, family) for family, names in families.items() for name in names if name != "timm_vit"]


@pytest.mark.parametrize("name,family", registered())
def test_every_registered_model_forward_and_grad(name, family):
    torch.manual_seed(0)
    if family == "retrieval":
        pytest.skip("the dual encoder returns two embeddings: tests/test_retrieval.py checks its gradients")
    if family == "brain":
        args = VOLUME_ARGS[name]
        model, x = create_model(name, **args), torch.randn(8, 2, *args["volume_shape"])
    else:
        model, x = create_model(name, **DATA, **FAMILY_ARGS[family]), None
    assert isinstance(model, RoutedModel) and model.routed_layers()
    assert_every_param_learns(model, x, steps=1)  # one step: the single-gated model's experts start after it


def test_list_models_lists_every_family():
    assert set(list_models()) >= {"vit_tiny", "vit_small", "vit_base", "single_gated_vit", "deepmoe_cnn"}
    assert set(model_families()) == {"vit", "single_gated_vit", "deepmoe_cnn", "brain", "retrieval"}
    assert {"sfcn3d", "vit3d", "regional_sfcn3d"} <= set(list_models("brain"))
    assert list_models("retrieval") == ["dual_encoder"]
    assert "timm_vit" not in list_models()


def test_the_gradient_check_catches_a_dead_moe():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="no gradient"):
        model = create_model("vit_tiny", **TINY, global_pool="token",
                             moe=dict(router="softmax_topk", num_experts=4, blocks="all"))
    with pytest.raises(AssertionError, match=r"blocks\.1\.mlp\.moe"):
        assert_every_param_learns(model)


def test_registered_sizes_are_the_vit_papers():
    model = ermoe.create_model("vit_small", num_classes=3, img_size=32, patch_size=16, depth=1)
    assert model.embed_dim == 384 and model.blocks[0].attn.num_heads == 6


@pytest.mark.parametrize("router", ermoe.list_routers())
@pytest.mark.parametrize("placement", ["replace", "parallel", "post-block"])
def test_every_router_and_placement(router, placement):
    torch.manual_seed(0)
    model = ermoe.create_model("vit_tiny", **TINY, moe=dict(router=router, num_experts=4, placement=placement,
                                                             blocks="all"))
    assert [v.num_experts for v in model.routed_layers()] == [4, 4]
    assert_every_param_learns(model)


def test_no_moe_is_moe_none():
    model = ermoe.create_model("vit_tiny", **TINY)
    assert isinstance(model, MoEViT) and model.routed_layers() == []
    assert_every_param_learns(model)
    with pytest.raises(ValueError, match=r"moe to null"):
        MoESpec(router="dense")


def test_context_score_gets_the_blocks_attention_output():
    torch.manual_seed(0)
    model = ermoe.create_model("vit_tiny", **TINY, moe=dict(router="ermoe", num_experts=4, blocks="all",
                                                             router_kwargs={"score": "context"}))
    assert_every_param_learns(model)


def test_default_placement_follows_the_papers():
    assert MoESpec(router="emoe").resolved_placement() == "parallel"
    assert MoESpec(router="ermoe").resolved_placement() == "replace"


@pytest.mark.parametrize("placement", ["parallel", "post-block"])
def test_class_token_bypasses_the_moe(placement):
    torch.manual_seed(0)
    model = ermoe.create_model("vit_tiny", **TINY, moe=dict(router="softmax_topk", num_experts=4,
                                                             placement=placement, blocks=[0]))
    block = model.blocks[0]
    dense_path = copy.deepcopy(block)  # the same block with the MoE branch taken out
    if placement == "parallel":
        dense_path.mlp = dense_path.mlp.mlp
    else:
        dense_path = dense_path.block
    tokens = torch.randn(3, 1 + 16, 32)
    with torch.no_grad():
        out_moe, out_dense = block(tokens), dense_path(tokens)
    assert torch.equal(out_moe[:, 0], out_dense[:, 0])  # class token untouched by the MoE
    assert not torch.allclose(out_moe[:, 1:], out_dense[:, 1:])  # patch tokens routed
    assert model.routed_layers()[0].last_routing.num_tokens == 3 * 16


def test_replace_gives_class_token_no_ffn_update():
    layer = PatchMoE(ermoe.MoE(8, 16, 2, "softmax_topk"), num_prefix_tokens=1)
    out = layer(torch.randn(2, 5, 8))
    assert torch.equal(out[:, 0], torch.zeros(2, 8)) and out[:, 1:].abs().sum() > 0


def test_block_selection():
    assert select_blocks("all", 4) == [0, 1, 2, 3]
    assert select_blocks("every_other", 6) == [1, 3, 5]
    assert select_blocks("last:2", 6) == [4, 5]
    assert select_blocks([0, -1], 6) == [0, 5]
    for bad in ["last:0", "last:x", "first", [7]]:
        with pytest.raises(ValueError):
            select_blocks(bad, 6)


def test_bad_model_config_errors():
    with pytest.raises(ValueError, match="unknown model"):
        ermoe.create_model("vit_gigantic")
    with pytest.raises(ValueError, match="unknown router"):
        ermoe.create_model("vit_tiny", **TINY, moe=dict(router="nope"))
    with pytest.raises(ValueError, match="placement"):
        ermoe.create_model("vit_tiny", **TINY, moe=dict(placement="sideways"))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ermoe.create_model("vit_tiny", **{**TINY, "img_size": 15})
    with pytest.raises(ValueError, match="global_pool"):
        ermoe.create_model("vit_tiny", **TINY, global_pool="mean")


def test_settings_that_do_not_apply_are_named_errors():
    # a timm ViT's sizes are fixed by its name: size keys are refused, not dropped
    for key, value in (("depth", 2), ("embed_dim", 64), ("patch_size", 8), ("num_heads", 2), ("mlp_ratio", 2.0)):
        with pytest.raises(ValueError, match=f"takes no argument '{key}'.*fixed by its name"):
            ermoe.create_model("vit_tiny_patch16_224", num_classes=3, **{key: value})
    with pytest.raises(ValueError, match="takes no argument 'pretrained'"):
        ermoe.create_model("vit_tiny", **TINY, pretrained=True)  # built from scratch
    with pytest.raises(ValueError, match="stem_weights .* needs stem"):
        ermoe.create_model("vit_tiny", **TINY, stem_weights="weights.pth")
    with pytest.raises(ValueError, match="capacity_factor does not apply to 'expert_choice'"):
        ermoe.create_model("vit_tiny", **TINY, moe=dict(router="expert_choice", capacity_factor=2.0))


def test_warns_when_last_block_moe_gets_no_gradient():
    with pytest.warns(UserWarning, match="no gradient"):
        ermoe.create_model("vit_tiny", **TINY, global_pool="token", moe=dict(router="ermoe", blocks="all"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ermoe.create_model("vit_tiny", **TINY, global_pool="avg", moe=dict(router="ermoe", blocks="all"))
        ermoe.create_model("vit_tiny", **TINY, global_pool="token", moe=dict(router="ermoe", blocks=[0]))


def test_the_warning_is_right_last_block_moe_is_dead_under_token_pool():
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        model = ermoe.create_model("vit_tiny", **TINY, global_pool="token",
                                   moe=dict(router="softmax_topk", num_experts=4, blocks="all"))
    model(torch.randn(2, 2, 16, 16)).sum().backward()
    first, last = (view.moe for view in model.routed_layers())
    assert first.experts.w1.grad.abs().sum() > 0
    assert last.experts.w1.grad is None or last.experts.w1.grad.abs().sum() == 0


def test_freeze_backbone_trains_only_moe_and_head():
    model = ermoe.create_model("vit_tiny", **TINY, moe=dict(router="emoe", blocks="all"), freeze_backbone=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".branch." in n or n.startswith("head.") for n in trainable)
    assert "head.weight" in trainable and "head.bias" in trainable
    assert any("router" in n for n in trainable) and any("experts" in n for n in trainable)


def test_timm_architecture_by_name_random_weights():
    torch.manual_seed(0)
    model = ermoe.create_model("vit_tiny_patch16_224", num_classes=7, img_size=32, pretrained=False,
                               moe=dict(router="emoe", blocks="last:6"), freeze_backbone=True)
    assert isinstance(model, MoEViT) and len(model.routed_layers()) == 6
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert model.input_normalization(pretrained=False) is None
    mean, std = model.input_normalization(pretrained=True)  # timm's own, for its pretrained weights
    assert len(mean) == len(std) == 3


def test_pca_init_sets_bases_to_the_principal_subspace_of_patch_features():
    torch.manual_seed(0)
    model = ermoe.create_model("vit_tiny", **TINY, moe=dict(router="emoe", blocks=[0, 1],
                                                             router_kwargs={"rank": 4}))
    batches = [(torch.randn(4, 2, 16, 16),) for _ in range(2)]
    assert model.init_routers_from_data(batches) == ["blocks.0.mlp.branch", "blocks.1.mlp.branch"]
    layer = model.routed_layers()[1].layer
    seen = []
    h = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0][:, 1:].reshape(-1, 32)))
    with torch.no_grad():
        for (x,) in batches:
            model.eval()(x)
    h.remove()
    angles = principal_angles(layer.moe.router.basis.matrix.double(), pca_basis(torch.cat(seen).double(), 4))
    assert angles.max() < 1e-3


def test_pca_init_skips_routers_without_bases():
    model = ermoe.create_model("vit_tiny", **TINY, moe=dict(router="softmax_topk", blocks="all"))
    assert model.init_routers_from_data([(torch.randn(2, 2, 16, 16),)]) == []


def test_create_model_checks_values_as_strictly_as_a_config():
    """One checker for config sections, builder arguments and router keywords (ermoe.settings): the Python API
    refuses what a config would."""
    with pytest.raises(ValueError, match=r"create_model\('vit_tiny'\): depth: expected int \| None, got str '4'"):
        create_model("vit_tiny", depth="4")
    with pytest.raises(ValueError, match=r"create_model\('vit_tiny'\): moe.top_k: expected int, got str '2'"):
        create_model("vit_tiny", moe={"router": "ermoe", "top_k": "2"})
    with pytest.raises(ValueError, match=r"create_model\('vit_tiny'\): global_pool: expected one of \['avg'"):
        create_model("vit_tiny", global_pool="mean")
    model = create_model("vit_tiny", num_classes=3, img_size=8, in_chans=1, patch_size=4, depth=2, mlp_ratio=2,
                         moe={"router": "softmax_topk", "num_experts": 2})  # an int is a float; a dict a MoESpec
    assert len(model.routed_layers()) == 1
