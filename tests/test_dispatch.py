"""Dispatch and the whole layer against a slow per-token loop in float64: values and gradients, with and without drops."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import ermoe
from ermoe.dispatch import TokenChoicePlan, expert_capacity
from ermoe.experts import EigenExperts, MLPExperts, grouped_matmul

D, H, E = 8, 12, 4


def expert_forward(experts, e, inp):
    """One expert on one row, written out."""
    if isinstance(experts, EigenExperts):
        h = experts.v[e] @ (experts.scales[e] * inp) + experts.c[e]  # V_e (s_e * z) + c_e
        return experts.w2[e] @ F.gelu(h) + experts.d[e]
    h = experts.w1[e] @ inp
    if experts.b1 is not None:
        h = h + experts.b1[e]
    y = experts.w2[e] @ F.gelu(h)
    return y + experts.b2[e] if experts.b2 is not None else y


def reference_keep(route, num_experts, capacity):
    """Which (t, k) selections an expert computes: first choices before second, by priority or token order."""
    idx = route.topk_idx_TK
    num_tokens, k = idx.shape
    keep = torch.ones_like(idx, dtype=torch.bool) if route.keep_TK is None else route.keep_TK.clone()
    if capacity is None:
        return keep
    used = [0] * num_experts
    for j in range(k):
        order = list(range(num_tokens))
        if route.priority_TK is not None:
            order = sorted(order, key=lambda t: (-float(route.priority_TK[t, j]), t))
        for t in order:
            if not keep[t, j]:
                continue
            e = int(idx[t, j])
            keep[t, j] = used[e] < capacity
            used[e] += int(keep[t, j])
    return keep


def reference_layer(layer, x_TD, route):
    """y_t = alpha * sum over kept selections of gate * Expert_e(input), one token at a time."""
    rows = []
    if route.expert_choice:
        out = [x_TD.new_zeros(D) for _ in range(x_TD.shape[0])]
        for e in range(route.token_idx_EC.shape[0]):
            for c in range(route.token_idx_EC.shape[1]):
                t = int(route.token_idx_EC[e, c])
                out[t] = out[t] + route.gates_EC[e, c] * expert_forward(layer.experts, e, x_TD[t])
        rows = out
    else:
        cap = None if layer.capacity_factor is None else expert_capacity(
            layer.capacity_factor, x_TD.shape[0], layer.top_k, layer.num_experts)
        keep = reference_keep(route, layer.num_experts, cap)
        for t in range(x_TD.shape[0]):
            y = x_TD.new_zeros(D)
            for j in range(layer.top_k):
                if keep[t, j]:
                    e = int(route.topk_idx_TK[t, j])
                    inp = x_TD[t] if route.expert_inputs_TKR is None else route.expert_inputs_TKR[t, j]
                    y = y + route.gates_TK[t, j] * expert_forward(layer.experts, e, inp)
            rows.append(y)
    y = torch.stack(rows)
    return layer.alpha * y if layer.alpha is not None else y


CASES = [
    ("softmax_topk", 1, None, {}),
    ("softmax_topk", 2, None, {}),
    ("softmax_topk", 2, 0.75, {}),        # capacity drops, token order
    ("vmoe", 2, None, {}),                # router default capacity 1.05, BPR
    ("vmoe", 1, 0.5, {}),                 # heavy drops, BPR
    ("loss_free_bias", 2, None, {}),
    ("cosine", 2, None, {}),
    ("expert_choice", 1, None, {}),
    ("expert_choice", 2, None, {"capacity_factor": 0.5}),
    ("emoe", 1, None, {"rank": 4}),
    ("emoe", 2, None, {"rank": 4, "whiten": True, "standardize": True}),
    ("ermoe", 1, None, {"rank": 3}),
    ("ermoe", 2, None, {"rank": 3, "gate": "score", "threshold": 0.3}),
    ("ermoe", 2, 0.6, {"rank": 3}),       # capacity drops with eigen experts
]


@pytest.mark.parametrize("router,top_k,capacity,kwargs", CASES)
def test_layer_matches_per_token_loop(router, top_k, capacity, kwargs):
    torch.manual_seed(0)
    layer = ermoe.MoE(D, H, E, router=router, top_k=top_k, capacity_factor=capacity,
                      router_kwargs=kwargs).double()
    if router in ("emoe", "ermoe", "loss_free_bias"):
        layer.train()
        layer(torch.randn(64, D, dtype=torch.float64))  # move running statistics away from their init
        layer.eval()
    x = torch.randn(2, 15, D, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 15, D, dtype=torch.float64)
    torch.manual_seed(1)
    y = layer(x)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * grad_out).sum(), [x, *params], allow_unused=True)
    torch.manual_seed(1)
    route = layer.router(x.reshape(-1, D))
    y_ref = reference_layer(layer, x.reshape(-1, D), route).view_as(y)
    assert torch.allclose(y, y_ref, atol=1e-12, rtol=1e-10)
    grads_ref = torch.autograd.grad((y_ref * grad_out).sum(), [x, *params], allow_unused=True)
    for (name, _), g, g_ref in zip([("x", x), *layer.named_parameters()], grads, grads_ref):
        if g_ref is None:
            assert g is None or torch.all(g == 0), name
        else:
            assert torch.allclose(g, g_ref, atol=1e-12, rtol=1e-10), name
    if capacity is not None or router == "vmoe":
        info = layer.last_routing
        cap = expert_capacity(layer.capacity_factor, 30, top_k, E)
        assert (info.tokens_per_expert <= cap).all()
        assert info.dropped == int((info.expert_idx < 0).sum())


def test_plan_with_capacity_by_hand():
    # 5 tokens, top-1, capacity 2: expert 0 is chosen by tokens 0, 1, 3, 4 -> tokens 3 and 4 dropped (token order)
    idx = torch.tensor([[0], [0], [1], [0], [0]])
    plan = TokenChoicePlan(idx, 2, capacity=2)
    assert plan.counts_E.tolist() == [2, 1] and plan.num_dropped == 2
    assert plan.dropped_TK()[:, 0].tolist() == [False, False, False, True, True]
    # with priorities (BPR) the two highest-priority tokens of expert 0 win instead
    prio = torch.tensor([[0.1], [0.2], [0.9], [0.8], [0.7]])
    plan = TokenChoicePlan(idx, 2, capacity=2, priority_TK=prio)
    assert plan.dropped_TK()[:, 0].tolist() == [True, True, False, False, False]


def test_plan_first_choices_fill_capacity_before_second_choices():
    # capacity 2. Expert 0: first choice of tokens 1, 2, second choice of token 0 -> token 0's second is dropped.
    # Expert 1: first choice of token 0, second choices of tokens 1, 2 -> token 1's second stays, token 2's goes.
    idx = torch.tensor([[1, 0], [0, 1], [0, 1]])
    plan = TokenChoicePlan(idx, 2, capacity=2)
    assert plan.dropped_TK().tolist() == [[False, True], [False, False], [False, True]]


def test_dispatch_then_combine_is_identity_with_unit_gates():
    torch.manual_seed(0)
    idx = torch.randint(0, 5, (40, 2))
    plan = TokenChoicePlan(idx, 5)
    x = torch.randn(40, 6, dtype=torch.float64)
    out = plan.combine(plan.dispatch(x), torch.full((40, 2), 0.5, dtype=torch.float64))
    assert torch.allclose(out, x)
    counts = torch.bincount(idx.reshape(-1), minlength=5)
    assert plan.counts_E.tolist() == counts.tolist()
    rows = plan.dispatch(x)  # rows come grouped by expert
    starts = [0] + torch.cumsum(counts, 0).tolist()
    for e in range(5):
        block = rows[starts[e]:starts[e + 1]]
        tokens = [t for t in range(40) for j in range(2) if idx[t, j] == e]
        assert torch.equal(block, x[tokens])


@pytest.mark.parametrize("dims", [(16, 24), (6, 10)])  # aligned; unaligned: K and N zero-padded for grouped_mm
def test_grouped_matmul_matches_loop(dims, monkeypatch):
    from ermoe import experts as experts_mod

    calls = []
    apply = experts_mod._GroupedMM.apply
    monkeypatch.setattr(experts_mod._GroupedMM, "apply", lambda x, w, offs: calls.append(x.shape) or apply(x, w, offs))
    k, n = dims
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 7, 3])
    x = torch.randn(15, k, requires_grad=True)
    w = torch.randn(4, n, k, requires_grad=True)
    y = grouped_matmul(x, w, counts)
    g = torch.randn(15, n)
    gx, gw = torch.autograd.grad((y * g).sum(), [x, w])
    starts = [0, 5, 5, 12, 15]
    y_ref = torch.cat([x[starts[e]:starts[e + 1]] @ w[e].T for e in range(4)])
    gx_ref, gw_ref = torch.autograd.grad((y_ref * g).sum(), [x, w])
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(gx, gx_ref, atol=1e-5) and torch.allclose(gw, gw_ref, atol=1e-5)
    assert torch.all(gw[1] == 0)  # an expert with no rows gets a zero gradient
    assert calls == [(15, 16 if k == 16 else 8)]  # grouped_mm, K padded to 16 bytes (4 floats) where unaligned
    # backward with a non-contiguous (stride-0) incoming gradient
    grouped_matmul(x, w, counts).sum().backward()


def test_experts_bias_options():
    torch.manual_seed(0)
    counts = torch.tensor([3, 2])
    x = torch.randn(5, D, dtype=torch.float64)
    experts = MLPExperts(2, D, H, bias=True).double()
    with torch.no_grad():
        experts.b1.normal_()
        experts.b2.normal_()
    y = experts(x, counts)
    rows = [expert_forward(experts, 0 if i < 3 else 1, x[i]) for i in range(5)]
    assert torch.allclose(y, torch.stack(rows))


def test_grouped_matmul_falls_back_only_when_unsupported_and_warns_once(monkeypatch):
    from ermoe import experts as experts_mod

    x, w, counts = torch.randn(16, 16), torch.randn(2, 8, 16), torch.tensor([9, 7])
    expected = torch.cat([x[:9] @ w[0].T, x[9:] @ w[1].T])

    def fail(err):
        def grouped_mm(*args, **kwargs):
            raise err
        return grouped_mm

    # a real error (out of memory, or any other) propagates and leaves grouped_mm on
    for err in (torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("illegal memory access")):
        monkeypatch.setattr(experts_mod.F, "grouped_mm", fail(err))
        with pytest.raises(type(err)):
            grouped_matmul(x, w, counts)
        assert not experts_mod._grouped_unsupported
    # no kernel for this device/dtype: the loop, the same values, one warning
    monkeypatch.setattr(experts_mod, "_grouped_unsupported", set())
    monkeypatch.setattr(experts_mod.F, "grouped_mm", fail(NotImplementedError("no kernel for 'CPU'")))
    with pytest.warns(RuntimeWarning, match="loop of matmuls"):
        torch.testing.assert_close(grouped_matmul(x, w, counts), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(grouped_matmul(x, w, counts), expected)  # no second warning
    assert experts_mod._grouped_unsupported == {("cpu", torch.float32)}


def test_the_dispatched_copy_is_gathered_again_for_backward_not_kept(monkeypatch):
    """recomputed_dispatch: the expert-ordered copy of the tokens is not kept from forward to backward (backward
    gathers it again from the layer's input): the same gradients to the bit, a peak lower by about that copy."""
    from torch.distributed._tools.mem_tracker import MemTracker

    import ermoe.dispatch as dispatch

    def fwd_bwd(recompute: bool):
        monkeypatch.setattr(dispatch, "RECOMPUTE_DISPATCHED", recompute)
        torch.manual_seed(0)
        layer = ermoe.MoE(64, 128, 4, router="softmax_topk")
        x = torch.randn(4096, 64, requires_grad=True)
        grad = torch.randn(4096, 64)
        tracker = MemTracker()
        tracker.track_external(layer, x)
        with tracker:
            layer(x).backward(grad)
        grads = [x.grad] + [p.grad for p in layer.parameters()]
        return tracker.get_tracker_snapshot("peak")[x.device]["Total"], grads

    kept, grads_kept = fwd_bwd(False)
    gathered, grads_gathered = fwd_bwd(True)
    for a, b in zip(grads_kept, grads_gathered):
        assert torch.equal(a, b)
    copy = 4096 * 64 * 4  # the dispatched rows, float32
    assert kept - gathered >= 0.9 * copy, (kept, gathered)


def test_under_autocast_the_dispatched_copy_is_gathered_again_too(monkeypatch):
    """Issue 38, defect 8: under autocast the experts saved their bf16 copy of the dispatched rows, which the
    recompute hook did not recognise (it looked for the float32 rows): the layer casts first, so the bf16 copy is
    the one recomputed; gradients unchanged to the bit."""
    from torch.distributed._tools.mem_tracker import MemTracker

    import ermoe.dispatch as dispatch

    def fwd_bwd(recompute: bool):
        monkeypatch.setattr(dispatch, "RECOMPUTE_DISPATCHED", recompute)
        torch.manual_seed(0)
        layer = ermoe.MoE(64, 128, 4, router="softmax_topk")
        x = torch.randn(4096, 64, requires_grad=True)
        tracker = MemTracker()
        tracker.track_external(layer, x)
        with tracker:
            with torch.autocast("cpu", torch.bfloat16):
                y = layer(x)
            y.float().sum().backward()
        return tracker.get_tracker_snapshot("peak")[x.device]["Total"], [x.grad] + [p.grad for p in layer.parameters()]

    kept, grads_kept = fwd_bwd(False)
    gathered, grads_gathered = fwd_bwd(True)
    for a, b in zip(grads_kept, grads_gathered):
        assert torch.equal(a, b)
    assert kept - gathered >= 0.9 * 4096 * 64 * 2, (kept, gathered)  # the dispatched rows, bf16


@pytest.mark.parametrize("cls", [MLPExperts, EigenExperts])
def test_expert_weights_are_cast_once_per_optimizer_step_under_autocast(cls):
    """Issue 38, defect 8: micro-batches reuse one bf16 copy of the expert weights until the weights move (an
    optimizer step) or the layer's after_step clears it; gradients are the uncached ones; a deep copy takes none."""
    import copy

    torch.manual_seed(0)
    experts = cls(4, 16, 32) if cls is MLPExperts else cls(4, 8, 32, 16)
    rows = torch.randn(12, 16 if cls is MLPExperts else 8)
    counts = torch.tensor([3, 4, 0, 5])

    def micro_batches(module):
        module.zero_grad(set_to_none=True)
        for _ in range(2):
            with torch.autocast("cpu", torch.bfloat16):
                module(rows, counts).float().square().sum().backward()
        return [p.grad.clone() for p in module.parameters() if p.grad is not None]

    twin = copy.deepcopy(experts)
    grads = micro_batches(experts)
    first = dict(experts._casts)
    assert set(first) == ({"w1", "w2"} if cls is MLPExperts else {"w2"})
    micro_batches(experts)
    assert all(experts._casts[k][1] is first[k][1] for k in first)  # the same copies, no new cast
    twin.cast_weight = lambda name, make, *params: make().to(torch.bfloat16)  # no cache: one cast per forward
    for a, b in zip(grads, micro_batches(twin)):
        assert torch.equal(a, b)
    with torch.no_grad():
        experts.w2.mul_(0.5)  # as an optimizer step: the version moves, the copy is stale
    micro_batches(experts)
    assert experts._casts["w2"][1] is not first["w2"][1]
    assert copy.deepcopy(experts)._casts == {}
    experts.clear_casts()
    assert experts._casts == {}


@pytest.mark.parametrize("width,experts", [(6, 4), (64, 16)])  # folded into the product; added as a table
def test_grouped_mlp_biases_match_a_per_row_reference_in_float64(width, experts, monkeypatch):
    """The first bias enters either as a column of ones folded into the product (narrow inputs) or as a per-row
    table (wide inputs, many experts): both equal ``act(x W1_e^T + b1_e) W2_e^T + b2_e`` row by row, with the
    gradients of every weight and bias."""
    from ermoe import experts as experts_mod

    tables = []
    expand = experts_mod.expand_rows
    monkeypatch.setattr(experts_mod, "expand_rows", lambda p, c, n: tables.append(p.shape) or expand(p, c, n))
    torch.manual_seed(0)
    counts = torch.zeros(experts, dtype=torch.long)
    counts[:3] = torch.tensor([40, 0, 50])
    x = torch.randn(90, width, dtype=torch.float64, requires_grad=True)
    w1, b1 = torch.randn(experts, 32, width, dtype=torch.float64), torch.randn(experts, 32, dtype=torch.float64)
    w2, b2 = torch.randn(experts, 8, 32, dtype=torch.float64), torch.randn(experts, 8, dtype=torch.float64)
    params = [p.requires_grad_() for p in (w1, b1, w2, b2)]
    y = experts_mod.grouped_mlp(x, counts, w1, b1, w2, b2, torch.nn.GELU())
    # folded iff width * (S + E H) < 2 S H: 6 * (90 + 128) < 5760; 64 * (90 + 512) is not
    assert tables == ([(experts, 8)] if width == 6 else [(experts, 32), (experts, 8)])
    owner = torch.repeat_interleave(torch.arange(experts), counts)
    ref = torch.stack([torch.nn.functional.gelu(x[i] @ w1[e].T + b1[e]) @ w2[e].T + b2[e]
                       for i, e in enumerate(owner.tolist())])
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    grads, ref_grads = (torch.autograd.grad((out * g).sum(), [x, *params]) for out in (y, ref))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("router", ["softmax_topk", "ermoe"])
def test_float32_experts_compile_to_one_graph_on_the_cpu(router):
    """grouped_mm's meta kernel refuses float32, so compiled float32 experts took the loop of matmuls with a host
    read of the row counts: a graph break per layer and a recompilation as loads change. Through the opaque
    ermoe::grouped_mm they compile to one graph and equal eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    layer = ermoe.MoE(32, 64, 4, router=router, validate=False)
    compiled = torch.compile(layer, backend="aot_eager")
    for step in range(2):  # other loads in the second step
        x = torch.randn(2, 24, 32, requires_grad=True)
        y_eager = layer(x)
        gx_eager, = torch.autograd.grad(y_eager.square().sum(), x)
        y = compiled(x)
        gx, = torch.autograd.grad(y.square().sum(), x)
        torch.testing.assert_close(y, y_eager)
        torch.testing.assert_close(gx, gx_eager)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1, dict(counters["graph_break"])
    torch._dynamo.reset()
