"""A fourth task, written as docs/extending.md says, trained and evaluated by the one loop: a data module (options
registered by name and their batch source), an objective and a label function; evaluation, the per-epoch
validation measure, the results table and the figures are the Task's defaults.

The task: is a handwritten digit even or odd? Its batches carry the digit as the target; the objective and the
measure read its parity, the routing diagnostics label each token with its image's digit, so MI(expert; digit)
says whether experts split the digits finer than the task asks."""

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from ermoe.analysis.diagnostics import PerExample, example_labels
from ermoe.data.image_batches import ImageBatches
from ermoe.data.images import load_digits
from ermoe.data.modules import DataOptions, list_datasets, register_data
from ermoe.tasks import Objective, Task, list_tasks, register_task
from ermoe.train import load_config, train

pytest.importorskip("sklearn")


@dataclass
class ParityDigitsOptions(DataOptions):
    name: ClassVar[str] = "parity_digits"
    val_size: int = 200

    def load(self):
        data = load_digits()
        data.carve_validation(self.val_size, seed=0)
        return data


class ParityLoss(Objective):
    def loss(self, output, target):
        return F.cross_entropy(output.float(), target % 2)

    def batch_stats(self, output, batch):
        return {"acc": (output.argmax(1) == batch.target % 2).sum()}


class Parity(Task):
    name = "parity"
    datasets = ("parity_digits",)
    model_data_args = ("num_classes", "img_size", "in_chans")

    def load(self):
        self.batches = ImageBatches(self.setup.data.load(), self.sampling)
        self.objective = ParityLoss()

    def model_args(self):
        return {**self.batches.model_args(), "num_classes": 2}

    def measures(self):
        return {"parity_acc": PerExample(lambda out, digit: (out.argmax(1) == digit % 2).float())}

    def token_labels(self):
        return 10, example_labels  # a token's label: its image's digit


if "parity" not in list_tasks():
    register_task(Parity)
if "parity_digits" not in list_datasets():
    register_data(ParityDigitsOptions)


def test_a_fourth_task_is_a_data_module_an_objective_and_a_label_function(tmp_path):
    cfg = load_config(None, {
        "task": "parity", "data": {"name": "parity_digits"}, "out_dir": str(tmp_path), "run_name": "run",
        "progress": False, "tensorboard": False, "log_every": 5, "probe_size": 32,
        "model": {"patch_size": 2, "depth": 2, "embed_dim": 32, "num_heads": 2,
                  "moe": {"router": "ermoe", "num_experts": 4, "blocks": "all"}},
        "optim": {"epochs": 8, "batch_size": 64, "warmup_steps": 3, "eval_batch_size": 128}})
    run = train(cfg, quiet=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_examples"] == 360
    assert metrics["test_parity_acc"] > 0.65  # chance 0.5; 360 test digits: 0.65 is 6 standard errors above it
    assert 0.5 < metrics["val_parity_acc"] <= 1.0 and "test_top1" not in metrics
    for name, layer in metrics["layers"].items():  # 16 tokens per 8 x 8 digit with patch size 2... 4 x 4
        counts = torch.tensor(layer["expert_label_counts"])
        assert counts.shape == (4, 10) and int(counts.sum()) == 360 * 16, name
        assert layer["tokens_per_expert"] == counts.sum(1).tolist() and layer["mi_bits"] >= 0
        assert "probe_changed" in layer  # the probe's routing was compared between checkpoints
    assert {p.name for p in (run / "figures").iterdir()} == {"load.png"}
    table = Parity.results_table(metrics)
    assert "test_parity_acc" in table and "360 test examples" in table and "blocks.0.mlp" in table


def test_a_router_registered_by_decorator_is_found_by_name_everywhere(monkeypatch):
    """docs/extending.md's router: ``@ermoe.register_router`` with a ``name``, no ermoe file edited; the layer, the
    factory, the models' moe spec and the config check know it; a name taken twice and an unknown name are errors
    that name the choices."""
    import torch

    import ermoe
    from ermoe.models import create_model
    from ermoe.routing import ROUTERS

    monkeypatch.setattr(ROUTERS, "_by_name", dict(ROUTERS._by_name))  # registered for this test only

    @ermoe.register_router
    class HashRouter(ermoe.Router):
        name = "hash"

        def forward(self, x_TD, context_TD=None):
            idx_TK = (x_TD.detach().sum(-1, keepdim=True) * 1e3).long().remainder(self.num_experts)
            probs_TE = torch.nn.functional.one_hot(idx_TK[:, 0], self.num_experts).to(x_TD.dtype)
            return ermoe.RouterOutput(probs_TE=probs_TE, topk_idx_TK=idx_TK,
                                      gates_TK=torch.ones_like(idx_TK, dtype=x_TD.dtype))

    assert ermoe.list_routers()[-1] == "hash"
    layer = ermoe.MoE(dim=16, hidden_dim=32, num_experts=4, router="hash")
    x = torch.randn(10, 16)
    expected = torch.stack([layer.experts.w2[e] @ torch.nn.functional.gelu(layer.experts.w1[e] @ x[t])
                            for t, e in enumerate(layer.router(x).topk_idx_TK[:, 0].tolist())])
    torch.testing.assert_close(layer(x), expected)
    assert isinstance(ermoe.create_router("hash", 16, 4), HashRouter)
    model = create_model("vit_tiny", num_classes=3, img_size=16, in_chans=1, patch_size=8, depth=2, embed_dim=16,
                         num_heads=2, moe={"router": "hash", "num_experts": 4, "blocks": "all"})
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)
    with pytest.raises(ValueError, match="router 'hash' is registered twice"):
        ermoe.register_router(HashRouter)
    with pytest.raises(ValueError, match="unknown router 'hsah'.*hash"):
        ermoe.create_router("hsah", 16, 4)


def test_the_built_in_classifier_logs_its_headline_through_the_shared_quick_eval():
    """Classification declares its measures (top-1 first) and token labels and takes the Task's quick_eval: the
    validation top-1 it logs is the share of validation images whose argmax is their class, counted here by hand."""
    import contextlib

    from ermoe.train import trainer as trainer_mod
    from ermoe.tasks.classification import ImageClassification

    assert "quick_eval" not in ImageClassification.__dict__
    cfg = load_config(None, {"data": {"name": "digits", "val_size": 100, "train_limit": 300}, "progress": False,
                             "model": {"patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2,
                                       "moe": {"router": "ermoe", "num_experts": 4, "blocks": "all"}},
                             "optim": {"batch_size": 50}})
    task, model, _ = trainer_mod.setup(cfg)
    assert task.token_labels()[0] == 10 and list(task.measures()) == ["top1", "top5", "loss"]
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(*b.inputs).argmax(1) == b.target).sum()) for b in task.eval_batches("val"))
    assert task.quick_eval(model, contextlib.nullcontext) == {"val_top1": pytest.approx(correct / 100, abs=1e-7)}
