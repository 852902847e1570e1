"""The EMoE authors' released checkpoints (ermoe.models.emoe_release): a state dict with exactly their names and
shapes, written here, loads into an ermoe model whose features and logits equal a float64 re-statement of their
routing formula (docs/hub.md); a release of another width or with foreign keys is refused naming it."""

import pytest
import torch
import torch.nn.functional as F

import ermoe
from ermoe.models import ReleaseError
from ermoe.models.emoe_release import release_shape

timm = pytest.importorskip("timm")
VIT, IMG, BRANCHES, EXPERTS, RANK, HIDDEN = "vit_tiny_patch16_224", 32, 6, 4, 128, 192


def release(seed: int = 0) -> dict[str, torch.Tensor]:
    """A release of a timm ViT-tiny (D = 192, 12 blocks) with adapter branches after its last 6 blocks."""
    g = torch.Generator().manual_seed(seed)
    vit = timm.create_model(VIT, pretrained=False, img_size=IMG)
    state = {f"vit.{k}": v.clone() for k, v in vit.state_dict().items()}
    dim = vit.embed_dim
    for i in range(BRANCHES):
        b = f"branches.{i}."
        q, _ = torch.linalg.qr(torch.randn(dim, RANK, generator=g))
        state.update({b + "router.basis.Q": q, b + "router.basis.P": torch.randn(dim, RANK, generator=g),
                      b + "router.basis.log_lambda": torch.randn(RANK, generator=g),
                      b + "router.gamma": 1 + torch.rand(RANK, generator=g),
                      b + "router.masks": torch.randn(EXPERTS, RANK, generator=g),
                      b + "router.bias": 0.1 * torch.randn(EXPERTS, generator=g),
                      b + "alpha": torch.tensor(0.5 + i / 10)})
        for e in range(EXPERTS):
            state[b + f"experts.{e}.down.weight"] = torch.randn(HIDDEN, dim, generator=g) / dim ** 0.5
            state[b + f"experts.{e}.up.weight"] = torch.randn(dim, HIDDEN, generator=g) / HIDDEN ** 0.5
    return state


def reference(state, x, mode, tau):
    """The authors' formula in float64, written out: after each of the last 6 blocks, the patch tokens h get
    h + alpha * sum_e w_e expert_e(h), with z = Q^T h, e = z^2 / (sum z^2 + 1e-6), m = softmax(masks) over experts,
    logits = e . (gamma * m) + bias, p = softmax(logits / tau); w = p (soft) or p on the top-k only."""
    vit = timm.create_model(VIT, pretrained=False, img_size=IMG).double().eval()
    vit.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("vit.")})
    s = {k: v.double() for k, v in state.items()}
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x.double()))))
    first = len(vit.blocks) - BRANCHES
    for j, block in enumerate(vit.blocks):
        h = block(h)
        if j < first:
            continue
        b = f"branches.{j - first}."
        cls, tokens = h[:, :1], h[:, 1:]
        z = tokens @ s[b + "router.basis.Q"]
        energy = z ** 2 / ((z ** 2).sum(-1, keepdim=True) + 1e-6)
        m = s[b + "router.masks"].softmax(dim=0)  # (E, r), over experts
        logits = energy @ (s[b + "router.gamma"][:, None] * m.t()) + s[b + "router.bias"]
        p = (logits / tau).softmax(-1)
        if mode != "soft":
            k = int(mode[-1])
            keep = torch.zeros_like(p).scatter(-1, p.topk(k, dim=-1).indices, 1.0)
            p = p * keep  # the chosen experts' probabilities, not renormalised
        out = sum(p[..., e:e + 1] * (F.gelu(tokens @ s[b + f"experts.{e}.down.weight"].t())
                                      @ s[b + f"experts.{e}.up.weight"].t()) for e in range(EXPERTS))
        h = torch.cat([cls, tokens + s[b + "alpha"] * out], dim=1)
    features = vit.norm(h)
    return features, vit.forward_head(features)


@pytest.mark.parametrize("mode,tau", [("soft", 1.0), ("top1", 1.0), ("top2", 0.5)])
def test_a_release_equals_the_authors_formula(mode, tau):
    torch.manual_seed(0)
    state = release()
    model = ermoe.load_emoe_release(state, vit=VIT, mode=mode, tau=tau, img_size=IMG).double()
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        features_ref, logits_ref = reference(state, x, mode, tau)
        features = model.forward_features(x.double())
        logits = model.forward_head(features)
    torch.testing.assert_close(features, features_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-10, atol=1e-10)
    layer = model.routed_layers()[0]
    assert layer.name == "blocks.6.branch" and layer.moe.router.name == "emoe"


def test_a_release_round_trips_through_the_hub_layout(tmp_path):
    state = release()
    model = ermoe.load_emoe_release(state, vit=VIT, img_size=IMG)
    same = ermoe.from_pretrained(ermoe.save_pretrained(model, tmp_path / "emoe"))
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(model(x), same(x))


def test_releases_that_do_not_fit_are_refused_naming_why(tmp_path):
    state = release()
    assert release_shape(state) == {"branches": 6, "experts": 4, "rank": 128, "dim": 192, "hidden": 192,
                                    "classes": 1000}
    with pytest.raises(ReleaseError, match="the release is 192 wide .*vit_small_patch16_224 is 384 wide"):
        ermoe.load_emoe_release(state, vit="vit_small_patch16_224", img_size=IMG)
    with pytest.raises(ReleaseError, match=r"keys an EMoE release does not have: \['branches.0.router.extra'\]"):
        ermoe.load_emoe_release({**state, "branches.0.router.extra": torch.zeros(1)}, vit=VIT, img_size=IMG)
    with pytest.raises(ReleaseError, match="branches.0.router.masks' is missing|router.masks"):
        ermoe.load_emoe_release({k: v for k, v in state.items() if k != "branches.0.router.masks"}, vit=VIT,
                                img_size=IMG)
    with pytest.raises(ReleaseError, match="mode must be one of"):
        ermoe.load_emoe_release(state, vit=VIT, mode="top3", img_size=IMG)
    with pytest.raises(ReleaseError, match="not an EMoE release"):
        ermoe.load_emoe_release({"head.weight": torch.zeros(2, 2)}, vit=VIT)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    assert isinstance(ermoe.load_emoe_release(tmp_path, vit=VIT, img_size=IMG), ermoe.RoutedModel)
