"""Expert banks: E experts applied to expert-contiguous rows, ``forward(x_SF, counts_E) -> y_SD``.

``counts_E[e]`` consecutive rows belong to expert e (see ``ermoe.dispatch``). The per-expert matmuls run as one
grouped matmul (``torch.nn.functional.grouped_mm``) where PyTorch supports it for the dtype and alignment, and as a
loop over experts otherwise (float64, odd sizes); both give the same values. Where grouped_mm itself reports that it
has no kernel (a device or dtype), the loop takes over for that device and dtype, with a warning, once.

Shape suffixes: S rows, D model dim, H hidden dim, R basis rank, E experts.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function

from . import devices

# The dtypes grouped_mm has kernels for, by device type: CUDA's are bf16 (and fp16 where the build has it); CPU's
# fallback takes float32 too; "meta" (shapes only) follows CUDA. Elsewhere the experts run as a loop of matmuls.
_GROUPED_DTYPES = {"cuda": (torch.bfloat16, torch.float16), "meta": (torch.bfloat16, torch.float16),
                   "cpu": (torch.float32, torch.bfloat16, torch.float16)}
_grouped_unsupported: set[tuple[str, torch.dtype]] = set()
_loop_warned: set[tuple[str, torch.dtype]] = set()


@torch.library.custom_op("ermoe::grouped_mm", mutates_args=())
def _opaque_grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """``F.grouped_mm`` as one opaque op for torch.compile, whose meta kernel refuses float32 (CPU's eager kernel
    takes it): compiled float32 experts on the CPU stay grouped, with no graph break."""
    return F.grouped_mm(a, b, offs=offs)


@_opaque_grouped_mm.register_fake
def _(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    if b.dim() == 3:  # (S, K) x (E, K, N) -> (S, N)
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])  # (N, S) x (S, K) -> (E, N, K)


def _grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    if a.dtype == torch.float32 and a.device.type == "cpu" and torch.compiler.is_compiling():
        return _opaque_grouped_mm(a, b, offs)
    return F.grouped_mm(a, b, offs=offs)


class _GroupedMM(Function):
    """``y[rows of e] = x[rows of e] @ w[e]^T`` through ``grouped_mm``, with its backward spelled out.

    Weights are (E, out, in), as ``nn.Linear``'s. The backward is spelled out so it always hands ``grouped_mm``
    contiguous gradients (it rejects e.g. the stride-0 gradient of ``y.sum()``) and stays two grouped matmuls, the
    weight gradient coming out directly in (E, out, in).
    """

    @staticmethod
    def forward(ctx, x_SK: Tensor, w_ENK: Tensor, offs_E: Tensor) -> Tensor:
        ctx.save_for_backward(x_SK, w_ENK, offs_E)
        return _grouped_mm(x_SK, w_ENK.transpose(-2, -1), offs_E)

    @staticmethod
    def backward(ctx, grad_SN: Tensor):
        x_SK, w_ENK, offs_E = ctx.saved_tensors
        grad_SN = grad_SN.contiguous()
        grad_x = _grouped_mm(grad_SN, w_ENK, offs_E) if ctx.needs_input_grad[0] else None
        grad_w = _grouped_mm(grad_SN.T, x_SK, offs_E) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


# What grouped_mm says when it has no kernel for a device, dtype or layout (PyTorch's GroupedMMUtils.h and
# GroupedBlas.cpp checks); any other error is a real one and propagates.
_UNSUPPORTED_MESSAGES = ("aligned to 16 bytes", "multiple of 16 bytes", "Expected mat_a to be", "Expected mat_b to be",
                         "not supported", "only supported", "compute capability", "not implemented")


def _unsupported(err: Exception) -> bool:
    return isinstance(err, NotImplementedError) or any(m in str(err) for m in _UNSUPPORTED_MESSAGES)


def _grouped_ok(x: Tensor, w: Tensor) -> bool:
    kind = x.device.type
    if x.dtype not in _GROUPED_DTYPES.get(kind, ()) or w.dtype != x.dtype or (kind, x.dtype) in _grouped_unsupported:
        return False
    if torch.compiler.is_compiling() and x.dtype not in (torch.bfloat16, torch.float16) and kind != "cpu":
        # torch.compile traces grouped_mm through its meta kernel, which accepts bf16 and fp16 only (CPU float32
        # goes through the opaque ermoe::grouped_mm): trace the loop instead of logging a failed meta call.
        return False
    return True


class RowGroups:
    """``counts_E`` consecutive rows per expert, with the int32 offsets grouped_mm takes (on the device) and, only
    where the loop of matmuls needs them, the counts read on the host once (a device sync) and shared by every
    matmul of the same rows."""

    def __init__(self, counts_E: Tensor, offs_E: Tensor | None = None) -> None:
        self.counts_E, self._offs, self._sizes = counts_E, offs_E, None

    @property
    def offs_E(self) -> Tensor:
        if self._offs is None:
            self._offs = torch.cumsum(self.counts_E, 0, dtype=torch.int32)
        return self._offs

    def sizes(self, x: Tensor) -> list[int]:
        if self._sizes is None:
            key = (x.device.type, x.dtype)
            if key[0] != "cpu" and key not in _loop_warned:
                _loop_warned.add(key)
                warnings.warn(f"MoE experts in {key[1]} on {key[0]}: grouped_mm has no kernel for it there, so the "
                              "experts run as a loop of matmuls whose row counts are read on the host, one device "
                              "sync per MoE layer per forward (bf16, e.g. optim.amp=bf16, takes the sync-free "
                              "grouped path)", RuntimeWarning, stacklevel=4)
            self._sizes = self.counts_E.tolist()
        return self._sizes


def grouped_matmul(x_SK: Tensor, w_ENK: Tensor, counts_E: Tensor | RowGroups, offs_E: Tensor | None = None) -> Tensor:
    """Row block e of ``x`` (``counts_E[e]`` rows, in order) times ``w[e]^T``; ``w`` is (E, out, in) as nn.Linear.

    ``offs_E``: the int32 cumulative sum of ``counts_E`` (computed if not given). Under autocast both run in the
    autocast dtype. Widths that grouped_mm cannot take (rows must be 16-byte aligned: a multiple of 8 bf16 values)
    are zero-padded for the product, which leaves its values as they are.
    """
    groups = counts_E if isinstance(counts_E, RowGroups) else RowGroups(counts_E, offs_E)
    dtype = devices.autocast_dtype(x_SK.device)
    if dtype is not None:
        x_SK, w_ENK = x_SK.to(dtype), w_ENK.to(dtype)
    else:
        w_ENK = w_ENK.to(x_SK.dtype)
    if _grouped_ok(x_SK, w_ENK):
        try:
            return _aligned_grouped_mm(x_SK, w_ENK, groups.offs_E)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError) as err:
            if not _unsupported(err):
                raise
            key = (x_SK.device.type, x_SK.dtype)
            _grouped_unsupported.add(key)
            warnings.warn(f"grouped_mm is not supported here for {key[0]} {key[1]} ({str(err).strip()}): the experts "
                          "run as a loop of matmuls from now on (same values, slower)", RuntimeWarning, stacklevel=2)
    parts = x_SK.split(groups.sizes(x_SK))
    weights = w_ENK.unbind(0)  # backward of unbind is one stack, not E full-size zero tensors
    return torch.cat([p @ w.T for p, w in zip(parts, weights)]) if parts else x_SK.new_zeros(0, w_ENK.shape[1])


def _aligned_grouped_mm(x_SK: Tensor, w_ENK: Tensor, offs_E: Tensor) -> Tensor:
    """grouped_mm with K and N zero-padded to its 16-byte alignment (e.g. ERMoE's rank 12 in bf16 -> 16)."""
    align = 16 // x_SK.element_size()
    pad_k, pad_n = -x_SK.shape[1] % align, -w_ENK.shape[1] % align
    if pad_k:
        x_SK, w_ENK = F.pad(x_SK, (0, pad_k)), F.pad(w_ENK, (0, pad_k))
    if pad_n:
        w_ENK = F.pad(w_ENK, (0, 0, 0, pad_n))
    y_SN = _GroupedMM.apply(x_SK.contiguous(), w_ENK, offs_E)
    return y_SN[:, :y_SN.shape[1] - pad_n] if pad_n else y_SN


def expand_rows(param_EF: Tensor, counts_E: Tensor, num_rows: int) -> Tensor:
    """Per-expert vectors repeated over that expert's rows: (E, F) -> (S, F)."""
    return param_EF.repeat_interleave(counts_E, dim=0, output_size=num_rows)


def fold_first_bias(rows: int, num_experts: int, hidden: int, width: int) -> bool:
    """Whether the first bias goes into the product as a column of ones (copies of the S x I input and the
    E x H x I weights) rather than as an S x H table of per-row biases added after it: where that moves fewer
    values, ``I (S + E H) < 2 S H``."""
    return width * (rows + num_experts * hidden) < 2 * rows * hidden


def grouped_mlp(x_SI: Tensor, counts_E: Tensor, w_in: Tensor, b_in: Tensor | None, w_out: Tensor,
                b_out: Tensor | None, act: nn.Module) -> Tensor:
    """``act(x W_in^T + b_in) W_out^T + b_out`` with every weight chosen per row by its expert."""
    groups = RowGroups(counts_E)
    fold = b_in is not None and fold_first_bias(x_SI.shape[0], *w_in.shape)
    if fold:
        # The first bias folded into the product as one more input column of ones (x W^T + b = [x, 1] [W, b]^T):
        # copies of the S x I input and the E x H x I weights instead of an S x H table of per-row biases and its
        # addition; cheaper where the input is narrow (ERMoE's rank-R coordinates, whose extra column falls within
        # grouped_mm's alignment padding)
        x_SI = torch.cat([x_SI, x_SI.new_ones(x_SI.shape[0], 1)], dim=1)
        w_in = torch.cat([w_in, b_in.unsqueeze(-1).to(w_in.dtype)], dim=-1)
    h_SH = grouped_matmul(x_SI, w_in, groups)
    if b_in is not None and not fold:
        h_SH = h_SH + expand_rows(b_in, counts_E, h_SH.shape[0]).to(h_SH.dtype)
    y_SO = grouped_matmul(act(h_SH), w_out, groups)
    if b_out is not None:
        y_SO = y_SO + expand_rows(b_out, counts_E, y_SO.shape[0]).to(y_SO.dtype)
    return y_SO


class AutocastWeights(nn.Module):
    """Expert weights cast to the autocast dtype once per optimizer step, not once per forward: micro-batches of
    gradient accumulation and activation checkpointing's second forward reuse the copy. A copy is valid while its
    parameters' version counters stand still (an optimizer step updates them in place, which moves them) and for
    the grad mode it was made in; :meth:`clear_casts` (the layer's ``after_step``) frees them after each step.
    (torch's own autocast cache does this for ``nn.Linear`` within one autocast region only.)"""

    def __init__(self) -> None:
        super().__init__()
        self._casts: dict[str, tuple[tuple, Tensor]] = {}

    def cast_weight(self, name: str, make, *params: Tensor) -> Tensor:
        """``make()`` (a leaf weight, or a function of ``params`` whose backward keeps no tensor: a second micro-batch
        backpropagates through the same copy) in the autocast dtype, cached; as it is outside autocast."""
        dtype = devices.autocast_dtype(params[0].device)
        if dtype is None or torch.compiler.is_compiling():
            return make()
        key = (dtype, torch.is_grad_enabled(), tuple(p._version for p in params))
        cached = self._casts.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        weight = make().to(dtype)
        self._casts[name] = (key, weight)
        return weight

    def clear_casts(self) -> None:
        self._casts = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_casts": {}}  # a copy (EMA, snapshot) takes no cast copy, nor its graph


def _kaiming_uniform_(w_EOI: Tensor) -> None:
    bound = 1.0 / math.sqrt(w_EOI.shape[-1])  # nn.Linear's default init, per expert
    nn.init.uniform_(w_EOI, -bound, bound)


class MLPExperts(AutocastWeights):
    """E two-layer MLPs ``Linear(D, H) -> act -> Linear(H, D)``, weights stored (E, out, in) as nn.Linear's."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU,
                 bias: bool = False) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden_dim)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        self.act = act_layer()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        _kaiming_uniform_(self.w1)
        _kaiming_uniform_(self.w2)

    def forward(self, x_SD: Tensor, counts_E: Tensor) -> Tensor:
        w1 = self.cast_weight("w1", lambda: self.w1, self.w1)
        w2 = self.cast_weight("w2", lambda: self.w2, self.w2)
        return grouped_mlp(x_SD, counts_E, w1, self.b1, w2, self.b2, self.act)

    def no_weight_decay(self) -> set[str]:
        """The per-expert biases (stored as (E, H) tables, not decayed as nn.Linear's biases are not)."""
        return {"b1", "b2"}

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, bias={self.b1 is not None}"


class EigenExperts(AutocastWeights):
    """ERMoE's eigen-reparameterised experts after their basis projection (docs/method.md, section 2):

        Expert_e(h) = W2_e GELU(V_e (s_e * z) + c_e) + d_e,   z = U_e^T h

    The input rows are the coordinates ``z`` (S, R) that the ERMoE router already computed for its score (the basis
    ``U_e`` lives in the router, ``layer.router.basis``). ``s_e`` scales the R eigen-directions (init 1) and is folded
    into ``V_e`` for the matmul: ``V_e (s_e * z) = (V_e diag(s_e)) z``. Weights are (E, out, in).
    """

    def __init__(self, num_experts: int, rank: int, hidden_dim: int, dim: int,
                 act_layer: type[nn.Module] = nn.GELU, bias: bool = True) -> None:
        super().__init__()
        self.num_experts, self.rank, self.hidden_dim, self.dim = num_experts, rank, hidden_dim, dim
        self.scales = nn.Parameter(torch.ones(num_experts, rank))
        self.v = nn.Parameter(torch.empty(num_experts, hidden_dim, rank))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.c = nn.Parameter(torch.zeros(num_experts, hidden_dim)) if bias else None
        self.d = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        self.act = act_layer()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        _kaiming_uniform_(self.v)
        _kaiming_uniform_(self.w2)

    def forward(self, z_SR: Tensor, counts_E: Tensor) -> Tensor:
        # (V_e diag(s_e) is made every forward: a cached product would keep its factors for a second backward; at
        # H x R it is small beside W2's D x H, whose cast is cached)
        w2 = self.cast_weight("w2", lambda: self.w2, self.w2)
        v = self.v * self.scales.unsqueeze(1)
        return grouped_mlp(z_SR, counts_E, v, self.c, w2, self.d, self.act)

    def no_weight_decay(self) -> set[str]:
        """The per-expert eigen-direction scales and biases ((E, R) and (E, H) tables)."""
        return {"scales", "c", "d"}

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, rank={self.rank}, hidden_dim={self.hidden_dim}, dim={self.dim}, "
                f"bias={self.c is not None}")


def matched_eigen_hidden_dim(dim: int, hidden_dim: int, num_experts: int, rank: int, top_k: int = 1) -> int:
    """The hidden width at which ERMoE's experts use as many parameters per token as MLP experts of width
    ``hidden_dim`` behind a linear gate (a fair comparison at equal active size).

    Per token, a softmax-routed MoE uses its gate (``dim * E``) and ``top_k`` MLP experts (``2 * dim * H + H + dim``);
    ERMoE uses all E bases of its router (``E * dim * rank``: every score needs every projection) and ``top_k`` eigen
    experts (``rank + H' * (rank + 1) + dim * H' + dim``). Rank-``rank`` experts of the FFN's own width are smaller
    (at dim 96, E 8, rank 12: 409k active parameters in the study's ViT against 456k).
    """
    budget = dim * num_experts + top_k * (2 * dim * hidden_dim + hidden_dim + dim)
    left = budget - num_experts * dim * rank - top_k * (rank + dim)
    width = round(left / (top_k * (rank + 1 + dim)))
    if width < 1:
        raise ValueError(f"ERMoE's bases alone ({num_experts} x {dim} x {rank}) use more parameters per token than "
                         f"MLP experts of width {hidden_dim}: lower the rank")
    return width
