"""Few-shot linear probes on frozen features (ERMoE's claim of better few-shot features; docs/method.md,
section 6)."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..models.protocol import RoutedModel
from .diagnostics import evaluating


@torch.no_grad()
def extract_features(model: RoutedModel, batches: Iterable[Sequence[Tensor]]) -> Tensor:
    """Pre-logit features (what the head reads: ``forward_head(forward_features(x), pre_logits=True)``), float32 on
    the CPU; ``batches`` yields the model's positional inputs."""
    with evaluating(model):
        feats = [model.forward_head(model.forward_features(*inputs), pre_logits=True).float().cpu()
                 for inputs in batches]
    return torch.cat(feats)


def few_shot_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, shots: int, draws: int = 5,
                   seed: int = 0) -> tuple[float, float]:
    """Mean and std over ``draws`` of the test accuracy of a logistic-regression probe fitted on ``shots`` random
    training examples per class (features standardised with the support set's statistics)."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as err:
        raise ImportError("few-shot probes use scikit-learn: pip install scikit-learn") from err
    rng = np.random.default_rng(seed)
    ytr = train_y.numpy()
    classes = np.unique(ytr)
    accs = []
    for _ in range(draws):
        idx = np.concatenate([rng.choice(np.flatnonzero(ytr == c), shots, replace=False) for c in classes])
        xs = train_x[idx].double()
        mean, std = xs.mean(0), xs.std(0, unbiased=False).clamp_min(1e-6)
        clf = LogisticRegression(max_iter=1000, C=1.0)
        clf.fit(((xs - mean) / std).numpy(), ytr[idx])
        accs.append(float((clf.predict(((test_x.double() - mean) / std).numpy()) == test_y.numpy()).mean()))
    return float(np.mean(accs)), float(np.std(accs))
