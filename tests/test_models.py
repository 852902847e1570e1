"""ViTs with MoE layers: every registered model and placement runs, trains every parameter, and leaves the class
token to the dense path."""

import copy
import warnings

import pytest
import torch

import ermoe
from ermoe.models import MoESpec, PatchMoE, init_moe_from_data, list_models, patch_moe_layers, select_blocks
from ermoe.orthogonal import pca_basis, principal_angles

TINY = dict(num_classes=5, img_size=16, patch_size=4, in_chans=2, depth=2, embed_dim=32, num_heads=2)


def _all_params_get_grad(model):
    x = torch.randn(3, 2, 16, 16)
    out = model(x)
    assert out.shape == (3, 5)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_forward_and_grad(name):
    torch.manual_seed(0)
    _all_params_get_grad(ermoe.create_model(name, **TINY, moe=dict(router="ermoe", num_experts=4, blocks="all")))


def test_registered_sizes_are_the_vit_papers():
    model = ermoe.create_model("vit_small", num_classes=3, img_size=32, patch_size=16, depth=1)
    assert model.embed_dim == 384 and model.blocks[0].attn.num_heads == 6


@pytest.mark.parametrize("router", ["dense"] + ermoe.list_routers())
@pytest.mark.parametrize("placement", ["replace", "parallel", "post-block"])
def test_every_router_and_placement(router, placement):
    torch.manual_seed(0)
    model = ermoe.create_model("vit_tiny", **TINY, moe=dict(router=router, num_experts=4, placement=placement,
                                                             blocks="all"))
    assert len(patch_moe_layers(model)) == (0 if router == "dense" else 2)
    _all_params_get_grad(model)


def test_context_score_gets_the_blocks_attention_output():
    torch.manual_seed(0)
    model = ermoe.create_model("vit_tiny", **TINY, moe=dict(router="ermoe", num_experts=4, blocks="all",
                                                             router_kwargs={"score": "context"}))
    _all_params_get_grad(model)


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
    assert patch_moe_layers(model)[0][1].moe.last_routing.num_tokens == 3 * 16


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
    (first, l0), (last, l1) = patch_moe_layers(model)
    assert l0.moe.experts.w1.grad.abs().sum() > 0
    assert l1.moe.experts.w1.grad is None or l1.moe.experts.w1.grad.abs().sum() == 0


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
    assert len(patch_moe_layers(model)) == 6
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_pca_init_sets_bases_to_the_principal_subspace_of_patch_features():
    torch.manual_seed(0)
    model = ermoe.create_model("vit_tiny", **TINY, moe=dict(router="emoe", blocks=[0, 1],
                                                             router_kwargs={"rank": 4}))
    batches = [torch.randn(4, 2, 16, 16) for _ in range(2)]
    assert init_moe_from_data(model, batches) == ["blocks.0.mlp.branch", "blocks.1.mlp.branch"]
    name, layer = patch_moe_layers(model)[1]
    seen = []
    h = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0][:, 1:].reshape(-1, 32)))
    with torch.no_grad():
        for x in batches:
            model.eval()(x)
    h.remove()
    angles = principal_angles(layer.moe.router.basis.matrix.double(), pca_basis(torch.cat(seen).double(), 4))
    assert angles.max() < 1e-3


def test_pca_init_skips_routers_without_bases():
    model = ermoe.create_model("vit_tiny", **TINY, moe=dict(router="softmax_topk", blocks="all"))
    assert init_moe_from_data(model, [torch.randn(2, 2, 16, 16)]) == []
