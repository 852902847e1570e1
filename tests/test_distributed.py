"""Expert + data parallelism on gloo (spawned processes on 127.0.0.1): every output, loss, gradient and routing
state equal to one process on the whole batch (float64, 1e-10 relative), zero-token ranks and experts, resharding
of a whole-model state, and a failing rank that brings the job down instead of hanging."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distributed_cases as cases
from ermoe.distributed import ExpertParallelDispatcher, ParallelGroups, run_local, shard_experts

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

TOL = dict(rtol=1e-10, atol=1e-12)

# Routers whose every decision is per token: equal to one process on the whole batch. Buffers set where a case
# needs routing state to matter from the first step.
EXACT = {
    "ermoe": dict(router="ermoe", num_experts=4),
    "ermoe_top2_threshold": dict(router="ermoe", num_experts=4, top_k=2, router_kwargs={"threshold": 0.45}),
    "ermoe_standardize": dict(router="ermoe", num_experts=4, router_kwargs={"standardize": True}),
    "emoe_whiten_standardize": dict(router="emoe", num_experts=4, router_kwargs={"whiten": True, "standardize": True,
                                                                                "rank": 4}),
    "switch_top2": dict(router="softmax_topk", num_experts=4, top_k=2,
                        router_kwargs={"balance_weight": 0.5, "z_loss_weight": 0.1}),
    "cosine": dict(router="cosine", num_experts=4, router_kwargs={"balance_weight": 0.5}),
    "loss_free_bias": dict(router="loss_free_bias", num_experts=4, router_kwargs={"update_rate": 0.05}),
    "vmoe_noiseless_dropless": dict(router="vmoe", num_experts=4, top_k=2, capacity_factor=float("inf"),
                                    router_kwargs={"noise_std": 0.0, "importance_weight": 0.5}),
}


def _cases(splits: list[int], names=EXACT) -> list[dict]:
    return [dict(EXACT[n], splits=splits, name=n) for n in names]


def _assert_same(got: dict, ref: dict, name: str) -> None:
    for key in ("aux0", "aux1"):
        assert got[key] == pytest.approx(ref[key], rel=1e-10, abs=1e-12), f"{name}: {key}"
    for n, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][n], g, **TOL, msg=lambda m: f"{name}: grad {n}: {m}")
    for n, b in ref["buffers"].items():
        torch.testing.assert_close(got["buffers"][n], b, **TOL, msg=lambda m: f"{name}: buffer {n}: {m}")
    for n, t in ref["state"].items():
        torch.testing.assert_close(got["state"][n], t, **TOL, msg=lambda m: f"{name}: state {n}: {m}")


def _check(world: int, ep_size: int, splits: list[int], names=EXACT) -> None:
    todo = _cases(splits, names)
    results = run_local(cases.ep_job, world, ep_size, todo)
    for i, case in enumerate(todo):
        ref = cases.reference(case)
        for rank in range(world):
            got = results[rank][i]
            rows = cases.rows_of(rank, splits)
            for step in (0, 1):
                torch.testing.assert_close(got[f"y{step}"], ref[f"y{step}"][rows], **TOL,
                                           msg=lambda m: f"{case['name']} rank {rank} output {step}: {m}")
            _assert_same(got, ref, f"{case['name']} rank {rank}")


def test_expert_parallel_two_ranks_equals_one_process():
    _check(world=2, ep_size=2, splits=[7, 5])


def test_expert_and_data_parallel_four_ranks_equals_one_process():
    # 2 token-exchange groups of 2 ranks (EP 2 x DP 2): expert gradients reduced over the replicas of a shard.
    _check(world=4, ep_size=2, splits=[4, 6, 3, 5], names=["ermoe", "ermoe_standardize", "switch_top2",
                                                           "loss_free_bias"])


def test_expert_parallel_four_ranks_one_expert_each_with_a_rank_without_tokens():
    # Rank 2 has no token at all: it still takes part in every exchange, its DDP hooks fire, nothing hangs.
    _check(world=4, ep_size=4, splits=[6, 5, 0, 4], names=["ermoe", "switch_top2", "emoe_whiten_standardize"])


def test_a_global_batch_of_one_token_uses_the_running_statistics_without_a_host_branch():
    # The global token count stays a device tensor under a group: the standardizer chooses its running statistics
    # (one token in all) and the whitener keeps its running mean by torch.where / a zero lerp weight, as one process.
    _check(world=2, ep_size=2, splits=[1, 0], names=["ermoe_standardize", "emoe_whiten_standardize", "switch_top2"])


def test_capacity_and_expert_choice_decide_per_rank_as_token_groups():
    # Capacity (V-MoE's 1.05 with Batch Prioritized Routing; Switch with a tight capacity: drops) and expert choice's
    # top-C are per-batch decisions: each rank takes them on its own tokens, as GShard's groups. Equal to one process
    # that routes each rank's rows as a separate group.
    todo = [dict(router="vmoe", num_experts=4, top_k=2, splits=[9, 7], name="vmoe_capacity",
                 router_kwargs={"noise_std": 0.0, "importance_weight": 0.0, "load_weight": 0.0}),
            dict(router="softmax_topk", num_experts=4, capacity_factor=0.5, splits=[9, 7], name="switch_drops",
                 router_kwargs={"balance_weight": 0.0}),
            dict(router="expert_choice", num_experts=4, splits=[9, 7], name="expert_choice")]
    results = run_local(cases.ep_job, 2, 2, todo)
    for i, case in enumerate(todo):
        ref = cases.reference(case, per_rank_groups=True)
        assert cases.make_layer(case).capacity_factor is not None or case["router"] == "expert_choice"
        for rank in range(2):
            got = results[rank][i]
            for step in (0, 1):
                torch.testing.assert_close(got[f"y{step}"], ref[f"y{step}"][cases.rows_of(rank, case["splits"])],
                                           **TOL, msg=lambda m: f"{case['name']} rank {rank} output {step}: {m}")
            _assert_same(got, ref, f"{case['name']} rank {rank}")


def test_experts_without_tokens_get_zero_gradients_and_no_hang():
    # Every token's loss-free bias favours expert 0: the experts of rank 1 receive nothing in the first step.
    case = dict(router="loss_free_bias", num_experts=4, router_kwargs={"update_rate": 0.0},
                buffers={"router.expert_bias": [10.0, 0.0, 0.0, 0.0]}, splits=[5, 4], name="one_expert")
    got = run_local(cases.ep_job, 2, 2, [case])
    ref = cases.reference(case)
    assert ref["grads"]["experts.w1"][1:].abs().sum() == 0  # the premise: experts 1-3 got no token
    for rank in range(2):
        _assert_same(got[rank][0], ref, f"rank {rank}")


def test_whole_model_state_reshards_onto_other_expert_parallel_sizes():
    case = dict(EXACT["switch_top2"], splits=[3, 2, 4, 3], name="reshard")
    ref = cases.reference(case)  # a trained whole-model state
    for world, ep_size in ((4, 4), (4, 2)):
        results = run_local(cases.reshard_job, world, ep_size, case, ref["state"])
        layer = cases.make_layer(case)
        layer.load_state_dict(ref["state"])
        x, _ = cases.make_batch(case)
        with torch.no_grad():
            y = layer.eval()(x[0])
        for rank, got in enumerate(results):
            for n, t in ref["state"].items():
                torch.testing.assert_close(got["state"][n], t, rtol=0, atol=0)
            torch.testing.assert_close(got["y"], y[cases.rows_of(rank, case["splits"])], **TOL)


def test_a_failing_rank_brings_the_job_down_with_its_error():
    with pytest.raises(Exception, match="rank 1 failed on purpose"):
        run_local(cases.failing_job, 2, timeout_s=30)


def test_bad_expert_parallel_sizes_are_named_errors():
    groups = ParallelGroups(world_size=3, rank=0, ep_size=3, dp=None, stats=None, ep=None, expert_dp=None)
    layer = cases.make_layer(dict(router="ermoe", num_experts=4))
    with pytest.raises(ValueError, match="4 experts, which cannot be sharded over ep_size=3"):
        shard_experts(layer, groups)
    with pytest.raises(ValueError, match="no ermoe.MoE layer"):
        shard_experts(torch.nn.Linear(3, 3), groups)
    with pytest.raises(ValueError, match="divisible by ep_size"):
        ExpertParallelDispatcher(None, 3, 0, 4)



@pytest.mark.parametrize("splits", [[6, 6], [3, 9]], ids=["even", "uneven"])
def test_batchnorm_normalises_by_the_global_batch_on_every_rank(splits):
    # nn.BatchNorm1d/2d/3d become GlobalBatchNorm: a data-parallel step equals one process on the whole batch (outputs,
    # every gradient, running statistics, momentum None and no running stats alike); recalibration, which every
    # rank runs on the same batches, stays local (synced, its unbiased variance would count the batch twice).
    ref = cases.bn_reference(splits)
    results = run_local(cases.bn_job, 2, splits)
    for rank, got in enumerate(results):
        assert got["converted"] == 4
        rows = cases.rows_of(rank, splits)
        for step in (0, 1):
            torch.testing.assert_close(got[f"y{step}"], ref[f"y{step}"][rows], **TOL,
                                       msg=lambda m: f"rank {rank} output {step}: {m}")
        for key in ("grads", "state", "recalibrated"):
            assert got[key].keys() == ref[key].keys()
            for n, t in ref[key].items():
                torch.testing.assert_close(got[key][n], t, **TOL, msg=lambda m: f"rank {rank} {key} {n}: {m}")
        torch.testing.assert_close(got["eval"], ref["eval"], **TOL)


def test_sync_batchnorm_keeps_tensors_and_warns_about_subclasses():
    from ermoe.distributed import GlobalBatchNorm, sync_batchnorm

    class FusedBatchNormAct(torch.nn.BatchNorm2d):
        pass

    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3), FusedBatchNormAct(3))
    weight, running = net[0].weight, net[0].running_mean
    groups = ParallelGroups(world_size=2, rank=0, ep_size=1, dp=None, stats=None, ep=None, expert_dp=None)
    with pytest.warns(UserWarning, match=r"1 \(FusedBatchNormAct\) keep BatchNorm statistics of each rank"):
        sync_batchnorm(net, groups)
    assert type(net[0]) is GlobalBatchNorm and type(net[1]) is FusedBatchNormAct
    assert net[0].weight is weight and net[0].running_mean is running  # the optimizer's tensors, not copies
    # Without a group it is an ordinary BatchNorm (float64, training and eval).
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    plain, synced = torch.nn.BatchNorm2d(3).double(), GlobalBatchNorm(3, sync_group=None).double()
    torch.testing.assert_close(synced(x), plain(x), **TOL)
    torch.testing.assert_close(synced.running_var, plain.running_var, **TOL)
    torch.testing.assert_close(synced.eval()(x), plain.eval()(x), **TOL)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        synced.train()(x[:1, :, :1, :1])
    # bfloat16 activations: statistics in float32, the output in bfloat16 (as native BatchNorm on mixed input)
    half = x.float().bfloat16()
    plain, synced = torch.nn.BatchNorm2d(3), GlobalBatchNorm(3)
    got, want = synced(half), plain(half)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(synced.running_var, plain.running_var, rtol=1e-5, atol=1e-6)

# -- the training loop: `torchrun -m ermoe train` -------------------------------------------------------------------

def _train_log(run) -> tuple[list[tuple[int, float]], dict]:
    import json
    from pathlib import Path
    lines = [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]
    metrics = json.loads((Path(run) / "metrics.json").read_text())
    return [(r["step"], r["loss"]) for r in lines if r["kind"] == "train"], metrics


def _same_curve(a, b, rtol: float) -> None:
    assert [s for s, _ in a] == [s for s, _ in b]
    for (step, la), (_, lb) in zip(a, b):
        assert abs(la - lb) <= rtol * abs(lb), f"step {step}: {la} vs {lb}"


# float32 sums in another order (a rank's half of the batch, DDP's average): measured 1.5e-7 (EP 2 and DP 2)
# relative over 16 steps; the curves agree to this, not bitwise.
CURVE_RTOL = 1e-5


def test_two_rank_expert_parallel_training_follows_the_one_process_curve_and_resumes_anywhere(tmp_path):
    pytest.importorskip("sklearn")
    from ermoe.train import load_config, train

    one = train(load_config(None, cases.tiny_digits(str(tmp_path / "one"))), quiet=True)
    curve_one, metrics_one = _train_log(one)
    # 2 ranks, experts sharded 2 ways, stopped half-way; then resumed on 1 process and (another copy) on 4 ranks.
    part = run_local(cases.train_job, 2, cases.tiny_digits(str(tmp_path / "two"), ep_size=2,
                                                          optim={"max_steps": 8}))[0]
    half, _ = _train_log(part)
    _same_curve(half, curve_one[:8], CURVE_RTOL)
    import shutil
    shutil.copytree(part, tmp_path / "four" / "run")
    resumed_one = cases.train_job(0, 1, {"ep_size": 1, "optim": {"max_steps": None}}, resume=part)
    curve, metrics = _train_log(resumed_one)
    _same_curve(curve, curve_one, CURVE_RTOL)
    assert metrics["test_top1"] == pytest.approx(metrics_one["test_top1"], abs=2 / metrics_one["test_images"])
    resumed_four = run_local(cases.train_job, 4, {"ep_size": 4, "optim": {"max_steps": None}},
                             str(tmp_path / "four" / "run"))[0]
    curve, metrics = _train_log(resumed_four)
    _same_curve(curve, curve_one, CURVE_RTOL)
    assert metrics["world_size"] == 4 and metrics["ep_size"] == 4
    assert metrics["params_total"] == metrics_one["params_total"]  # the whole model's, not one rank's shard


def test_expert_parallel_without_torchrun_is_a_named_error(tmp_path):
    from ermoe.train import ConfigError, load_config, train
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node=2"):
        train(load_config(None, cases.tiny_digits(str(tmp_path), ep_size=2)), quiet=True)
    for key, value, message in (("ep_size", 0, "ep_size must be >= 1"), ("dist_timeout_s", 0, "dist_timeout_s must be > 0")):
        with pytest.raises(ConfigError, match=message):  # when the config is read, before any process group
            load_config(None, cases.tiny_digits(str(tmp_path), **{key: value}))


def test_contrastive_retrieval_on_two_ranks_follows_the_one_process_curve(tmp_path):
    # InfoNCE's negatives are the whole global batch: each rank gathers every rank's embeddings (its own keep their
    # gradient), so 2 ranks (EP 2 in both towers) train as one process does; and the caption each image is paired
    # with is drawn from the (seed, step, image) stream, as in one process.
    pytest.importorskip("tokenizers")
    pytest.importorskip("PIL")
    from test_retrieval import TINY, _entry, _karpathy

    from ermoe.train import load_config, train

    entries = [_entry(f"{i}.jpg", "test" if i >= 56 else "val" if i >= 48 else "train",
                      [f"a photo number {i}", f"picture {i} of a dog", "a cat"]) for i in range(64)]
    path, root = _karpathy(tmp_path, entries)

    def overrides(out: str, **extra):
        return {"task": "retrieval", "out_dir": str(tmp_path / out), "run_name": "run", "progress": False,
                "tensorboard": False, "probe_size": 8, "log_every": 1,
                "data": {"name": "karpathy", "json": str(path), "image_root": str(root), "img_size": 32},
                "model": {"name": "dual_encoder", **TINY}, "task_options": {"vocab_size": 60},
                "optim": {"epochs": 2, "batch_size": 16, "eval_batch_size": 64, "warmup_steps": 1}, **extra}

    one, metrics_one = _train_log(train(load_config(None, overrides("one")), quiet=True))
    two, metrics_two = _train_log(run_local(cases.train_job, 2, overrides("two", ep_size=2))[0])
    assert len(one) == 6
    _same_curve(two, one, CURVE_RTOL)
    assert metrics_two["test_rsum"] == pytest.approx(metrics_one["test_rsum"], abs=1e-6)



def test_a_streamed_imagefolder_on_two_ranks_with_loader_workers_follows_the_one_process_curve(tmp_path):
    # Each rank decodes only its rows, in a loader worker, with DeiT's augmentation and pair-wise mixup / CutMix
    # drawn per example: the ranks' halves are one process's batches (no worker), so the curves agree.
    pytest.importorskip("PIL")
    from test_streaming import make_folder

    from ermoe.train import load_config, train

    folder = make_folder(tmp_path / "folder")

    def overrides(out: str, workers: int, **extra):
        return {"out_dir": str(tmp_path / out), "run_name": "run", "progress": False, "tensorboard": False,
                "probe_size": 8, "log_every": 1,
                "data": {"name": "imagefolder", "data_dir": str(folder), "img_size": 16, "num_workers": workers,
                         "augment": {}},
                "model": {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2,
                          "moe": {"router": "ermoe", "num_experts": 4, "blocks": "all"}},
                "optim": {"epochs": 2, "batch_size": 8, "eval_batch_size": 16, "warmup_steps": 1}, **extra}

    one, metrics_one = _train_log(train(load_config(None, overrides("one", 0)), quiet=True))
    two, metrics_two = _train_log(run_local(cases.train_job, 2, overrides("two", 1, ep_size=2))[0])
    assert len(one) == 8
    _same_curve(two, one, CURVE_RTOL)
    assert metrics_two["test_top1"] == pytest.approx(metrics_one["test_top1"], abs=1e-9)


WHOLE_MODELS = {
    # one gate per image over MoE layers (sharded 2 ways); k-means on the features of every rank at step 3
    "single_gate": ({"name": "single_gated_vit", "patch_size": 2, "depth": 2, "embed_dim": 32, "num_heads": 2,
                     "num_experts": 4, "blocks": "all", "kmeans_step": 3, "kmeans_samples": 128}, 2),
    # channels gated per image, BatchNorm after every conv: data parallel only (its experts are not MoE layers)
    "deepmoe": ({"name": "deepmoe_cnn", "widths": [8, 16, 16], "embed_dim": 8}, 1),
}


@pytest.mark.parametrize("name", sorted(WHOLE_MODELS))
def test_whole_model_baselines_on_two_ranks_follow_the_one_process_curve(tmp_path, name):
    pytest.importorskip("sklearn")
    from ermoe.train import load_config, train

    model, ep_size = WHOLE_MODELS[name]

    def overrides(out: str, **extra):
        cfg = cases.tiny_digits(str(tmp_path / out), **extra)
        cfg["model"] = dict(model)
        return cfg

    one, metrics_one = _train_log(train(load_config(None, overrides("one")), quiet=True))
    two, metrics_two = _train_log(run_local(cases.train_job, 2, overrides("two", ep_size=ep_size))[0])
    _same_curve(two, one, CURVE_RTOL)
    assert metrics_two["test_top1"] == pytest.approx(metrics_one["test_top1"], abs=2 / metrics_one["test_images"])
    if ep_size == 1:  # DeepMoE's gated channels are no MoE layer: expert parallelism is a named error
        from ermoe.models import create_model
        groups = ParallelGroups(world_size=2, rank=0, ep_size=2, dp=None, stats=None, ep=None, expert_dp=None)
        with pytest.raises(ValueError, match="ep_size=2: the model has no ermoe.MoE layer whose experts could be"):
            shard_experts(create_model(model["name"], **{k: v for k, v in model.items() if k != "name"}), groups)


def test_host_flags_get_a_gloo_group_beside_a_plain_nccl_job():
    """Issue 38, defect 6: a CPU flag (a rank's divergence) on a caller's plain NCCL group fails; the groups carry a
    gloo group for host flags, so no flag is copied to a GPU and read back."""
    from ermoe.distributed import serves_cpu

    assert serves_cpu("gloo") and serves_cpu("cpu:gloo,cuda:nccl") and not serves_cpu("nccl")
    results = run_local(cases.host_flags_job, 2)
    assert [r["separate"] for r in results] == [True, True]
    assert [r["all_finite"] for r in results] == [False, False]  # rank 1 said not finite: every rank stops
    assert {r["backend"] for r in results} == {"gloo"}


def test_torchrun_with_one_process_joins_a_process_group_when_asked(tmp_path, monkeypatch):
    """Issue 38, defect 6: ``torchrun --nproc_per_node=1`` made no process group (NCCL never ran); with
    ``distributed=true`` it does; without torchrun that setting is a named error, and ``cuda:N`` in a job must be
    the rank's own GPU."""
    import torch.distributed as dist

    from ermoe.distributed import free_port
    from ermoe.train import load_config
    from ermoe.train.config import ConfigError
    from ermoe.train.parallel import Parallel

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    cfg = load_config(None, {"out_dir": str(tmp_path), "distributed": True})
    with pytest.raises(ConfigError, match="launch with torchrun"):
        Parallel.from_config(cfg)
    assert Parallel.from_config(load_config(None, {"out_dir": str(tmp_path)})).groups is None  # as before
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    parallel = Parallel.from_config(cfg)
    try:
        assert dist.is_initialized() and dist.get_world_size() == 1 and parallel.groups is not None
        assert parallel.sum_stats({"loss": torch.tensor(2.0)}) == {"loss": 2.0}  # a real collective
        with pytest.raises(ConfigError, match="LOCAL_RANK"):
            parallel.device(torch.device("cuda", 1))
    finally:
        parallel.close()
    assert not dist.is_initialized()


def test_the_token_exchange_sends_the_autocast_dtype():
    """Issue 38, defect 8: under bf16 autocast the experts compute in bf16, so the tokens travel in bf16 (half the
    bytes of float32), both ways and in backward; the layer's input gradient is float32 as its input."""
    results = run_local(cases.autocast_exchange_job, 2)
    for r in results:
        assert set(r["sent"]) == {"torch.bfloat16"} and len(r["sent"]) == 4, r  # 2 forward, 2 backward
        assert r["grad"] == "torch.float32"


# FSDP2's curves against one process: 1.05e-7 / 1.04e-7 relative at most over 16 steps on 2 / 4 ranks
# (python benchmarks/fsdp_curve.py)
FSDP_RTOL = 1e-6


def test_fsdp2_follows_the_one_process_curve_and_resumes_at_another_world_size(tmp_path):
    """shard: fsdp (FSDP2's fully_shard per ViT block: weights, gradients, AdamW moments and the EMA copy sharded
    over 2 gloo ranks): the same loss curve as one process to 1e-6; its sharded checkpoint (DCP, each rank its
    shards) resumes over 4 sharded ranks to the same curve and reads whole to the one process's weights and EMA
    weights (a one-process single-file
    checkpoint resumed sharded: test_fsdp2_beside_expert_parallelism_follows_the_one_process_curve)."""
    pytest.importorskip("sklearn")
    from ermoe.train import ConfigError, load_config, train
    from ermoe.train.checkpoint import SHARDS, read_checkpoint

    ema = {"ema": 0.9}  # (the EMA copy sharded like the model, updated shard by shard)
    one = train(load_config(None, cases.tiny_digits(str(tmp_path / "one"), optim=ema)), quiet=True)
    curve_one, metrics_one = _train_log(one)
    # 2 sharded ranks for the first epoch (8 steps), then on to the end over 4 from their sharded checkpoint
    part = run_local(cases.train_job, 2, cases.tiny_digits(str(tmp_path / "part"), shard="fsdp",
                                                          optim={"max_steps": 8, **ema}))[0]
    curve, metrics = _train_log(part)
    _same_curve(curve, curve_one[:8], FSDP_RTOL)
    assert metrics["world_size"] == 2 and metrics["params_total"] == metrics_one["params_total"]
    shards = Path(part) / "checkpoints" / "step_00000008" / SHARDS
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    resumed = run_local(cases.train_job, 4, {"optim": {"max_steps": None}}, part)[0]
    curve, metrics = _train_log(resumed)
    _same_curve(curve, curve_one, FSDP_RTOL)
    assert metrics["test_top1"] == pytest.approx(metrics_one["test_top1"], abs=2 / metrics_one["test_images"])
    assert metrics["ema"]["test_loss"] == pytest.approx(metrics_one["ema"]["test_loss"], rel=1e-5)
    whole, state = read_checkpoint(Path(resumed) / "checkpoints" / "step_00000016")
    expected, expected_state = read_checkpoint(Path(one) / "checkpoints" / "step_00000016")
    for name, (ours, theirs) in {"weights": (whole, expected), "EMA weights": (
            state["components"]["ema"]["weights"], expected_state["components"]["ema"]["weights"])}.items():
        assert ours.keys() == theirs.keys(), name
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
    with pytest.raises(ConfigError, match="shard: fsdp shards the weights over the processes of a torchrun job"):
        train(load_config(None, cases.tiny_digits(str(tmp_path / "alone"), shard="fsdp")), quiet=True)


def _expert_chunks(run, step: int, key: str) -> list[tuple[tuple[int, ...], int]]:
    """(offsets, rows) of each chunk of ``key`` a sharded checkpoint holds."""
    from torch.distributed.checkpoint import FileSystemReader

    from ermoe.train.checkpoint import SHARDS

    meta = FileSystemReader(str(Path(run) / "checkpoints" / f"step_{step:08d}" / SHARDS)).read_metadata()
    return sorted((tuple(c.offsets), c.sizes[0]) for c in meta.state_dict_metadata[key].chunks)


EXPERT_W2 = "blocks.0.mlp.moe.experts.w2"  # (4 experts of tiny_digits' first block)


def test_expert_parallel_shards_resume_in_one_process(tmp_path):
    """checkpoint_format: sharded under expert parallelism (2 ranks, ep_size 2, DDP): each rank's experts' rows
    written as a DTensor over its expert group, with their moments and the EMA weights; one process resumes them to
    the one-process curve."""
    pytest.importorskip("sklearn")
    from ermoe.train import load_config, train

    curve_one, _ = _train_log(train(load_config(None, cases.tiny_digits(str(tmp_path / "one"))), quiet=True))
    part = run_local(cases.train_job, 2, cases.tiny_digits(str(tmp_path / "ep"), ep_size=2, checkpoint_format="sharded",
                                                          optim={"max_steps": 8, "ema": 0.99}))[0]
    for key in (f"model/{EXPERT_W2}", f"optimizer/{EXPERT_W2}/exp_avg", f"ema/{EXPERT_W2}"):
        assert _expert_chunks(part, 8, key) == [((0, 0, 0), 2), ((2, 0, 0), 2)]
    resumed = cases.train_job(0, 1, {"ep_size": 1, "optim": {"max_steps": None}}, resume=part)
    curve, metrics = _train_log(resumed)
    _same_curve(curve, curve_one, CURVE_RTOL)
    assert set(metrics["ema"]) >= {"test_top1", "test_loss"}


def test_fsdp2_beside_expert_parallelism_follows_the_one_process_curve(tmp_path):
    """shard: fsdp with ep_size 2 on 4 ranks (2 replicas of each expert shard): the experts sharded over their
    expert group (their gradients averaged over the replicas), every other weight FSDP2-sharded over all 4; gradient
    clipping by the whole norm. The one-process curve to 1e-6; its sharded checkpoint holds each expert shard once;
    the one-process run's single-file checkpoint resumed over the same 4 ranks writing single-file checkpoints (the
    whole model and optimizer gathered): the one-process curve and final weights and moments to float32 rounding."""
    pytest.importorskip("sklearn")
    from ermoe.train import load_config, train
    from ermoe.train.checkpoint import read_checkpoint

    clip = {"clip_grad": 0.5}  # (engaged from step 3: the curve differs from an unclipped one there)
    one = train(load_config(None, cases.tiny_digits(str(tmp_path / "one"), optim=clip)), quiet=True)
    curve_one, _ = _train_log(one)
    part = run_local(cases.train_job, 4, cases.tiny_digits(str(tmp_path / "fe"), shard="fsdp", ep_size=2,
                                                          optim={"max_steps": 8, **clip}))[0]
    _same_curve(_train_log(part)[0], curve_one[:8], FSDP_RTOL)
    for key in (f"model/{EXPERT_W2}", f"optimizer/{EXPERT_W2}/exp_avg_sq"):
        assert _expert_chunks(part, 8, key) == [((0, 0, 0), 2), ((2, 0, 0), 2)]
    # the one-process run's single-file checkpoint of step 8 (a copy of the run without its later one), resumed
    # over the same 4 ranks, writing single-file checkpoints
    import shutil
    single = tmp_path / "single" / "run"
    shutil.copytree(one, single)
    shutil.rmtree(single / "checkpoints" / "step_00000016")
    (single / "checkpoints" / "latest").write_text("step_00000008\n")
    resumed = run_local(cases.train_job, 4, {"shard": "fsdp", "ep_size": 2, "checkpoint_format": "single",
                                             "optim": {"max_steps": None}}, str(single))[0]
    _same_curve(_train_log(resumed)[0], curve_one, FSDP_RTOL)
    whole, state = read_checkpoint(Path(resumed) / "checkpoints" / "step_00000016")
    expected, expected_state = read_checkpoint(Path(one) / "checkpoints" / "step_00000016")
    assert (Path(resumed) / "checkpoints" / "step_00000016" / "model.safetensors").exists()
    assert whole.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(whole[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
    moments, expected_moments = (s["components"]["optimization"]["optimizer"]["state"]
                                 for s in (state, expected_state))
    assert moments.keys() == expected_moments.keys()
    for index in expected_moments:
        torch.testing.assert_close(moments[index]["exp_avg"], expected_moments[index]["exp_avg"], rtol=1e-3,
                                   atol=1e-7)


