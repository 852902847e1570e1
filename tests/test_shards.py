"""Sharded checkpoints (checkpoint_format: sharded, torch.distributed.checkpoint) in one process: the same run as
single-file checkpoints, bit for bit; read whole for eval, export and init; another model's shards refused naming
the keys. The distributed side (FSDP2 and expert-parallel shards, resumed at other world sizes) is in
test_distributed.py."""

import json
import shutil

import pytest
import torch

from ermoe.train.checkpoint import CheckpointError, find_checkpoint, read_checkpoint

pytest.importorskip("sklearn")


def tiny(tmp_path, name, **extra):
    from ermoe.train.config import merge_settings

    return merge_settings({
        "out_dir": str(tmp_path), "run_name": name, "progress": False, "tensorboard": False, "log_every": 1,
        "probe_size": 16, "data": {"name": "digits", "train_limit": 256},
        "model": {"patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2,
                  "moe": {"router": "ermoe", "num_experts": 2, "blocks": "all"}},
        "optim": {"epochs": 2, "batch_size": 64, "warmup_steps": 1}}, extra)


def losses(run):
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_sharded_run_is_the_single_file_run_bit_for_bit_and_reads_whole(tmp_path):
    from ermoe.models import from_pretrained
    from ermoe.train import load_config, train
    from ermoe.train.export import export_run
    from ermoe.train.init_weights import read_weights
    from ermoe.train.checkpoint import IN_SHARDS, SHARDS, is_sharded

    single = train(load_config(None, tiny(tmp_path, "single")), quiet=True)  # 8 steps, checkpoints at 4 and 8
    sharded = train(load_config(None, tiny(tmp_path, "sharded", checkpoint_format="sharded",
                                           optim={"max_steps": 4, "ema": 0.9})), quiet=True)
    ckpt = sharded / "checkpoints" / "step_00000004"
    assert is_sharded(ckpt) and not (ckpt / "model.safetensors").exists()
    assert {p.name for p in (ckpt / SHARDS).iterdir()} == {".metadata", "__0_0.distcp"}
    stored = torch.load(ckpt / "state.pt", weights_only=True)["components"]
    assert stored["optimization"]["optimizer"]["state"] == IN_SHARDS and stored["ema"]["weights"] == IN_SHARDS
    # read whole: what the single-file run's checkpoint of the same step holds
    weights, state = read_checkpoint(ckpt)
    single_weights, single_state = read_checkpoint(single / "checkpoints" / "step_00000004")
    assert_same_tensors(weights, single_weights)
    ours, theirs = (s["components"]["optimization"]["optimizer"] for s in (state, single_state))
    assert ours["param_groups"] == theirs["param_groups"] and ours["state"].keys() == theirs["state"].keys()
    for index in theirs["state"]:
        assert_same_tensors(ours["state"][index], theirs["state"][index])
    assert state["components"]["ema"]["weights"].keys() == weights.keys()
    # resumed (each tensor loaded in place from the shards), the single-file run's curve, bit for bit
    from distributed_cases import train_job
    train_job(0, 1, {"optim": {"max_steps": None}}, resume=str(sharded))
    assert losses(sharded) == losses(single)
    final, _ = read_checkpoint(sharded / "checkpoints" / "step_00000008")
    assert_same_tensors(final, read_checkpoint(single / "checkpoints" / "step_00000008")[0])
    # whole for `ermoe export` (and the Hub folder back) and for model.init_checkpoint
    hub = export_run(sharded, tmp_path / "hub")
    assert_same_tensors(from_pretrained(hub).state_dict(), final)
    assert_same_tensors(read_weights(sharded), final)


def test_shards_of_another_model_or_corrupt_ones_are_refused_naming_the_problem(tmp_path):
    from ermoe.models import create_model
    from ermoe.train import load_config, train
    from ermoe.train.components import build_optimizer
    from ermoe.train.config import OptimConfig
    from ermoe.train.parallel import Parallel
    from ermoe.train.checkpoint import SHARDS
    from ermoe.train.shards import load_shards

    run = train(load_config(None, tiny(tmp_path, "run", checkpoint_format="sharded", optim={"max_steps": 4})),
                quiet=True)
    ckpt = run / "checkpoints" / "step_00000004"
    args = dict(num_classes=10, img_size=8, in_chans=1, patch_size=4, num_heads=2,
                moe=dict(router="ermoe", num_experts=2, blocks="all"))
    for model_args, problem in [
            (dict(depth=2, embed_dim=16), r"does not fit the model: missing \['blocks.1.attn.proj.bias'"),
            (dict(depth=1, embed_dim=32), r"does not fit the model: blocks.0.attn.proj.bias is \(16,\) there, "
                                          r"\(32,\) here")]:
        model = create_model("vit_tiny", **args, **model_args)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(CheckpointError, match=problem):
            load_shards(ckpt, model, build_optimizer(model, OptimConfig()), None, Parallel())
        assert_same_tensors(model.state_dict(), before)  # nothing half-loaded
    # a shard file truncated: named by its manifest, the older checkpoint taken instead (with a warning)
    shutil.copytree(ckpt, run / "checkpoints" / "step_00000002")
    manifest = json.loads((run / "checkpoints" / "step_00000002" / "manifest.json").read_text())
    (run / "checkpoints" / "step_00000002" / "manifest.json").write_text(json.dumps({**manifest, "step": 2}))
    shard = ckpt / SHARDS / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="__0_0.distcp is corrupt or truncated"):
        read_checkpoint(ckpt)
    with pytest.warns(UserWarning, match="step 2.*__0_0.distcp is corrupt or truncated"):
        found, weights, state = find_checkpoint(run, consolidate=False)
    assert found.name == "step_00000002" and weights is None and state["shards"] == str(found)
