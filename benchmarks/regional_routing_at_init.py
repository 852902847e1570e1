"""Where the regional experts' gate sends the validation volumes before any training step (issue 41: in the
heterogeneous brain study every seed's test volumes all went to one trunk, and the first load probe, at step 25,
already had every probe volume on the same two).

For each seed: the study's `regional` model at its initialisation, the validation volumes through its gate CNN, and
what the router makes of them: the share of volumes whose first choice is the most common one, how many distinct
(first, second) choices occur, the second choices the threshold drops, and how alike the volumes' gate tokens are
(mean pairwise cosine of the layer-normed pooled features, and of the same features centred over the volumes). A
gate whose tokens are nearly one direction for every volume routes them all alike whatever it learns later.

    python benchmarks/regional_routing_at_init.py [--config configs/study_brainage_heterogeneous.yaml]
                                                  [--seeds 0 1 2 3 4] [--method regional]

Reads the study's cohort (generated and cached on the first run, as the study does); about a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch


def gate_tokens(model, task) -> torch.Tensor:
    """The validation volumes' router inputs, ``(N, C)``: the gate CNN's pooled features, normalised as training
    normalises them (a batch-norm gate with the volumes' own statistics: its running ones are still 0 and 1)."""
    with torch.no_grad():
        pooled = torch.cat([model.gate_net.forward_features(b.inputs[0]).mean(dim=(2, 3, 4))
                            for b in task.eval_batches("val")])
        return normalise_as_in_training(model.gate_norm, pooled)


def normalise_as_in_training(norm: torch.nn.Module, pooled_NC: torch.Tensor) -> torch.Tensor:
    """``norm`` applied as in a training step: a batch norm over these rows' statistics, without updating its
    running ones; a layer norm as it is."""
    if isinstance(norm, torch.nn.BatchNorm1d):
        return torch.nn.functional.batch_norm(pooled_NC, None, None, norm.weight, norm.bias, training=True,
                                              eps=norm.eps)
    return norm(pooled_NC)


def mean_pairwise_cosine(x_NC: torch.Tensor) -> float:
    """The mean cosine over distinct pairs of rows."""
    unit = torch.nn.functional.normalize(x_NC.double(), dim=1)
    sim = unit @ unit.T
    n = len(x_NC)
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def routing_at_init(config: str, method: str, seed: int) -> dict[str, float]:
    """The study's ``method`` model for ``seed`` as built before training, summarised by :func:`routing_summary`."""
    from ermoe.study.runner import load_study_config, run_config
    from ermoe.train import create_task
    from ermoe.train.trainer import build_model

    cfg = run_config(load_study_config(config), method, seed)
    torch.manual_seed(seed)
    task = create_task(cfg, torch.device("cpu"))
    task.load()
    model = build_model(cfg, task, quiet=True).eval()
    task.prepare(model)
    return routing_summary(model, gate_tokens(model, task))


def routing_summary(model, tokens: torch.Tensor) -> dict[str, float]:
    """What ``model``'s volume router makes of the gate ``tokens`` ``(N, C)`` (module docstring)."""
    with torch.no_grad():
        idx_NK, _ = model.routing(tokens)
    firsts = Counter(idx_NK[:, 0].tolist())
    return {"volumes": len(tokens),
            "top_first_share": firsts.most_common(1)[0][1] / len(tokens),
            "distinct_first": len(firsts),
            "distinct_pairs": len({tuple(r) for r in idx_NK.tolist()}),
            "second_dropped": float((idx_NK[:, 1:] < 0).float().mean()) if idx_NK.shape[1] > 1 else 0.0,
            "token_cosine": mean_pairwise_cosine(tokens),
            "centred_cosine": mean_pairwise_cosine(tokens - tokens.mean(0))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/study_brainage_heterogeneous.yaml")
    parser.add_argument("--method", default="regional", help="regional, or regional_bn (the batch-normed gate)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args(argv)
    print("| seed | volumes | first choice's top share | distinct firsts | distinct pairs | 2nd dropped | "
          "token cosine | centred cosine |")
    print("|---|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        r = routing_at_init(args.config, args.method, seed)
        print(f"| {seed} | {r['volumes']} | {r['top_first_share']:.2f} | {r['distinct_first']} | "
              f"{r['distinct_pairs']} | {r['second_dropped']:.2f} | {r['token_cosine']:.3f} | "
              f"{r['centred_cosine']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
