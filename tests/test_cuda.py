"""Every study method on a CUDA GPU (skipped without one): the GPU's forward pass and gradients match the CPU's in
fp32, and each method trains through the trainer on the GPU (bf16 autocast) to finite metrics."""

import json
import math

import pytest
import torch

from ermoe.study import METHODS, method_model
from ermoe.train import create_task
from ermoe.train import load_config, train
from ermoe.train.trainer import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("sklearn")

BASE_MODEL = {"patch_size": 2, "depth": 2, "embed_dim": 32, "num_heads": 2,
              "moe": {"num_experts": 4, "top_k": 1, "blocks": "all"}}


def config(tmp_path, method, **extra):
    model = method_model(method, BASE_MODEL)
    if method == "single_gate":  # reach the k-means step within the run
        model.update(kmeans_step=2, kmeans_samples=64)
    return load_config(None, {"out_dir": str(tmp_path), "run_name": method, "progress": False, "tensorboard": False,
                              "probe_size": 32, "data": {"name": "digits", "train_limit": 256, "hflip": False},
                              "model": model, "optim": {"epochs": 1, "batch_size": 64, "warmup_steps": 1}, **extra})


@pytest.fixture(autouse=True)
def full_fp32():
    """cuDNN convolutions default to TF32 (10-bit mantissa): the comparison with the CPU needs true fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("method", list(METHODS))
def test_gpu_forward_and_gradients_match_cpu(tmp_path, method):
    cfg = config(tmp_path, method)
    task = create_task(cfg, torch.device("cpu"))
    task.load()
    torch.manual_seed(0)
    model = build_model(cfg, task).eval()  # eval: no router noise, the same expert choice on both devices
    (x,) = next(task.eval_batches("test", 16)).inputs
    outputs = []
    for device in ("cpu", "cuda"):
        model.to(device).zero_grad()
        y = model(x.to(device))
        y.square().sum().backward()
        grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
        outputs.append((y.detach().cpu(), grads))
    (y_cpu, g_cpu), (y_gpu, g_gpu) = outputs
    torch.testing.assert_close(y_gpu, y_cpu, atol=1e-4, rtol=1e-4)
    assert g_cpu.keys() == g_gpu.keys() and g_cpu
    for name, g in g_cpu.items():
        torch.testing.assert_close(g_gpu[name], g, atol=1e-3, rtol=1e-3, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_on_the_gpu(tmp_path, method):
    run = train(config(tmp_path, method, device="cuda"), quiet=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert math.isfinite(metrics["test_loss"]) and metrics["test_images"] == 360
    for layer in metrics["layers"].values():
        assert sum(layer["tokens_per_expert"]) > 0


SYNC_FREE_ROUTERS = ["ermoe", "emoe", "softmax_topk", "loss_free_bias", "cosine", "expert_choice"]


@pytest.mark.parametrize("router", SYNC_FREE_ROUTERS)
def test_a_training_step_makes_no_host_sync(tmp_path, router):
    """Issue 24, part 2: with its batch on the GPU, one training step of the loop (forward, loss, backward, clip,
    fused AdamW with the device-side non-finite guard, after_step, the straggler and log sums) under
    ``torch.cuda.set_sync_debug_mode("error")``: any host sync (``.item()``, ``nonzero``, a blocking copy) raises.
    (Not listed: V-MoE's capacity drops need the counts on the host; the text tower's padding mask and the
    regional brain model's per-expert indexing still sync.)"""
    from ermoe.train import trainer as trainer_mod
    from ermoe.train.run import Run

    cfg = load_config(None, {"out_dir": str(tmp_path), "run_name": router, "progress": False, "tensorboard": False,
                             "probe_size": 32, "data": {"name": "digits", "train_limit": 256, "hflip": False},
                             "model": {**BASE_MODEL, "moe": {**BASE_MODEL["moe"], "router": router}},
                             "optim": {"epochs": 1, "batch_size": 64, "warmup_steps": 1}})
    task, model, device = trainer_mod.setup(cfg)
    trainer = trainer_mod.Trainer(cfg, Run.new(cfg), task, model, device, quiet=True)
    assert trainer.device_guard  # fused AdamW by default on CUDA
    batches = task.train_batches(0, 3)
    try:
        for step, batch in enumerate(batches):
            torch.cuda.synchronize()
            if step == 2:  # after two warm-up steps (lazy CUDA and cuBLAS initialisation may sync)
                torch.cuda.set_sync_debug_mode("error")
            try:
                trainer._train_step(batch, epoch=0)
                trainer._update()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        batches.close()
        trainer.close()
    assert int(trainer.guard.skipped) == 0 and trainer.step == 3
