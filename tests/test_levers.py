"""The field's training levers as options: gradient accumulation (``optim.accum_steps``), an EMA of the weights
(``optim.ema``), fused AdamW on CUDA; and the process group's backend on a CUDA machine."""

import json

import pytest
import torch

from ermoe.data.batches import Batch
from ermoe.train import ConfigError, evaluate, load_checkpoint, load_config, train
from ermoe.train import trainer as trainer_mod
from ermoe.train.components import build_optimizer
from ermoe.train.run import Run

pytest.importorskip("sklearn")


def tiny(tmp_path, router="ermoe", **optim):
    return load_config(None, {
        "out_dir": str(tmp_path), "run_name": "run", "progress": False, "tensorboard": False, "log_every": 1,
        "probe_size": 32, "data": {"name": "digits", "train_limit": 640},
        "model": {"patch_size": 2, "depth": 2, "embed_dim": 32, "num_heads": 2,
                  "moe": {"router": router, "num_experts": 4, "blocks": "all"}},
        "optim": {"epochs": 2, "batch_size": 64, "warmup_steps": 3, "eval_batch_size": 128, **optim}})


def step_gradients(tmp_path, batch: Batch, router: str, accum: int) -> dict[str, torch.Tensor]:
    """The gradients one training step of ``batch`` leaves, in float64, with ``accum`` micro-batches."""
    cfg = tiny(tmp_path / f"{router}-{accum}-{len(batch)}", router, accum_steps=accum)
    task, model, device = trainer_mod.setup(cfg)
    model.double()
    trainer = trainer_mod.Trainer(cfg, Run.new(cfg), task, model, device, quiet=True)
    try:
        trainer._train_step(batch, epoch=0)
    finally:
        trainer.close()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def digits_batch(tmp_path, size=64) -> Batch:
    task, _, _ = trainer_mod.setup(tiny(tmp_path / "data"))
    batch = next(task.eval_batches("train", size))
    return Batch((batch.inputs[0].double(),), batch.target)


def test_two_micro_batches_of_32_give_the_gradient_of_one_batch_of_64_in_float64(tmp_path):
    batch = digits_batch(tmp_path)
    whole = step_gradients(tmp_path, batch, "ermoe", 1)
    micro = step_gradients(tmp_path, batch, "ermoe", 2)
    assert whole.keys() == micro.keys() and len(whole) > 10
    for name in whole:
        torch.testing.assert_close(micro[name], whole[name], rtol=1e-10, atol=1e-13, msg=name)


def test_auxiliary_losses_combine_as_the_mean_over_micro_batches(tmp_path):
    """A balancing loss is computed per micro-batch: the step's gradient is the mean of the micro-batches'
    gradients, which is not the whole batch's (the loss is a product of batch means, not a mean)."""
    batch = digits_batch(tmp_path)
    micro = step_gradients(tmp_path, batch, "softmax_topk", 2)
    halves = [step_gradients(tmp_path, batch.rows(lo, lo + 32), "softmax_topk", 1) for lo in (0, 32)]
    whole = step_gradients(tmp_path, batch, "softmax_topk", 1)
    for name in micro:
        torch.testing.assert_close(micro[name], (halves[0][name] + halves[1][name]) / 2, rtol=1e-10, atol=1e-13,
                                   msg=name)
    gate = next(n for n in micro if "router" in n)
    assert not torch.allclose(micro[gate], whole[gate], rtol=1e-6, atol=0)


def test_accumulation_trains_like_the_whole_batch_and_resumes(tmp_path):
    """Through the whole loop (float32): the loss curve of 4 x 16 follows 1 x 64 to float32 rounding."""
    one = train(tiny(tmp_path / "one", max_steps=6), quiet=True)
    four = train(tiny(tmp_path / "four", accum_steps=4, max_steps=6), quiet=True)
    curves = []
    for run in (one, four):
        lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        curves.append([r["loss"] for r in lines if r["kind"] == "train"])
    assert len(curves[0]) == 6
    for a, b in zip(*curves):
        assert abs(a - b) <= 1e-5 * abs(a), curves


def test_accumulation_settings_that_cannot_apply_are_named_errors(tmp_path):
    with pytest.raises(ConfigError, match="optim.batch_size must be divisible by optim.accum_steps"):
        tiny(tmp_path, accum_steps=3)
    with pytest.raises(ConfigError, match="optim.accum_steps must be >= 1, got 0"):
        tiny(tmp_path, accum_steps=0)
    with pytest.raises(ConfigError, match="optim.ema must be < 1, got 1.0"):
        tiny(tmp_path, ema=1.0)


def test_ema_is_evaluated_beside_the_raw_weights_and_resumes_exactly(tmp_path):
    full = train(tiny(tmp_path / "full", ema=0.9), quiet=True)
    metrics = json.loads((full / "metrics.json").read_text())
    assert set(metrics["ema"]) == {"test_top1", "test_top5", "test_loss"}
    assert metrics["ema"]["test_loss"] != metrics["test_loss"]  # other weights
    part = train(tiny(tmp_path / "part", ema=0.9, max_steps=7), quiet=True)
    resumed = train(tiny(tmp_path / "part", ema=0.9), resume=part, quiet=True)
    _, state_full = load_checkpoint(full)
    _, state_resumed = load_checkpoint(resumed)
    ema_full, ema_resumed = (s["components"]["ema"]["weights"] for s in (state_full, state_resumed))
    assert ema_full.keys() == ema_resumed.keys()
    for key, value in ema_full.items():
        torch.testing.assert_close(ema_resumed[key], value, rtol=0, atol=1e-6, msg=key)
    again = evaluate(full, quiet=True)  # `ermoe eval` reads the checkpoint's EMA weights back
    assert again["ema"]["test_top1"] == pytest.approx(metrics["ema"]["test_top1"])


def test_the_ema_is_timms_recursion_on_the_weights(tmp_path):
    """After steps 1 and 2: EMA_1 = W_1 (timm starts from the first weights), EMA_2 = d EMA_1 + (1 - d) W_2."""
    cfg = tiny(tmp_path, ema=0.75)
    task, model, device = trainer_mod.setup(cfg)
    trainer = trainer_mod.Trainer(cfg, Run.new(cfg), task, model, device, quiet=True)
    weights = []
    try:
        for batch in task.train_batches(0, 2):
            trainer._train_step(batch, 0)
            trainer._update()
            weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        ema = dict(trainer.ema.module.named_parameters())
    finally:
        trainer.close()
    for name, w2 in weights[1].items():
        torch.testing.assert_close(ema[name].detach(), 0.75 * weights[0][name] + 0.25 * w2, msg=name)


def test_accumulation_refuses_a_loss_over_the_whole_batch(tmp_path):
    from ermoe.data.images import DEBIAN_FASHION_MNIST

    pytest.importorskip("tokenizers")
    if not DEBIAN_FASHION_MNIST.exists():  # the task's objective is known once its data is loaded
        pytest.skip("needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    cfg = load_config(None, {"task": "retrieval", "model": {"name": "dual_encoder"},
                             "data": {"name": "fashion_captions", "caption_set_size": 200, "train_limit": 64,
                                      "test_limit": 32},
                             "optim": {"batch_size": 32, "accum_steps": 2}, "out_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="negatives"):
        trainer_mod.setup(cfg)


def test_the_backend_chosen_on_a_cuda_machine_has_gloo_beside_nccl(monkeypatch):
    from ermoe.distributed import default_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_backend() == "cpu:gloo,cuda:nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_backend() == "gloo"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL refuses to start without one)")
def test_the_backend_on_a_cuda_machine_serves_cpu_and_cuda_tensors():
    """In a world of one on a GPU: the job's process group takes a CPU tensor (gloo) and a CUDA one (NCCL), in the
    default group and in a group made as init_parallel makes its groups."""
    import torch.distributed as dist

    from ermoe.distributed import default_backend, free_port

    dist.init_process_group(default_backend(), init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        for device in ("cpu", "cuda"):
            flag = torch.ones(3, device=device)
            dist.all_reduce(flag)
            dist.all_reduce(flag, group=group)
            assert flag.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adamw_is_fused_on_cuda(tmp_path):
    cfg = tiny(tmp_path)
    model = torch.nn.Linear(4, 4)
    assert build_optimizer(model, cfg.optim).defaults["fused"] is None  # CPU: PyTorch's default (foreach)
    assert build_optimizer(model.cuda(), cfg.optim).defaults["fused"] is True


def test_compiled_training_follows_the_eager_curve_and_does_not_recompile_as_expert_loads_change(tmp_path):
    """optim.compile (aot_eager: the graphs without code generation): the loss curve is the eager one, and the graphs
    made in the first steps serve every later step although each step sends other token counts to each expert."""
    from torch._dynamo.utils import counters

    eager = train(tiny(tmp_path / "eager", max_steps=6), quiet=True)
    graphs = {}
    for steps in (3, 6):
        torch._dynamo.reset()
        counters.clear()
        with pytest.warns(UserWarning, match="do not scan their inputs for NaN"):
            run = train(tiny(tmp_path / f"compiled{steps}", compile="aot_eager", max_steps=steps), quiet=True)
        graphs[steps] = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    curves = []
    for r in (eager, run):
        lines = [json.loads(line) for line in (r / "log.jsonl").read_text().splitlines()]
        curves.append([x["loss"] for x in lines if x["kind"] == "train"])
    assert len(curves[1]) == 6
    for a, b in zip(*curves):
        assert abs(a - b) <= 1e-5 * abs(a), curves
    assert graphs[3] == graphs[6] > 0


def test_compile_backend_is_checked_and_not_combined_with_grad_checkpointing(tmp_path):
    with pytest.raises(ConfigError, match="optim.compile must be null or a torch.compile backend"):
        tiny(tmp_path, compile="inductr")
    with pytest.raises(ConfigError, match="model.grad_checkpointing with optim.compile"):
        load_config(None, {"model": {"grad_checkpointing": True}, "optim": {"compile": "aot_eager"}})


def _fwd_bwd(model, *inputs):
    model.train()
    out = model(*inputs)
    out = torch.cat([o.reshape(len(inputs[0]), -1) for o in out[:2]], 1) if isinstance(out, tuple) else out
    (out.square().mean() + model.aux_loss()).backward()
    return ({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            {n: b.clone() for n, b in model.named_buffers()})


@pytest.mark.parametrize("name", ["vit", "sfcn3d", "dual_encoder"])
def test_activation_checkpointing_gives_the_same_gradients_and_updates_state_once(name):
    """float64: the gradients with checkpointed blocks equal those without, and the buffers a forward updates
    (BatchNorm statistics, loss-free bias's load counts) are updated once, not again by the recomputation."""
    from ermoe.models import create_model

    moe = {"router": "loss_free_bias", "num_experts": 4, "blocks": "all"}
    if name == "vit":
        build = lambda: create_model("vit_tiny", num_classes=5, img_size=8, in_chans=1, patch_size=2, depth=2,  # noqa: E731
                                     embed_dim=16, num_heads=2, moe=moe)
        inputs = (torch.randn(6, 1, 8, 8, dtype=torch.float64),)
    elif name == "sfcn3d":
        build = lambda: create_model("sfcn3d", in_chans=1, volume_shape=(16, 16, 16), num_outputs=2,  # noqa: E731
                                     channels=[4, 8, 8], moe={"router": "loss_free_bias", "num_experts": 4})
        inputs = (torch.randn(4, 1, 16, 16, 16, dtype=torch.float64),)
    else:
        build = lambda: create_model("dual_encoder", img_size=16, in_chans=1, vocab_size=30, context_length=8,  # noqa: E731
                                     image={"name": "vit_tiny", "embed_dim": 16, "num_heads": 2, "depth": 2,
                                            "patch_size": 8, "moe": moe},
                                     text={"width": 16, "depth": 2, "num_heads": 2, "moe": moe})
        inputs = (torch.randn(3, 1, 16, 16, dtype=torch.float64), torch.tensor([[3, 4, 5, 0, 0, 0, 0, 0]] * 3))
    results = []
    for enable in (False, True):
        torch.manual_seed(0)
        model = build().double()
        if enable:
            model.set_grad_checkpointing(True)
        results.append(_fwd_bwd(model, *inputs))
    (grads, buffers), (grads_ckpt, buffers_ckpt) = results
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 5
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-10, atol=1e-12, msg=n)
    counted = [n for n in buffers if n.endswith(("load_since_step", "running_mean", "num_batches_tracked"))]
    assert counted
    for n in buffers:
        torch.testing.assert_close(buffers_ckpt[n], buffers[n], rtol=0, atol=0, msg=n)


def test_grad_checkpointing_through_the_loop_and_a_model_without_it(tmp_path):
    plain = train(tiny(tmp_path / "plain", max_steps=4), quiet=True)
    cfg = tiny(tmp_path / "ckpt", max_steps=4)
    cfg.model.grad_checkpointing = True
    ckpt = train(cfg, quiet=True)
    curves = []
    for r in (plain, ckpt):
        lines = [json.loads(line) for line in (r / "log.jsonl").read_text().splitlines()]
        curves.append([x["loss"] for x in lines if x["kind"] == "train"])
    assert curves[0] == pytest.approx(curves[1], rel=1e-6)
    single = load_config(None, {"out_dir": str(tmp_path), "data": {"name": "digits"},
                                "model": {"name": "single_gated_vit", "patch_size": 2, "grad_checkpointing": True}})
    with pytest.raises(ConfigError, match="SingleGatedViT has no activation checkpointing"):
        trainer_mod.setup(single)
