"""A linear probe of a ground truth from a model's tokens where a routing layer reads them: a positive control for
specialisation claims. If a logistic regression cannot tell the groups (a subject's ageing pattern) apart from the
tokens a router sees, no router can route by them there, and a specialisation measure near chance says nothing
about the method; if it can, a router that does not follow them chose not to.

    tokens = record_tokens(model, sites, batches, keep_N=cells)     # per site, (X_TC, y_T) of the kept positions
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


@torch.no_grad()
def record_tokens(model: nn.Module, sites: dict[str, nn.Module], batches: Iterable[tuple[Sequence[Tensor], Tensor]],
                  autocast: Callable[[], Any] = torch.no_grad, keep_N: np.ndarray | None = None
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per site (name -> the module whose input is a ``(B, N, C)`` batch of tokens: an MoE layer, or the dense FFN
    in its place), the tokens it received over ``batches`` of ``(inputs, groups)`` in eval mode, the positions
    ``keep_N`` only (a boolean mask over the N tokens of an example; None: all), each labelled by its example's
    group: ``(X_TC float32, y_T int64)``."""
    if not sites:
        raise ValueError("token probe: no site to record (a model with an MoE layer or its dense counterpart)")
    kept: dict[str, list[Tensor]] = {name: [] for name in sites}
    groups: list[Tensor] = []

    def hook(name: str):
        def record(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x_BNC = args[0]
            if x_BNC.dim() != 3:
                raise ValueError(f"token probe: site {name!r} received shape {tuple(x_BNC.shape)}, not (B, N, C)")
            if keep_N is not None:
                x_BNC = x_BNC[:, torch.as_tensor(keep_N, device=x_BNC.device)]
            kept[name].append(x_BNC.float().cpu())
        return record

    first = next(iter(sites))
    handles = [module.register_forward_pre_hook(hook(name)) for name, module in sites.items()]
    try:
        with evaluating(model):
            for inputs, groups_B in batches:
                with autocast(), routed_by(model, groups_B):  # an oracle-routed model routes by them
                    model(*inputs)
                groups.append(groups_B.cpu().repeat_interleave(kept[first][-1].shape[1]))
    finally:
        for h in handles:
            h.remove()
    y_T = torch.cat(groups).numpy().astype(np.int64)
    return {name: (torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).numpy(), y_T) for name, xs in kept.items()}


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
