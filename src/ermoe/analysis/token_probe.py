"""A linear probe of a ground truth from a model's tokens where a routing layer reads them: a positive control for
specialisation claims. If a logistic regression cannot tell the groups (a subject's ageing pattern) apart from the
tokens a router sees, no router can route by them there, and a specialisation measure near chance says nothing
about the method; if it can, a router that does not follow them chose not to.

    tokens = record_tokens(model, model.token_sites, batches, keep={site: cells})   # per site, (X_TC, y_T)
    result = linear_probe(train, val, test)                         # C chosen on validation, the test read once

Shape suffixes: B examples, N tokens per example, C channels, T tokens kept.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..routing.oracle import routed_by
from .diagnostics import evaluating

PROBE_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # inverse L2 strengths tried, the best on validation kept
FIT_TOKENS = 50_000  # at most this many training (and validation) tokens fit the probe, drawn at random beyond


@torch.no_grad()
def record_tokens(model: nn.Module, sites: dict[str, tuple[nn.Module, tuple[int, ...]]],
                  batches: Iterable[tuple[Sequence[Tensor], Tensor, Any]],
                  autocast: Callable[[], Any] = torch.no_grad, keep: dict[str, np.ndarray] | None = None
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per site (name -> the module whose input is a ``(B, N, C)`` batch of tokens, an MoE layer or the dense FFN in
    its place, and the grid its last ``prod(grid)`` tokens tile; tokens before them, a ViT's class token, are left
    out: ``RoutedModel.token_sites``), the tokens it received over ``batches`` of ``(inputs, labels, groups)`` in
    eval mode, each with its label: ``labels`` one per example (``(B,)``) or one per grid token (``(B, N)``; a
    negative label, padding, drops the token); ``groups``: what an oracle-routed model routes the batch by
    (``ermoe.routing.oracle.routed_by``). ``keep``: per site the grid positions kept (a boolean mask of its grid's
    tokens; a site not in it, or None: all). Returns
    per site ``(X_TC float32, y_T int64)``."""
    if not sites:
        raise ValueError("token probe: no site to record (a model with an MoE layer or its dense counterpart)")
    kept: dict[str, list[Tensor]] = {name: [] for name in sites}
    labels: dict[str, list[Tensor]] = {name: [] for name in sites}
    batch_labels: list[Tensor] = []  # the labels of the batch in flight

    def hook(name: str, grid: tuple[int, ...]):
        n_grid = int(np.prod(grid))
        keep_N = None if keep is None or name not in keep else torch.as_tensor(np.asarray(keep[name]).reshape(-1))
        if keep_N is not None and (keep_N.dtype != torch.bool or len(keep_N) != n_grid):
            raise ValueError(f"token probe: site {name!r}'s keep mask has {len(keep_N)} {keep_N.dtype} entries, not "
                             f"a boolean for each of its grid's {n_grid} tokens")

        def record(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x_BNC = args[0]
            if x_BNC.dim() != 3 or x_BNC.shape[1] < n_grid:
                raise ValueError(f"token probe: site {name!r} received shape {tuple(x_BNC.shape)}, not (B, N, C) "
                                 f"with the {n_grid} tokens of its grid {tuple(grid)}")
            x_BNC = x_BNC[:, x_BNC.shape[1] - n_grid:].float().cpu()
            y = batch_labels[0].cpu()
            y_BN = y[:, None].expand(-1, n_grid) if y.dim() == 1 else y
            if y_BN.shape != x_BNC.shape[:2]:
                raise ValueError(f"token probe: labels of shape {tuple(y.shape)} for site {name!r}'s "
                                 f"{tuple(x_BNC.shape[:2])} tokens")
            if keep_N is not None:
                x_BNC, y_BN = x_BNC[:, keep_N], y_BN[:, keep_N]
            real = y_BN >= 0
            kept[name].append(x_BNC[real])
            labels[name].append(y_BN[real])
        return record

    handles = [module.register_forward_pre_hook(hook(name, tuple(grid))) for name, (module, grid) in sites.items()]
    try:
        with evaluating(model):
            for inputs, labels_B, groups in batches:
                batch_labels[:] = [torch.as_tensor(labels_B)]
                with autocast(), routed_by(model, groups):  # an oracle-routed model routes by them
                    model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return {name: (torch.cat(kept[name]).numpy(), torch.cat(labels[name]).numpy().astype(np.int64))
            for name in sites}


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The mean over the groups present of the share of each group's tokens predicted as it (chance: 1 / groups,
    whatever the groups' sizes)."""
    return float(np.mean([np.mean(y_pred[y_true == g] == g) for g in np.unique(y_true)]))


def linear_probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                 test: tuple[np.ndarray, np.ndarray], cs: Sequence[float] = PROBE_CS, seed: int = 0
                 ) -> dict[str, Any]:
    """A multinomial logistic regression (scikit-learn) on standardised tokens, fitted on ``train`` at each inverse
    L2 strength of ``cs``, the one with the best balanced accuracy on ``val`` kept, then read once on ``test``:
    ``test_balanced_acc``, ``chance`` (1 / groups), ``c``, ``val_balanced_acc`` per C, and the token counts."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler
    except ImportError as err:
        raise ImportError(f"the token probe fits scikit-learn's logistic regression ({err}): pip install "
                          "scikit-learn") from None
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = train, val, test
    if len(np.unique(y_train)) < 2:
        raise ValueError(f"token probe: the training tokens hold {len(np.unique(y_train))} group(s); a probe needs "
                         "two or more")
    scaler = StandardScaler().fit(x_train)
    fits = {c: LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(scaler.transform(x_train), y_train)
            for c in cs}
    val_acc = {c: balanced_accuracy(y_val, fit.predict(scaler.transform(x_val))) for c, fit in fits.items()}
    best = max(cs, key=lambda c: (val_acc[c], -c))  # ties: the stronger regularisation
    return {"test_balanced_acc": balanced_accuracy(y_test, fits[best].predict(scaler.transform(x_test))),
            "chance": 1.0 / len(np.unique(y_train)), "c": best,
            "val_balanced_acc": {f"{c:g}": acc for c, acc in val_acc.items()},
            "tokens": {"train": len(y_train), "val": len(y_val), "test": len(y_test)}}


def can_probe() -> bool:
    """Whether scikit-learn (the probe's logistic regression) is installed; warns when it is not, since an
    evaluation then leaves its probe out rather than failing a finished run."""
    import importlib.util
    import warnings

    if importlib.util.find_spec("sklearn") is not None:
        return True
    warnings.warn("the linear probe of the ground truth is left out: it needs scikit-learn (pip install "
                  "scikit-learn)", stacklevel=3)
    return False


def probe_ground_truth(model: nn.Module, sites: dict[str, tuple[nn.Module, tuple[int, ...]]],
                       batches: Callable[[str], Iterable[tuple[Sequence[Tensor], Tensor, Any]]],
                       autocast: Callable[[], Any] = torch.no_grad, seed: int = 0,
                       keep: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, Any]]:
    """A linear probe at every site: the tokens of ``batches(split)`` (``(inputs, labels, groups)``, as
    :func:`record_tokens` reads them) recorded on the training, validation and test splits in one pass each, then
    per site :func:`linear_probe` (C chosen on validation, the test read once) on at most ``FIT_TOKENS`` training
    and validation tokens each (a random draw beyond: the fit's cost grows with them; the test reads all).
    ``keep``: per site the grid positions probed (:func:`record_tokens`)."""
    data = {split: record_tokens(model, sites, batches(split), autocast, keep) for split in ("train", "val", "test")}
    return {name: linear_probe(_at_most(data["train"][name], seed), _at_most(data["val"][name], seed),
                               data["test"][name], seed=seed) for name in sites}


def _at_most(tokens: tuple[np.ndarray, np.ndarray], seed: int, n: int = FIT_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """``n`` of the tokens drawn without replacement (seeded), in their order; all of them when there are fewer."""
    x, y = tokens
    if len(y) <= n:
        return x, y
    keep = np.sort(np.random.default_rng(seed).choice(len(y), n, replace=False))
    return x[keep], y[keep]
