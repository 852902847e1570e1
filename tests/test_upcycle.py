"""Sparse upcycling (ermoe.upcycle, issue 25): MLP experts start as copies of the dense FFN, so an upcycled model
computes the dense model's output wherever the gates sum to one (timm, torchvision, Hugging Face and ermoe's own
models, in float64); ERMoE's eigen experts from the FFN's SVD against a slow reference; the errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ermoe
from ermoe.models import UpcycledMoE, find_dense_ffns
from ermoe.models.upcycling import eigen_bases

# Routers whose gates sum to one per token: top-1 and top-2 with renormalised gates, EMoE's renormalised gate.
SUM_TO_ONE = [("softmax_topk", 1, {"renormalize": True}), ("softmax_topk", 2, {"renormalize": True}),
              ("loss_free_bias", 1, {"renormalize": True}), ("emoe", 1, {"gate": "renormalized"})]


def _holder(dim: int, hidden: int, **kwargs) -> nn.Module:
    """A module whose one child ``ffn`` is a timm Mlp (float64): the smallest model upcycle can work on."""
    from timm.layers import Mlp
    net = nn.Sequential()
    net.ffn = Mlp(dim, hidden, **kwargs).double()
    return net


def _timm_vit():
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=5)


def _torchvision_vit():
    from torchvision.models import VisionTransformer
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=5)


def _hf_vit():
    pytest.importorskip("transformers")
    from transformers import ViTConfig, ViTModel
    return ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              image_size=32, patch_size=8, num_channels=3), add_pooling_layer=False)


def _hf_bert():
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=16), add_pooling_layer=False)


def _ermoe_vit():
    return ermoe.create_model("vit_tiny", num_classes=5, img_size=28, in_chans=1, patch_size=7, depth=2,
                              embed_dim=32, num_heads=2, moe=None)


def _sfcn():
    return ermoe.create_model("sfcn3d", in_chans=1, volume_shape=(16, 16, 16), num_outputs=1, channels=[4, 8, 8],
                              moe=None, dense_ffn=True, moe_stages=[1])


def _dual():
    return ermoe.create_model("dual_encoder", img_size=16, in_chans=1, vocab_size=30, context_length=8,
                              image={"name": "vit_tiny", "embed_dim": 32, "num_heads": 2, "depth": 2,
                                     "patch_size": 8},
                              text={"width": 32, "depth": 2, "num_heads": 2}, embed_dim=16)


def _images(channels: int, size: int):
    return lambda g: (torch.randn(3, channels, size, size, generator=g, dtype=torch.float64),)


def _ids(g):
    ids = torch.randint(1, 50, (3, 10), generator=g)
    ids[0, 7:] = 0  # padding, masked by the attention mask
    return (ids, torch.ones_like(ids).masked_fill(ids == 0, 0))


def _captioned(g):
    ids = torch.randint(1, 30, (3, 8), generator=g)
    ids[1, 5:] = 0  # the text tower's padding
    return (torch.randn(3, 1, 16, 16, generator=g, dtype=torch.float64), ids)


# name -> (builder, inputs from a generator, output -> tensor, FFNs found)
FAMILIES = {
    "timm": (_timm_vit, _images(3, 32), lambda out: out, 2),
    "torchvision": (_torchvision_vit, _images(3, 32), lambda out: out, 2),
    "hf_vit": (_hf_vit, _images(3, 32), lambda out: out.last_hidden_state, 2),
    "hf_bert": (_hf_bert, lambda g: _ids(g), lambda out: out.last_hidden_state, 2),
    "ermoe_vit": (_ermoe_vit, _images(1, 28), lambda out: out, 2),
    "ermoe_sfcn": (_sfcn, lambda g: (torch.randn(2, 1, 16, 16, 16, generator=g, dtype=torch.float64),),
                   lambda out: out, 1),
    "ermoe_dual": (_dual, _captioned, lambda out: torch.cat([out[0], out[1]], dim=1), 4),
}


def _forward(model, inputs, family):
    if family == "hf_bert":
        return model(input_ids=inputs[0], attention_mask=inputs[1])
    return model(*inputs)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("router,top_k,kwargs", SUM_TO_ONE, ids=[f"{r}-top{k}" for r, k, _ in SUM_TO_ONE])
def test_upcycled_model_equals_the_dense_one_at_step_zero(family, router, top_k, kwargs):
    build, make_inputs, tensor_of, num_ffns = FAMILIES[family]
    torch.manual_seed(0)
    dense = build().double().eval()
    g = torch.Generator().manual_seed(1)
    inputs = make_inputs(g)
    assert len(find_dense_ffns(dense)) == num_ffns
    with torch.no_grad():
        want = tensor_of(_forward(dense, inputs, family))
    model = copy.deepcopy(dense)
    extra = {}
    if router == "emoe":  # its shared basis from the PCA of each layer's input features
        batch = {"input_ids": inputs[0], "attention_mask": inputs[1]} if family == "hf_bert" else inputs
        extra["sample_inputs"] = [batch]
    ermoe.upcycle(model, router, 4, top_k=top_k, blocks="all", **kwargs, **extra)
    layers = ermoe.moe_layers(model)
    assert len(layers) == num_ffns and all(layer.num_experts == 4 for _, layer in layers)
    with torch.no_grad():
        got = tensor_of(_forward(model.eval(), inputs, family))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if family != "hf_bert":
        assert all(layer.last_routing is not None for _, layer in layers)  # the MoE layers ran


def test_gates_that_do_not_sum_to_one_scale_the_dense_output():
    # Switch's top-1 gate is the softmax probability p < 1: an upcycled layer returns p * FFN(x) per token.
    torch.manual_seed(0)
    mlp = _holder(8, 16)
    x = torch.randn(20, 8, dtype=torch.float64)
    want = mlp.ffn(x)
    ermoe.upcycle(mlp, "softmax_topk", 4)
    layer = mlp.ffn
    assert isinstance(layer, UpcycledMoE)
    got = layer(x)
    gates = layer.moe.last_routing.gates[:, 0]
    torch.testing.assert_close(got, gates.unsqueeze(-1) * want, rtol=1e-10, atol=1e-12)


def _reference_eigen(x, w1, b1, w2, b2, u_EDR):
    """Slow and obvious: the expert whose basis holds most of the token's energy, fed the token's projection onto
    that basis: ``W2 gelu(W1 U_e U_e^T x + b1) + b2``."""
    out = []
    for token in x:
        energy = torch.stack([(u.T @ token).norm() for u in u_EDR])
        u = u_EDR[int(energy.argmax())]
        out.append(w2 @ F.gelu(w1 @ (u @ (u.T @ token)) + b1) + b2)
    return torch.stack(out)


@pytest.mark.parametrize("bases", ["split", "shared"])
def test_eigen_experts_compute_the_dense_ffn_on_their_basis(bases):
    torch.manual_seed(0)
    dim, hidden, experts, rank = 16, 24, 4, 3
    net = _holder(dim, hidden)
    w1, b1 = net.ffn.fc1.weight.detach().clone(), net.ffn.fc1.bias.detach().clone()
    w2, b2 = net.ffn.fc2.weight.detach().clone(), net.ffn.fc2.bias.detach().clone()
    x = torch.randn(30, dim, dtype=torch.float64)
    ermoe.upcycle(net, "ermoe", experts, bases=bases, rank=rank)
    moe = net.ffn.moe
    u = moe.router.basis.matrix.detach()
    # The bases are W1's top right-singular directions: dealt round-robin (split) or the top R for all (shared).
    _, s, vh = torch.linalg.svd(w1, full_matrices=False)
    for e in range(experts):
        top = vh.T[:, e:experts * rank:experts] if bases == "split" else vh.T[:, :rank]
        assert ermoe.principal_angles(u[e], top).max() < 1e-6
        want_scales = s[e:experts * rank:experts] if bases == "split" else s[:rank]
        torch.testing.assert_close(moe.experts.scales.detach()[e], want_scales)
    got = net.ffn(x)
    if bases == "split":
        torch.testing.assert_close(got, _reference_eigen(x, w1, b1, w2, b2, u), rtol=1e-10, atol=1e-10)
    else:  # a tie between identical bases: whichever expert wins computes the same rank-R FFN
        u0 = u[:1]
        torch.testing.assert_close(got, _reference_eigen(x, w1, b1, w2, b2, u0), rtol=1e-10, atol=1e-10)


def test_eigen_experts_at_full_rank_equal_the_dense_ffn():
    # hidden < dim: R = hidden directions span W1's row space, so U U^T x loses nothing W1 sees.
    torch.manual_seed(0)
    net = _holder(12, 6)
    x = torch.randn(10, 12, dtype=torch.float64)
    want = net.ffn(x)
    ermoe.upcycle(net, "ermoe", 2, bases="shared", rank=6)
    torch.testing.assert_close(net.ffn(x), want, rtol=1e-10, atol=1e-10)


def test_upcycled_foreign_model_trains_with_the_moe_helpers():
    torch.manual_seed(0)
    model = _timm_vit()
    ermoe.upcycle(model, "softmax_topk", 4, blocks="last:1", balance_weight=0.01)
    assert [name for name, _ in ermoe.moe_layers(model)] == ["blocks.1.mlp.moe"]
    out = model(torch.randn(2, 3, 32, 32))
    loss = out.square().mean() + ermoe.aux_loss(model)
    loss.backward()
    experts = model.blocks[1].mlp.moe.experts
    assert experts.w1.grad is not None and experts.w1.grad.abs().sum() > 0
    stats = ermoe.routing_stats(model)["blocks.1.mlp.moe"]
    assert sum(stats["tokens_per_expert"]) == 2 * 17  # every token of both images, the class token included
    ermoe.after_step(model)


def test_upcycle_errors_name_the_problem():
    with pytest.raises(ValueError, match="found no dense FFN"):
        ermoe.upcycle(nn.Linear(4, 4), "softmax_topk", 2)
    net = _holder(16, 32)
    with pytest.raises(ValueError, match="bases applies to ERMoE"):
        ermoe.upcycle(copy.deepcopy(net), "softmax_topk", 2, bases="shared")
    with pytest.raises(ValueError, match="pass sample_inputs"):
        ermoe.upcycle(copy.deepcopy(net), "emoe", 2)
    with pytest.raises(ValueError, match="takes none"):
        ermoe.upcycle(copy.deepcopy(net), "softmax_topk", 2, sample_inputs=[(torch.randn(2, 16),)])
    with pytest.raises(ValueError, match=r"num_experts\*rank = 20 <= min\(hidden, dim\) = 16"):
        ermoe.upcycle(copy.deepcopy(net), "ermoe", 4, rank=5)
    with pytest.raises(ValueError, match="block index 3 out of range"):
        ermoe.upcycle(copy.deepcopy(net), "softmax_topk", 2, blocks=[3])
    with pytest.raises(ValueError, match="normalises its hidden features"):
        ermoe.upcycle(_holder(16, 32, norm_layer=nn.LayerNorm), "softmax_topk", 2)


def test_eigen_bases_are_orthonormal_and_disjoint_when_split():
    w1 = torch.randn(40, 24, dtype=torch.float64)
    u = eigen_bases(w1, 4, 6, "split")
    joint = u.permute(1, 0, 2).reshape(24, 24)
    torch.testing.assert_close(joint.T @ joint, torch.eye(24, dtype=torch.float64), atol=1e-10, rtol=0)
