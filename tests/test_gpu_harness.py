"""The GPU path on a machine without a GPU (issue 38): fake CUDA tensors (shapes, dtypes and devices, no data) for
forward passes, the ``meta`` device for backward, and :class:`ermoe.host_traffic.HostTraffic`, which fails a test
at any host read (``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero``), host-to-device copy or host tensor mixed
into device work, naming the op and the ermoe line, unless the line is in the documented allow-list
(``ermoe.host_traffic.INHERENT``). tests/test_cuda.py is the same check on a real GPU."""

from __future__ import annotations

import warnings

import pytest
import torch

import ermoe
from ermoe import MoE
from ermoe.host_traffic import INHERENT, FakeCuda, HostTraffic, HostTrafficError
from ermoe.models import create_model, model_families
from test_models import DATA, FAMILY_ARGS, VOLUME_ARGS

# (dim, experts): the study ViT's layer, and the papers' ViT-S and ViT-B widths at 64 experts (ERMoE's default
# ranks there, 12, 4 and 12, are not multiples of 8: grouped_mm needs them padded)
SIZES = [(96, 8), (384, 64), (768, 64)]
ROUTERS = ermoe.list_routers()


@pytest.fixture(autouse=True)
def quiet_fake_tensors():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*FakeTensor.*")
        yield


def layer_and_input(router: str, dim: int, experts: int, tokens: int = 64, **kwargs):
    layer = MoE(dim, 4 * dim, experts, router=router, **kwargs).train()
    return layer, torch.randn(2, tokens // 2, dim, requires_grad=True)


@pytest.mark.parametrize("dim,experts", SIZES)
@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_runs_forward_on_cuda_without_host_traffic(router, dim, experts):
    """bf16 (the GPU's training dtype): forward, auxiliary loss, after_step; only V-MoE's capacity drops read."""
    with FakeCuda(torch.bfloat16):
        layer, x = layer_and_input(router, dim, experts)
        with HostTraffic() as traffic:
            y = layer(x)
            loss = y.float().square().mean() + ermoe.aux_loss(layer)
            ermoe.after_step(layer)
        assert y.device.type == "cuda" and y.dtype == torch.bfloat16 and loss.device.type == "cuda"
    allowed = [e for e in traffic.events]
    if router == "vmoe":  # capacity 1.05: the kept count sizes the permutation
        assert [e.key for e in allowed] == [("ermoe/dispatch.py", "__init__")]
    else:
        assert not allowed, traffic.summary()


@pytest.mark.parametrize("dim,experts", SIZES[:2])
@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_trains_a_step_on_the_meta_device_without_host_reads(router, dim, experts):
    """Backward, which fake CUDA cannot run (autograd wants a CUDA context), on ``meta`` (no data either): forward,
    loss, backward, after_step; every parameter gets a gradient."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            layer, x = layer_and_input(router, dim, experts)
    finally:
        torch.set_default_dtype(saved)
    with HostTraffic(device="meta") as traffic:
        loss = layer(x).float().square().mean() + ermoe.aux_loss(layer)
        loss.backward()
        ermoe.after_step(layer)
    assert not [n for n, p in layer.named_parameters() if p.grad is None]
    assert all(e.key in INHERENT for e in traffic.events)
    assert len(traffic.events) == (1 if router == "vmoe" else 0), traffic.summary()


def test_float32_experts_on_cuda_read_the_host_once_per_layer(monkeypatch):
    """grouped_mm has no float32 kernel on CUDA: the experts loop over matmuls whose row counts are read on the host
    once per layer (both matmuls share them; one warning). Fake CUDA names the read; a CPU layer with the kernel
    taken away counts it."""
    with FakeCuda(torch.float32):
        layer, x = layer_and_input("softmax_topk", 96, 8)
        with pytest.warns(RuntimeWarning, match="one device sync per MoE layer"), \
                pytest.raises(HostTrafficError, match=r"ermoe/experts.py:\d+ \(sizes\)"), HostTraffic():
            layer(x)
    from ermoe import experts as experts_mod

    monkeypatch.setattr(experts_mod, "_GROUPED_DTYPES", {})
    layer, x = layer_and_input("ermoe", 32, 4, validate=False)  # (the CPU-only NaN scan reads too)
    with HostTraffic(device="cpu", strict=False) as traffic:
        layer(x).sum().backward()
    assert [(e.op, e.key) for e in traffic.events] == [("tolist", ("ermoe/experts.py", "sizes"))]


def test_routing_stats_of_a_cuda_model_mix_no_host_tensor():
    """ermoe.routing_stats on a CUDA model: the statistics are host numbers, read in one copy per layer (a CPU
    arange times the GPU counts crashed before)."""
    layer, x = layer_and_input("softmax_topk", 96, 8)
    with FakeCuda(default_device=False) as fake:  # as on a GPU machine: a tensor made without a device is a CPU one
        fake.module(layer.to(torch.bfloat16))
        layer(fake.tensor(x.detach().to(torch.bfloat16)))
        with HostTraffic(strict=False) as traffic:
            stats = ermoe.routing_stats(layer)
    assert set(stats["moe"]) >= {"load_cv", "gini", "entropy", "max_over_mean"}
    assert not [e for e in traffic.events if e.kind == "device mismatch"], traffic.summary()


def _family_models():
    for family, names in model_families().items():
        name = names[0]
        if family == "retrieval":
            yield name, lambda name=name: create_model(
                name, img_size=16, in_chans=1, vocab_size=20, context_length=6,
                image={"name": "vit_tiny", "embed_dim": 16, "num_heads": 2, "depth": 1, "patch_size": 8,
                       "moe": {"router": "ermoe", "num_experts": 4, "blocks": "all"}},
                text={"width": 16, "depth": 1, "num_heads": 2,
                      "moe": {"router": "ermoe", "num_experts": 4, "blocks": "all"}}), \
                lambda: (torch.randn(2, 1, 16, 16), torch.tensor([[3, 4, 5, 0, 0, 0], [6, 7, 0, 0, 0, 0]]))
        else:
            for n in names:
                if n in VOLUME_ARGS:
                    yield n, (lambda n=n: create_model(n, **VOLUME_ARGS[n])), \
                        (lambda n=n: (torch.randn(2, 2, *VOLUME_ARGS[n]["volume_shape"]),))
            if family in FAMILY_ARGS:
                yield name, (lambda name=name, family=family: create_model(name, **DATA, **FAMILY_ARGS[family])), \
                    lambda: (torch.randn(2, 2, 16, 16),)


FAMILY_MODELS = {name: (build, inputs) for name, build, inputs in _family_models()}


@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_every_model_family_runs_forward_on_cuda(name):
    """Each family's first model (and every volume model) built on the CPU, moved to fake CUDA in bf16, in
    training mode: its forward makes no host traffic beyond the allow-list (the text tower's padding check, the
    regional model's per-region experts)."""
    build, inputs = FAMILY_MODELS[name]
    torch.manual_seed(0)
    model = build().to(torch.bfloat16).train()
    with FakeCuda() as fake:
        fake.module(model)
        args = [fake.tensor(a.to(torch.bfloat16) if a.is_floating_point() else a) for a in inputs()]
        with HostTraffic() as traffic:
            out = model(*args)
            model.after_step(0)  # (step 0: before the single-gated ViT's k-means, which runs on the host)
    for o in (out if isinstance(out, tuple) else (out,)):
        assert o.device.type == "cuda"
    assert all(e.key in INHERENT for e in traffic.events), traffic.summary()


def test_an_unlisted_host_read_fails_with_the_op_and_the_ermoe_line():
    class Reader(torch.nn.Module):
        def forward(self, x):
            return x * float(x.sum())

    with FakeCuda(torch.bfloat16):
        x = torch.randn(4)
        with pytest.raises(HostTrafficError, match=r"host read \(aten::_local_scalar_dense\) at outside ermoe"), \
                HostTraffic():
            Reader()(x)
        with HostTraffic(strict=False) as traffic:
            torch.randn(3, device="cpu").to("cuda")
        assert [e.kind for e in traffic.events] == ["host-to-device copy"]


def test_the_checkpoint_finiteness_check_reads_the_host_once_per_device():
    """Issue 38, defect 9: every weight and moment checked on the device and read back in one transfer."""
    from ermoe.train.components import tensors_finite as all_finite

    with FakeCuda():
        tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(())]
        with HostTraffic(strict=False) as traffic:
            all_finite(tensors)
    assert traffic.host_reads == 1, traffic.summary()
    assert all_finite([torch.ones(2), torch.zeros(3)])
    assert not all_finite([torch.ones(2), torch.tensor([1.0, float("nan")])])


def test_the_in_memory_batch_source_copies_nothing_from_the_host_per_step(tmp_path):
    """Issue 38, defect 4: digits, Fashion-MNIST and CIFAR (the main job) live on the device as uint8 with their
    statistics after the first step; a step indexes device memory (no host-to-device copy), and each epoch's order
    is copied once. (The augmentation's generator is a CUDA one, which fake CUDA cannot make: no crop or flip.)"""
    from ermoe.train import create_task, load_config

    cfg = load_config(None, {"out_dir": str(tmp_path), "data": {"name": "digits", "train_limit": 256, "hflip": False,
                                                                 "crop_padding": 0},
                             "optim": {"batch_size": 64}})
    task = create_task(cfg, torch.device("cuda"))
    task.load()
    with FakeCuda(default_device=False):
        batches = task.train_batches(0, 8)  # 4 steps an epoch
        with HostTraffic(strict=False) as first:
            next(batches)
        with HostTraffic() as steps:
            later = [next(batches) for _ in range(3)]
        with HostTraffic(strict=False) as new_epoch:
            next(batches)
        batches.close()
        with HostTraffic() as evaluation:
            evaluated = next(task.eval_batches("test", 32))
    assert all(e.kind == "host-to-device copy" for e in first.events) and first.events  # the data, once
    assert not steps.events and not evaluation.events
    assert [e.kind for e in new_epoch.events] == ["host-to-device copy"]  # the new epoch's order
    for batch in (*later, evaluated):
        assert batch.inputs[0].device.type == batch.target.device.type == "cuda"
        assert batch.inputs[0].dtype == torch.float32


STEP_MODEL = {"patch_size": 2, "depth": 2, "embed_dim": 32, "num_heads": 2, "moe": {"num_experts": 4, "blocks": "all"}}
STEP_TASKS = {
    "classification": {"data": {"name": "digits", "train_limit": 256, "hflip": False},
                       "optim": {"batch_size": 64}},
    "brain_age": {"task": "brain_age", "data": {"name": "brain_cohort", "cohort_size": 24, "spacing": 8.0,
                                                "val_size": 4, "test_size": 4},
                  "model": {"name": "sfcn3d", "channels": [4, 8, 8], "moe": {"router": "ermoe", "num_experts": 2}},
                  "optim": {"batch_size": 8}},
    "retrieval": {"task": "retrieval", "data": {"name": "fashion_captions", "caption_set_size": 64},
                  "model": {"name": "dual_encoder",
                            "image": {"name": "vit_tiny", "embed_dim": 16, "num_heads": 2, "depth": 2,
                                      "patch_size": 16, "moe": {"router": "ermoe", "num_experts": 2, "blocks": [1]}},
                            "text": {"width": 16, "depth": 1, "num_heads": 2,
                                     "moe": {"router": "softmax_topk", "num_experts": 2, "blocks": "all"}}},
                  "task_options": {"vocab_size": 60}, "optim": {"batch_size": 16}},
}
STEPS = [("classification", r) for r in ROUTERS] + [("brain_age", None), ("retrieval", None)]


@pytest.mark.parametrize("task_name,router", STEPS)
def test_a_whole_training_step_of_the_loop_makes_no_host_traffic(tmp_path, monkeypatch, task_name, router):
    """The loop's own step (``Trainer._train_step`` and ``_update``: the batch from the task's source, forward,
    loss, backward, clipping, AdamW, after_step, the straggler and log sums) on ``meta`` with the non-finite guard on
    the device, as a CUDA run with fused AdamW has it. Autocast has no ``meta`` kind: ermoe's own autocast check
    answers bf16 there (so the experts take the bf16 grouped path); AdamW stands in for the fused kernel, which
    alone takes the guard's found_inf flag. Only V-MoE's capacity drops read (the allow-list); the text tower of
    the dual encoder checks its padding on the host (also listed)."""
    from ermoe import devices
    from ermoe.train import create_task, load_config
    from ermoe.train import trainer as trainer_mod
    from ermoe.train.run import Run

    pytest.importorskip("sklearn")
    if task_name == "brain_age":
        pytest.importorskip("scipy")
    monkeypatch.setattr(devices, "autocast_dtype", lambda device: torch.bfloat16 if device.type == "meta" else None)
    spec = STEP_TASKS[task_name]
    model = spec.get("model", {**STEP_MODEL, "moe": {**STEP_MODEL["moe"], "router": router}})
    cfg = load_config(None, {"out_dir": str(tmp_path), "run_name": "step", "progress": False, "tensorboard": False,
                             "probe_size": 4, **spec, "model": model,
                             "optim": {"epochs": 2, "warmup_steps": 1, "clip_grad": 1.0, **spec["optim"]}})
    meta = torch.device("meta")
    task = create_task(cfg, meta)
    task.load()
    model = trainer_mod.build_model(cfg, task).to(meta)
    trainer = trainer_mod.Trainer(cfg, Run.new(cfg), task, model, meta, quiet=True)

    class GuardedAdamW(torch.optim.AdamW):  # takes the guard's flag as the fused kernel does (ignored on meta)
        found_inf = property(lambda self: None, lambda self, flag: None)

    trainer.optimizer.__class__ = GuardedAdamW
    trainer.guard.on_device = True
    batches = task.train_batches(0, 3)
    try:
        with HostTraffic(device="meta", strict=False):  # a first step (lazy state: the optimizer's moments)
            trainer._train_step(next(batches), epoch=0)
            trainer._update()
        # (the backward of the text tower's padding mask runs in autograd's engine: its innermost ermoe frame is the
        # loop's backward call)
        backward = ("ermoe/train/trainer.py", "_micro_step")
        with HostTraffic(device="meta", allow=set(INHERENT) | {backward}) as traffic:
            trainer._train_step(next(batches), epoch=0)
            trainer._update()
    finally:
        batches.close()
        trainer.close()
    assert trainer.step == 2
    kinds = {e.key for e in traffic.events}
    assert kinds == ({("ermoe/dispatch.py", "__init__")} if router == "vmoe" else
                     {("ermoe/models/text.py", "forward"), backward} if task_name == "retrieval" else set()), \
        traffic.summary()


def test_the_expert_parallel_dispatcher_reads_only_its_split_sizes(monkeypatch):
    """The expert-parallel path on fake CUDA (one rank; the all-to-all a local copy): the first host read of the
    layer is the exchange's split sizes (allow-listed: all_to_all_single takes them as host integers; a data-less
    tensor cannot answer them, so the forward stops there)."""
    import torch.distributed as dist

    from ermoe.distributed import ExpertParallelDispatcher

    def local_all_to_all(out, inp, out_sizes=None, in_sizes=None, group=None):
        out.copy_(inp)

    monkeypatch.setattr(dist, "all_to_all_single", local_all_to_all)
    layer, x = layer_and_input("softmax_topk", 96, 8)
    layer.dispatcher = ExpertParallelDispatcher(None, 1, 0, 8)
    with FakeCuda(default_device=False) as fake:
        fake.module(layer.to(torch.bfloat16))
        x = fake.tensor(x.detach().to(torch.bfloat16))
        with pytest.raises(HostTrafficError, match=r"host read \(.+\) at ermoe/distributed.py:\d+ \(run_experts\)"), \
                HostTraffic(allow=set()) as traffic:
            layer(x)
    assert len(traffic.events) == 1 and traffic.events[0].key in INHERENT


def test_the_resident_copy_follows_replaced_statistics(tmp_path):
    """A pretrained model's normalisation replaces the data's mean and std after loading (Task.prepare): the
    device copy is made again with them, and the batches are normalised by them."""
    from ermoe.train import create_task, load_config

    cfg = load_config(None, {"out_dir": str(tmp_path), "data": {"name": "digits", "train_limit": 256, "hflip": False},
                             "optim": {"batch_size": 64}})
    task = create_task(cfg, torch.device("cpu"))
    task.load()
    before = next(task.eval_batches("test", 8)).inputs[0]
    first = task.batches.on_device()
    assert task.batches.on_device() is first  # made once
    task.data.mean, task.data.std = task.data.mean + 0.5, task.data.std * 2
    after = next(task.eval_batches("test", 8)).inputs[0]
    assert task.batches.on_device() is not first
    torch.testing.assert_close(after, (before * first.std.view(1, -1, 1, 1) + first.mean.view(1, -1, 1, 1)
                                       - task.data.mean.view(1, -1, 1, 1)) / task.data.std.view(1, -1, 1, 1))
