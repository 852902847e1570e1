"""The public contract of ermoe.MoE for every router: shapes, gradients, determinism, train/eval, edge cases, errors."""

import warnings

import pytest
import torch

import ermoe

D, H, E = 16, 24, 4
ROUTERS = ermoe.list_routers()

# Options that must still give every parameter a gradient.
VARIANTS = [(name, {}) for name in ROUTERS] + [
    ("emoe", {"learn_tau": True, "whiten": True, "standardize": True}),
    ("emoe", {"ortho": "parametrization", "pi_norm": "none"}),
    ("ermoe", {"learn_tau": True, "gate": "prob"}),
    ("ermoe", {"gate": "score"}),
    ("ermoe", {"mutually_orthogonal": True, "standardize": True, "gate": "prob", "learn_tau": True}),
    ("ermoe", {"score": "context", "ortho": "penalty"}),
]


def test_list_routers_names_all_seven():
    assert ROUTERS == ["emoe", "ermoe", "softmax_topk", "loss_free_bias", "vmoe", "cosine", "expert_choice"]


@pytest.mark.parametrize("router,kwargs", VARIANTS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_shape_and_every_parameter_gets_a_gradient(router, kwargs, top_k):
    torch.manual_seed(0)
    layer = ermoe.MoE(D, H, E, router=router, top_k=top_k, router_kwargs=kwargs, expert_bias=True)
    x = torch.randn(3, 40, D, requires_grad=True)
    context = torch.randn_like(x) if kwargs.get("score") == "context" else None
    y = layer(x, context=context)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    (y.pow(2).mean() + ermoe.aux_loss(layer)).backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient for {missing}"
    assert torch.isfinite(x.grad).all()
    info = layer.last_routing
    assert info.num_tokens == 120
    assert int(info.tokens_per_expert.sum()) == info.assignments - info.dropped


def test_emoe_has_learned_alpha_and_its_named_parameters():
    layer = ermoe.MoE(D, H, E, router="emoe")
    names = {n for n, _ in layer.named_parameters()}
    assert {"alpha", "router.basis.weight", "router.gamma", "router.pi", "router.bias"} <= names
    assert "alpha" not in {n for n, _ in ermoe.MoE(D, H, E, router="softmax_topk").named_parameters()}


def test_ermoe_experts_are_eigen_experts():
    layer = ermoe.MoE(32, H, E, router="ermoe", router_kwargs={"rank": 8})
    assert isinstance(layer.experts, ermoe.EigenExperts)
    assert layer.router.basis.matrix.shape == (E, 32, 8)
    assert {"experts.scales", "experts.v", "experts.w2", "experts.c", "experts.d"} <= {
        n for n, _ in layer.named_parameters()}


@pytest.mark.parametrize("router", ROUTERS)
def test_same_seed_same_routing(router):
    def run():
        torch.manual_seed(123)
        layer = ermoe.MoE(D, H, E, router=router, top_k=2)
        x = torch.randn(50, D)
        y = layer(x)
        return y, layer.last_routing.expert_idx

    (y1, idx1), (y2, idx2) = run(), run()
    assert torch.equal(idx1, idx2) and torch.equal(y1, y2)


@pytest.mark.parametrize("router", ROUTERS)
def test_eval_is_deterministic(router):
    torch.manual_seed(0)
    layer = ermoe.MoE(D, H, E, router=router, top_k=2).eval()
    x = torch.randn(50, D)
    assert torch.equal(layer(x), layer(x))


def test_vmoe_noise_only_in_training():
    torch.manual_seed(0)
    layer = ermoe.MoE(D, H, E, router="vmoe", top_k=2, capacity_factor=float("inf"))
    x = torch.randn(200, D)
    layer.train()
    a, b = layer(x), layer(x)
    assert not torch.equal(a, b)
    assert layer.last_routing.drop_rate == 0.0


def test_loss_free_bias_is_not_updated_in_eval():
    torch.manual_seed(0)
    layer = ermoe.MoE(D, H, E, router="loss_free_bias")
    x = torch.randn(64, D)
    layer.eval()
    layer(x)
    ermoe.after_step(layer)
    assert torch.all(layer.router.expert_bias == 0)
    layer.train()
    layer(x)
    ermoe.after_step(layer)
    assert torch.any(layer.router.expert_bias != 0)


def test_standardize_uses_running_statistics_in_eval():
    torch.manual_seed(0)
    layer = ermoe.MoE(D, H, E, router="ermoe", router_kwargs={"standardize": True})
    x = torch.randn(64, D)
    before = layer.router.standardizer.running_mean.clone()
    layer.eval()
    layer(x)
    assert torch.equal(layer.router.standardizer.running_mean, before)  # eval: no update
    layer.train()
    layer(x)
    assert not torch.equal(layer.router.standardizer.running_mean, before)


@pytest.mark.parametrize("router", ROUTERS)
def test_zero_vectors_give_no_nan(router):
    torch.manual_seed(0)
    layer = ermoe.MoE(D, H, E, router=router, top_k=2, router_kwargs={"standardize": True} if router in (
        "emoe", "ermoe") else None)
    x = torch.zeros(8, D, requires_grad=True)
    y = layer(x)
    (y.sum() + ermoe.aux_loss(layer)).backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


@pytest.mark.parametrize("router", ROUTERS)
def test_empty_batch(router):
    layer = ermoe.MoE(D, H, E, router=router, top_k=2)
    x = torch.zeros(2, 0, D, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 0, D)
    (y.sum() + ermoe.aux_loss(layer)).backward()
    assert int(layer.last_routing.tokens_per_expert.sum()) == 0
    assert ermoe.routing_stats(layer)["moe"]["num_tokens"] == 0


def test_bad_input_raises_clear_errors():
    layer = ermoe.MoE(D, H, E)
    with pytest.raises(ValueError, match=r"\(\.\.\., 16\)"):
        layer(torch.randn(4, D + 1))
    with pytest.raises(ValueError, match="floating-point.*int64"):
        layer(torch.ones(4, D, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        layer(torch.full((4, D), float("nan")))
    with pytest.raises(ValueError, match="top_k"):
        ermoe.MoE(D, H, E, top_k=E + 1)
    with pytest.raises(ValueError, match="unknown router 'nope'.*ermoe"):
        ermoe.MoE(D, H, E, router="nope")
    with pytest.raises(ValueError, match="router 'softmax_topk'.*rank"):
        ermoe.MoE(D, H, E, router="softmax_topk", router_kwargs={"rank": 4})
    with pytest.raises(ValueError, match="num_experts"):
        ermoe.MoE(D, H, 0)
    with pytest.raises(ValueError, match="capacity_factor"):
        ermoe.MoE(D, H, E, capacity_factor=0)
    with pytest.raises(ValueError, match="context"):
        ermoe.MoE(D, H, E, router="softmax_topk")(torch.randn(4, D), context=torch.randn(4, D))
    with pytest.raises(ValueError, match="needs a context"):
        ermoe.MoE(D, H, E, router="ermoe", router_kwargs={"score": "context"})(torch.randn(4, D))
    with pytest.raises(ValueError, match=r"router 'emoe': ortho: expected one of \['qr', 'parametrization', 'penalty'\], got 'svd'"):
        ermoe.MoE(D, H, E, router="emoe", router_kwargs={"ortho": "svd"})
    with pytest.raises(ValueError, match="temperature"):
        ermoe.MoE(D, H, E, router="ermoe", router_kwargs={"tau": 0.0})
    with pytest.raises(ValueError, match=r"router 'emoe': rank: expected int \| None, got str '8'"):
        ermoe.MoE(D, H, E, router="emoe", router_kwargs={"rank": "8"})
    # a string is not a bool (it would be truthy), a bool is not a number
    with pytest.raises(ValueError, match="router 'ermoe': standardize: expected bool, got str 'false'"):
        ermoe.MoE(D, H, E, router="ermoe", router_kwargs={"standardize": "false"})
    with pytest.raises(ValueError, match="router 'emoe': tau: expected float, got bool True"):
        ermoe.MoE(D, H, E, router="emoe", router_kwargs={"tau": True})
    with pytest.raises(ValueError, match=r"rank must be in \[1, dim\)"):
        ermoe.MoE(D, H, E, router="ermoe", router_kwargs={"rank": D + 1})
    with pytest.raises(ValueError, match="same score"):  # a full basis: every Eigenbasis Score is 1, a tie
        ermoe.MoE(D, H, E, router="ermoe", router_kwargs={"rank": D})
    with pytest.raises(ValueError, match="learn_tau=True needs gate='prob'"):
        ermoe.MoE(D, H, E, router="ermoe", router_kwargs={"learn_tau": True})


def test_settings_that_do_not_apply_raise():
    # expert choice sets its own capacity: the layer's capacity_factor would be silently ignored
    with pytest.raises(ValueError, match="capacity_factor does not apply to 'expert_choice'.*router_kwargs"):
        ermoe.MoE(D, H, E, router="expert_choice", capacity_factor=2.0)
    ermoe.MoE(D, H, E, router="expert_choice", router_kwargs={"capacity_factor": 2.0})  # its own keyword
    # ERMoE's threshold never drops a token's top selection: with top-1 it would do nothing
    with pytest.raises(ValueError, match="threshold applies only with top_k > 1"):
        ermoe.MoE(D, H, E, router="ermoe", router_kwargs={"threshold": 0.5})
    ermoe.MoE(D, H, E, router="ermoe", top_k=2, router_kwargs={"threshold": 0.5})


def test_learned_alpha_follows_the_router_given_by_name_or_instance():
    by_name = ermoe.MoE(D, H, E, router="emoe")
    by_instance = ermoe.MoE(D, H, E, router=ermoe.create_router("emoe", D, E))
    assert by_name.alpha is not None and by_instance.alpha is not None  # EMoE's alpha, however the router comes
    assert ermoe.MoE(D, H, E, router=ermoe.create_router("ermoe", D, E)).alpha is None
    assert ermoe.MoE(D, H, E, router=ermoe.create_router("emoe", D, E), learn_alpha=False).alpha is None


def test_aux_loss_and_stats_collect_every_layer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(ermoe.MoE(D, H, E, router="softmax_topk"), torch.nn.GELU(),
                                ermoe.MoE(D, H, E, router="vmoe"), ermoe.MoE(D, H, E, router="expert_choice"))
    assert ermoe.aux_loss(model).item() == 0.0  # nothing ran yet
    model(torch.randn(32, D))
    expected = sum(model[i].aux_loss() for i in (0, 2))
    assert torch.allclose(ermoe.aux_loss(model), expected) and ermoe.aux_loss(model).requires_grad
    stats = ermoe.routing_stats(model)
    assert set(stats) == {"0", "2", "3"}
    for s in stats.values():
        assert {"tokens_per_expert", "load_cv", "max_over_mean", "entropy", "gini", "drop_rate"} <= set(s)
    assert stats["3"]["load_cv"] == 0.0  # expert choice is balanced by construction
    assert ermoe.aux_loss(torch.nn.Linear(2, 2)).shape == ()


def test_init_from_features_sets_pca_bases():
    torch.manual_seed(0)
    features = torch.randn(500, D) * torch.linspace(3, 0.1, D)
    emoe = ermoe.MoE(D, H, E, router="emoe", router_kwargs={"rank": 4})
    emoe.init_from_features(features)
    top = ermoe.pca_basis(features, 4)
    assert ermoe.principal_angles(emoe.router.basis.matrix.detach(), top).max() < 1e-3
    erm = ermoe.MoE(D, H, E, router="ermoe", router_kwargs={"rank": 4})
    erm.init_from_features(features)
    top = ermoe.pca_basis(features, 16)
    u = erm.router.basis.matrix.detach()
    for e in range(E):  # round-robin: expert e gets directions e, e+E, ...
        assert ermoe.principal_angles(u[e], top[:, e::E]).max() < 1e-3
    with pytest.raises(ValueError, match="num_experts\\*rank <= dim"):
        ermoe.MoE(D, H, E, router="ermoe", router_kwargs={"rank": 5}).init_from_features(features)
    with pytest.raises(NotImplementedError):
        ermoe.MoE(D, H, E, router="softmax_topk").init_from_features(features)


def test_emoe_reestimates_basis_from_running_second_moment():
    torch.manual_seed(0)
    layer = ermoe.MoE(D, H, E, router="emoe", router_kwargs={"rank": 3, "reestimate_every": 2,
                                                              "stats_momentum": 1.0})
    x = torch.randn(400, D) * torch.linspace(5, 0.1, D)
    for _ in range(2):
        layer(x)
        ermoe.after_step(layer)
    assert ermoe.principal_angles(layer.router.basis.matrix.detach(), ermoe.pca_basis(x, 3)).max() < 1e-3


def test_emoe_reestimate_cadence_follows_a_loaded_step_count():
    # The step count is mirrored on the host (no device read per step); a loaded state dict resets the mirror, so a
    # resumed layer re-estimates on the same steps as an uninterrupted one.
    torch.manual_seed(0)
    kwargs = {"rank": 3, "reestimate_every": 3, "stats_momentum": 1.0}
    first, resumed = (ermoe.MoE(D, H, E, router="emoe", router_kwargs=kwargs) for _ in range(2))
    x = torch.randn(400, D) * torch.linspace(5, 0.1, D)
    for _ in range(2):
        first(x)
        ermoe.after_step(first)
    resumed(x)
    ermoe.after_step(resumed)  # its mirror now says 1 step
    resumed.load_state_dict(first.state_dict())  # ... and the loaded count says 2
    before = resumed.router.basis.matrix.detach().clone()
    resumed(x)
    ermoe.after_step(resumed)  # step 3: re-estimated
    assert int(resumed.router.steps) == 3
    assert not torch.allclose(resumed.router.basis.matrix.detach(), before, atol=1e-4)
    assert ermoe.principal_angles(resumed.router.basis.matrix.detach(), ermoe.pca_basis(x, 3)).max() < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("router", ROUTERS)
def test_cuda_matches_cpu(router):
    torch.manual_seed(0)
    layer = ermoe.MoE(D, H, E, router=router, top_k=2).eval()
    x = torch.randn(64, D)
    y_cpu = layer(x)
    y_gpu = layer.cuda()(x.cuda())
    assert torch.allclose(y_gpu.cpu(), y_cpu, atol=1e-4)


@pytest.mark.parametrize("router,kwargs", VARIANTS)
def test_bfloat16_module_and_autocast(router, kwargs):
    torch.manual_seed(0)
    layer = ermoe.MoE(D, H, E, router=router, top_k=2, router_kwargs=kwargs)
    x = torch.randn(40, D)
    context = torch.randn_like(x) if kwargs.get("score") == "context" else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, context=context)
    assert y.dtype == x.dtype and torch.isfinite(y).all()
    half = layer.to(torch.bfloat16)
    xb = x.to(torch.bfloat16).requires_grad_()
    y = half(xb, context=None if context is None else context.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    y.float().sum().backward()
    assert torch.isfinite(xb.grad.float()).all()


@pytest.mark.parametrize("router", ermoe.list_routers())
def test_a_trained_layer_can_be_deep_copied_and_pickled(router):
    """EMA copies and best-model snapshots: the last forward's graph (auxiliary loss) is not part of a copy."""
    import copy
    import pickle

    torch.manual_seed(0)
    layer = ermoe.MoE(D, H, E, router=router)
    layer.train()
    y = layer(torch.randn(10, D))
    twin = copy.deepcopy(layer)
    pickle.loads(pickle.dumps(layer))
    (y.sum() + ermoe.aux_loss(layer)).backward()  # the original keeps its graph for the step
    layer.eval()
    twin.eval()
    x = torch.randn(6, D)
    torch.testing.assert_close(twin(x), layer(x))


@pytest.mark.parametrize("router", ["emoe", "ermoe"])
def test_huge_finite_inputs_give_finite_eigen_routing(router):
    torch.manual_seed(0)
    layer = ermoe.MoE(D, H, E, router=router).eval()
    x = torch.randn(10, D)
    small = layer.router(x)
    huge = layer.router(x * 1e19)  # squares overflow float32; cosines and energy fractions are scale-free
    assert torch.isfinite(huge.probs_TE).all()
    torch.testing.assert_close(huge.probs_TE, small.probs_TE, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(layer(x * 1e19)).all()


@pytest.mark.parametrize("router", ermoe.list_routers())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_to_a_float32_layer(router, dtype):
    """One behaviour for every router: the layer computes in its own dtype, the output has the input's."""
    torch.manual_seed(0)
    layer = ermoe.MoE(D, H, E, router=router).eval()
    x = torch.randn(10, D).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, layer(x.float()).to(dtype))


def test_torch_compile_traces_quietly_and_keeps_grouped_mm(caplog):
    from ermoe import experts as experts_mod

    torch.manual_seed(0)
    layer = ermoe.MoE(D, H, E, router="softmax_topk")
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(12, D)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = compiled(x)
        y.sum().backward()
    torch.testing.assert_close(y, layer(x))
    assert not [w for w in caught if "ermoe" in w.filename]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # no failed meta call of grouped_mm logged
    assert not experts_mod._grouped_unsupported  # eager keeps grouped_mm


def test_default_eigen_rank_never_spans_the_token_space():
    from ermoe.routing.eigenbasis import default_eigen_rank

    # min(32, D // E) down to a multiple of 4, at least 4; below D (small D: D // E)
    assert [default_eigen_rank(d, e) for d, e in [(96, 8), (32, 4), (8, 4), (256, 4), (4, 4), (4, 2), (3, 1)]] == \
        [12, 8, 4, 32, 1, 2, 2]
