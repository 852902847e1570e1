"""The training job end to end on a small real dataset (scikit-learn digits): run directory contents, resume
equivalence, checkpoint integrity, non-finite loss handling, config validation, the command line."""

import json
import math
from pathlib import Path

import pytest
import torch

from ermoe.cli import main
from ermoe.train import (CheckpointError, ConfigError, NonFiniteLossError, evaluate, load_checkpoint, load_config,
                         report, save_checkpoint, train)
from ermoe.train import checkpoint as ckpt_mod
from ermoe.train import trainer as trainer_mod

pytest.importorskip("sklearn")


def tiny(tmp_path, **extra):
    overrides = {
        "out_dir": str(tmp_path), "run_name": "run", "progress": False, "tensorboard": False, "log_every": 1,
        "probe_size": 32, "data": {"name": "digits", "train_limit": 640, "hflip": False, "crop_padding": 1},
        "model": {"patch_size": 2, "depth": 2, "embed_dim": 32, "num_heads": 2,
                  "moe": {"router": "ermoe", "num_experts": 4, "blocks": "all"}},
        "optim": {"epochs": 2, "batch_size": 64, "warmup_steps": 3, "eval_batch_size": 128},
    }
    for key, value in extra.items():
        node = overrides
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return load_config(None, overrides)


def losses(run: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if r["kind"] == "train"]


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_end_to_end_run_directory(tmp_path):
    run = train(tiny(tmp_path, **{"model.moe_init": "pca"}), quiet=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 20 and metrics["test_images"] == 360 and metrics["task"] == "classification"
    layer = metrics["layers"]["blocks.0.mlp"]
    for key in ("tokens_per_expert", "load_cv", "max_over_mean", "entropy", "gini", "mi_bits", "homogeneity",
                "probe_changed", "ortho_error", "principal_angle_deg_mean", "expert_class_counts"):
        assert key in layer, key
    assert sum(layer["tokens_per_expert"]) == metrics["test_images"] * 16
    assert 0.0 <= layer["probe_changed"] <= 1.0  # two checkpoints: the probe routing was compared
    assert (run / "config.yaml").exists() and (run / "checkpoints" / "latest").exists()
    assert {p.name for p in (run / "figures").iterdir()} == {"heatmap_blocks_0_mlp.png", "heatmap_blocks_1_mlp.png",
                                                            "load.png"}
    assert [s for s, _ in losses(run)] == list(range(1, 21))
    (run / "metrics.json").write_text(json.dumps({**metrics, "run_wall_s": 12.5, "fewshot": {}}))
    again = evaluate(run, quiet=True)
    assert again["test_top1"] == pytest.approx(metrics["test_top1"])
    # what only training knows is kept; what depends on the evaluated checkpoint (the study's probes) is not
    assert again["run_wall_s"] == 12.5 and again["train_time_s"] == metrics["train_time_s"]
    assert "fewshot" not in again
    assert report(run, quiet=True)["test_top1"] == again["test_top1"]


def test_resume_matches_an_uninterrupted_run(tmp_path):
    full = train(tiny(tmp_path / "a"), quiet=True)
    part = train(tiny(tmp_path / "b", **{"optim.max_steps": 13}), quiet=True)
    assert [s for s, _ in losses(part)] == list(range(1, 14))
    resumed = train(tiny(tmp_path / "b"), resume=part, quiet=True)
    assert resumed == part
    a, b = losses(full), losses(resumed)
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, la), (_, lb) in zip(a, b):
        assert abs(la - lb) <= 1e-6
    wa, _ = load_checkpoint(full)
    wb, _ = load_checkpoint(resumed)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest"])
def test_corrupt_checkpoint_is_a_clear_error_and_nothing_is_overwritten(tmp_path, damage):
    run = train(tiny(tmp_path, **{"optim.max_steps": 4}), quiet=True)
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    if damage == "flip":
        data = bytearray((latest / "model.safetensors").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (latest / "model.safetensors").write_bytes(bytes(data))
    elif damage == "truncate":
        path = latest / "state.pt"
        path.write_bytes(path.read_bytes()[:100])
    else:
        (latest / "manifest.json").write_text("{not json")
    before = snapshot(run)
    with pytest.raises(CheckpointError, match="corrupt|truncated"):
        train(tiny(tmp_path), resume=run, quiet=True)
    with pytest.raises(CheckpointError):
        evaluate(run, quiet=True)
    assert snapshot(run) == before


def test_crash_while_writing_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    ckpts = tmp_path / "checkpoints"
    save_checkpoint(ckpts, 1, model, {"step": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt_mod.torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(ckpts, 2, model, {"step": 2})
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000001"]
    _, state = load_checkpoint(tmp_path)
    assert state["step"] == 1


def test_keeps_only_the_newest_checkpoints(tmp_path):
    model = torch.nn.Linear(3, 2)
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, model, {"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003", "step_00000004"]


def poison_the_13th_loss(monkeypatch) -> None:
    """The classification loss of the 13th call (step index 12) is NaN."""
    from ermoe.tasks import classification
    real = classification.F.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, *args, **kwargs):
        calls["n"] += 1
        loss = real(logits, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 13 else loss
    monkeypatch.setattr(classification.F, "cross_entropy", poisoned)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    poison_the_13th_loss(monkeypatch)
    cfg = tiny(tmp_path)
    with pytest.raises(NonFiniteLossError, match="at step 12"):
        train(cfg, quiet=True)
    run = tmp_path / "run"
    _, state = load_checkpoint(run)
    assert state["step"] == 10  # the end of epoch 0, the last good one
    assert not (run / "metrics.json").exists()


def test_with_a_fused_optimizer_a_non_finite_step_is_skipped_on_the_device_and_stops_the_run_at_the_log(
        tmp_path, monkeypatch):
    """optim.fused (PyTorch's CPU kernel here, the default on CUDA): no host check per step; the fused AdamW skips
    the poisoned step's update (weights and moments as before it), the next log line reads the flag and stops the
    run naming that step; the last good checkpoint is kept."""
    poison_the_13th_loss(monkeypatch)
    snapshots = {}
    real_update = trainer_mod.Trainer._update

    def update(self):
        before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        real_update(self)
        snapshots[self.step] = (before, {n: p.detach().clone() for n, p in self.model.named_parameters()})
    monkeypatch.setattr(trainer_mod.Trainer, "_update", update)
    cfg = tiny(tmp_path, **{"optim.fused": True, "log_every": 4})
    with pytest.raises(NonFiniteLossError, match="non-finite loss or gradient .* at step 12"):
        train(cfg, quiet=True)
    assert max(snapshots) == 16  # ran on to the log line of step 16
    before, after = snapshots[13]  # step 13 (index 12) left every weight as it was: the optimizer skipped it
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    # (ERMoE's after_step retracts its bases onto the Stiefel manifold: a QR that moves them in the last bits)
    assert all(n.endswith("router.basis.weight") for n in moved), moved
    assert all(torch.allclose(before[n], after[n], rtol=0, atol=1e-6) for n in moved)
    before, after = snapshots[14]  # the next one trained
    assert not all(torch.equal(before[n], after[n]) for n in before)
    assert all(torch.isfinite(p).all() for p in after.values())
    _, state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 10


def test_new_runs_never_reuse_a_directory(tmp_path):
    cfg = tiny(tmp_path, **{"optim.max_steps": 1})
    first, second = train(cfg, quiet=True), train(cfg, quiet=True)
    assert first.name == "run" and second.name == "run-2"


def test_config_validation_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrate'"):
        load_config(None, ["--optim.lrate=1"])
    with pytest.raises(ConfigError, match="optim.batch_size: expected int"):
        load_config(None, ["--optim.batch_size=big"])
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        load_config(None, ["--optim.lr=-1"])
    with pytest.raises(ConfigError, match="model.moe: top_k"):
        load_config(None, ["--model.moe.top_k=9", "--model.moe.num_experts=8"])
    with pytest.raises(ConfigError, match="data.name"):
        load_config(None, ["--data.name=mnist3d"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("optim:\n  lr: 3e-4\nmodel:\n  moe:\n    router: emoe\n")
    cfg = load_config(good, ["--optim.epochs", "5"])
    assert cfg.optim.lr == 3e-4 and cfg.model.moe.router == "emoe" and cfg.optim.epochs == 5


def test_shipped_configs_are_valid():
    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        if path.name.startswith("study_"):  # `ermoe study --config` files
            from ermoe.study import load_study_config
            load_study_config(path)
        else:
            load_config(path)


def test_cli_reports_errors_cleanly(tmp_path, capsys):
    assert main(["train", "--optim.epochs=0"]) == 1
    assert "optim.epochs must be >= 1" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 1
    assert "not a run directory" in capsys.readouterr().err
    assert main(["train", "--model.moe.blocks=last:x"]) == 1
    assert "last:N" in capsys.readouterr().err
    assert main(["train", "--model.patch_size=5", "--data.name=digits"]) == 1  # 8x8 images, patch 5
    assert "multiple of patch_size" in capsys.readouterr().err


def test_cli_train_eval_report(tmp_path, capsys):
    args = [f"--out_dir={tmp_path}", "--run_name=cli", "--progress=false", "--tensorboard=false",
            "--data.name=digits", "--data.train_limit=256", "--model.depth=1", "--model.embed_dim=16",
            "--model.num_heads=2", "--model.patch_size=4", "--optim.epochs=1", "--optim.batch_size=64"]
    # one block: the default every_other selects none, which is an error, not a silently dense model
    assert main(["train", *args]) == 1
    assert "none at depth 1" in capsys.readouterr().err
    args.append("--model.moe=null")
    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    assert "test top-1" in out and "blocks.0.mlp" not in out
    assert main(["eval", str(tmp_path / "cli")]) == 0
    assert main(["report", str(tmp_path / "cli")]) == 0


def test_trainer_warns_about_an_moe_layer_without_gradient():
    import ermoe
    with pytest.warns(UserWarning):
        model = ermoe.create_model("vit_tiny", num_classes=3, img_size=8, patch_size=4, in_chans=1, depth=2,
                                   embed_dim=16, num_heads=2, global_pool="token",
                                   moe=dict(router="softmax_topk", num_experts=2, blocks="all"))
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    with pytest.warns(UserWarning, match=r"routing layer blocks\.1\.mlp got no gradient"):
        trainer_mod.warn_gradless_routing(model)


def test_bf16_autocast_training_on_cpu(tmp_path):
    run = train(tiny(tmp_path, **{"optim.amp": "bf16", "optim.max_steps": 3}), quiet=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 3 and math.isfinite(metrics["test_loss"])


def test_lr_schedule_warmup_then_cosine():
    from ermoe.train.components import lr_lambda
    f = lr_lambda
    assert f(0, 10, 110, 0.01) == pytest.approx(0.1)
    assert f(9, 10, 110, 0.01) == pytest.approx(1.0)
    assert f(60, 10, 110, 0.01) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(110, 10, 110, 0.01) == pytest.approx(0.01)


def test_probe_load_is_logged_between_checkpoints(tmp_path):
    run = train(tiny(tmp_path, probe_every=5), quiet=True)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    probes = [r for r in records if r["kind"] == "probe_load"]
    assert [r["step"] for r in probes] == [5, 10, 15, 20]  # 10 and 20 are the epoch checkpoints, logged once
    for r in probes:
        for layer in ("blocks.0.mlp", "blocks.1.mlp"):
            assert r[layer] >= 0 and r[f"{layer}/max_over_mean"] >= 1 and 0 <= r[f"{layer}/gini"] <= 1


def test_a_small_moe_vit_learns_digits_well_above_chance(tmp_path):
    """220 steps (a few seconds): ERMoE in both blocks of a width-32 ViT; chance is 0.10."""
    cfg = tiny(tmp_path, **{"data.train_limit": None, "data.crop_padding": 0, "optim.epochs": 10, "optim.lr": 3e-3,
                            "optim.warmup_steps": 10})
    metrics = json.loads((train(cfg, quiet=True) / "metrics.json").read_text())
    assert metrics["test_top1"] > 0.6, metrics["test_top1"]


def test_weight_decay_applies_to_linear_maps_only():
    from ermoe.models import create_model
    from ermoe.train.components import build_optimizer
    from ermoe.weight_decay import decayed_parameter_names

    model = create_model("vit_tiny", num_classes=3, img_size=8, patch_size=4, in_chans=1, depth=2, embed_dim=16,
                         num_heads=2, moe={"router": "ermoe", "num_experts": 2, "blocks": [0]})
    model.blocks[1].mlp = create_model("vit_tiny", num_classes=3, img_size=8, patch_size=4, in_chans=1, depth=1,
                                       embed_dim=16, num_heads=2, moe={"router": "emoe", "num_experts": 2,
                                                                      "blocks": [0]}).blocks[0].mlp
    decayed = decayed_parameter_names(model)
    moe, emoe = "blocks.0.mlp.moe.", "blocks.1.mlp.branch.moe."
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "head.weight", moe + "experts.v",
                 moe + "experts.w2", emoe + "experts.w1", emoe + "experts.w2", emoe + "router.pi",
                 "blocks.1.mlp.mlp.fc1.weight"):
        assert name in decayed, name
    for name in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "head.bias",
                 moe + "experts.scales", moe + "experts.c", moe + "experts.d", moe + "router.basis.weight",
                 emoe + "router.basis.weight", emoe + "router.gamma", emoe + "router.bias", emoe + "alpha"):
        assert name not in decayed, name
    groups = build_optimizer(model, tiny(Path("/nonexistent")).optim).param_groups
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    params = dict(model.named_parameters())
    assert {id(p) for p in groups[0]["params"]} == {id(params[n]) for n in decayed}
    single = create_model("single_gated_vit", num_classes=3, img_size=8, patch_size=4, in_chans=1, depth=2,
                          embed_dim=16, num_heads=2, num_experts=2, blocks=[1])
    decayed = decayed_parameter_names(single)
    assert {"experts.1.moe.experts.w1", "gate.weight"} <= decayed
    assert not {"experts.1.moe.experts.b1", "experts.1.moe.experts.b2", "gate.bias"} & decayed


def test_weight_decay_of_a_new_router_is_declared_by_the_router_not_listed_in_the_trainer():
    """A router the trainer has never heard of: its projection (2-D) decays by the rule, its (E, R) table of
    per-expert offsets is exempted by its own no_weight_decay(), its scalar temperature never decays."""
    from ermoe import MoE
    from ermoe.routing.base import Router, RouterOutput
    from ermoe.weight_decay import decayed_parameter_names

    class OffsetRouter(Router):
        def __init__(self, dim, num_experts, top_k=1):
            super().__init__(dim, num_experts, top_k)
            self.proj = torch.nn.Parameter(torch.randn(dim, num_experts) / dim ** 0.5)
            self.offsets = torch.nn.Parameter(torch.zeros(num_experts, 3))
            self.temperature = torch.nn.Parameter(torch.ones(()))

        def no_weight_decay(self):
            return {"offsets"}

        def forward(self, x_TD, context_TD=None):
            logits = x_TD @ self.proj / self.temperature + self.offsets.sum(1)
            probs = logits.softmax(-1)
            gates, idx = probs.topk(self.top_k, dim=-1)
            return RouterOutput(probs, topk_idx_TK=idx, gates_TK=gates)

    layer = MoE(8, 16, num_experts=4, router=OffsetRouter(8, 4))
    assert decayed_parameter_names(layer) == {"router.proj", "experts.w1", "experts.w2"}
    out = layer(torch.randn(5, 8))  # and it routes
    assert out.shape == (5, 8)


def test_settings_that_do_not_apply_are_config_errors():
    def error(overrides, match):
        with pytest.raises(ConfigError, match=match):
            load_config(None, overrides)

    error({"model": {"moe": {"router": "softmax_topk"}, "moe_init": "pca"}}, "moe_init: pca .* router 'softmax_topk'")
    error({"model": {"moe": None, "moe_init": "pca"}}, "moe_init: pca .* no MoE layers")
    error({"model": {"name": "deepmoe_cnn", "moe_init": "pca"}}, "moe_init: pca")
    error({"model": {"num_classes": 10}}, "model.num_classes is set from the data by task 'classification'")
    error({"model": {"name": "vit_base_patch16_224", "depth": 4}}, "model.depth does not apply to model "
                                                                   "'vit_base_patch16_224'")
    error({"model": {"name": "vit_gigantic"}}, "model.name: unknown model 'vit_gigantic'")
    error({"model": {"moe": {"router": "dense"}}}, "model.moe: null")
    error({"model": {"global_pool": "mean"}}, r"model.global_pool: expected one of \['avg'")
    error({"data": {"name": "fashion_mnist", "img_size": 32}}, "data.img_size does not apply to dataset "
                                                                "'fashion_mnist'")
    error({"data": {"name": "digits", "data_dir": "/data"}}, "data.data_dir does not apply to dataset 'digits'")
    error({"data": {"mirror": "http://127.0.0.1/"}}, "data.mirror applies only with data.download")
    error({"task": "segmentation"}, "unknown task 'segmentation'")
    # another model starts from its own defaults, not the main job's ViT settings
    cfg = load_config(None, {"model": {"name": "deepmoe_cnn"}})
    assert cfg.model.args == {} and cfg.model.moe is None
    assert load_config(None, {"model": {"moe": None}}).model.args == {"depth": 4, "patch_size": 7, "moe": None}


def test_load_run_lets_the_dead_moe_warning_through(tmp_path):
    from ermoe.train.trainer import load_run

    with pytest.warns(UserWarning, match="no gradient"):
        run = train(tiny(tmp_path, **{"model.global_pool": "token", "optim.max_steps": 2}), quiet=True)
    with pytest.warns(UserWarning, match="gets no gradient"):
        load_run(run)


def test_config_round_trips_through_its_yaml(tmp_path):
    from ermoe.train.config import config_from_dict, config_to_dict, dump_config
    import yaml

    for cfg in (tiny(tmp_path), load_config(None, {"model": {"name": "single_gated_vit", "depth": 2,
                                                             "kmeans_step": 0.5}}),
                load_config(Path(__file__).parents[1] / "configs" / "fmnist_deepmoe_cnn.yaml")):
        again = config_from_dict(yaml.safe_load(dump_config(cfg)))
        assert config_to_dict(again) == config_to_dict(cfg)


def test_training_straggler_factor_is_the_mean_over_steps_of_the_busiest_expert_over_the_mean(tmp_path):
    from ermoe import MoE

    seen: list[torch.Tensor] = []

    def record(module, args, output):
        if isinstance(module, MoE) and module.training:
            seen.append(module.last_routing.tokens_per_expert.double())

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        run = train(tiny(tmp_path, **{"optim.max_steps": 5}), quiet=True)
    finally:
        handle.remove()
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(seen) == 2 * 5  # two MoE layers, five steps
    for i, name in enumerate(("blocks.0.mlp", "blocks.1.mlp")):
        per_step = [float(c.max() / c.mean()) for c in seen[i::2]]
        assert metrics["layers"][name]["train_ep_straggler"] == pytest.approx(sum(per_step) / 5, rel=1e-12)


def test_gated_channels_have_no_straggler_factor(tmp_path):
    """DeepMoE's gated channels are not experts a deployment shards (and keep routing only from eval forwards):
    its layers report their channel loads but no straggler factor, which the study reports then show as -."""
    cfg = tiny(tmp_path, **{"model": {"name": "deepmoe_cnn", "widths": [8, 8, 8], "embed_dim": 6},
                            "data.train_limit": 128})  # two epochs of two steps, an evaluation between them
    metrics = json.loads((train(cfg, quiet=True) / "metrics.json").read_text())
    assert metrics["layers"]
    for stats in metrics["layers"].values():
        assert stats["train_ep_straggler"] is None and stats["load_cv"] is not None


def test_log_sums_stay_on_the_device_and_are_read_once_per_log_window(tmp_path, monkeypatch):
    """The loss and the task's batch sums accumulate as tensors over the log window and reach the host in one
    read (Parallel.sum_stats) per logged step, not per step; what is logged is the window's mean."""
    from ermoe.train.parallel import Parallel

    reads, real = [], Parallel.sum_stats

    def counted(self, sums, replicated=()):
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in sums.values())
        reads.append(dict(sums))
        return real(self, sums, replicated)

    monkeypatch.setattr(Parallel, "sum_stats", counted)
    every_step = train(tiny(tmp_path / "a", **{"optim.max_steps": 10}), quiet=True)
    assert len(reads) == 10
    per_step = losses(every_step)
    reads.clear()
    windowed = train(tiny(tmp_path / "b", **{"optim.max_steps": 10, "log_every": 5}), quiet=True)
    assert len(reads) == 2 and [float(r["examples"]) for r in reads] == [5 * 64, 5 * 64]
    mean_of_first_five = sum(loss for _, loss in per_step[:5]) / 5
    assert losses(windowed)[0] == (5, pytest.approx(mean_of_first_five, rel=1e-6))
