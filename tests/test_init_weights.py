"""Starting from weights on disk (issue 25, part 2): ``model.init_checkpoint`` loads what matches by name and shape
(timm's ViT naming, ermoe's own, the 3D models, each tower of the dual encoder), reports missing and unexpected keys,
refuses a shape mismatch naming the key; ``model.upcycle_from`` starts an MoE run from a dense run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import ermoe
from ermoe.models.weights import WeightShapeError
from ermoe.train import (CheckpointError, ConfigError, init_from_checkpoint, load_config, load_matching,
                         read_weights, train)
from ermoe.train import trainer as trainer_mod

pytest.importorskip("sklearn")


def _digits(tmp_path, name, **model):
    base = {"patch_size": 2, "depth": 2, "embed_dim": 32, "num_heads": 2, "moe": None}
    return load_config(None, {
        "out_dir": str(tmp_path), "run_name": name, "progress": False, "tensorboard": False, "log_every": 5,
        "probe_size": 32, "data": {"name": "digits", "train_limit": 320, "hflip": False, "crop_padding": 1},
        "model": {**base, **model},
        "optim": {"epochs": 1, "batch_size": 64, "warmup_steps": 2, "eval_batch_size": 128}})


def _timm_twin(num_classes: int, img_size: int = 8):
    """The architecture of ermoe's digits ViT built by timm itself (its naming is timm's)."""
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=img_size, patch_size=2, in_chans=1, num_classes=num_classes, embed_dim=32,
                             depth=2, num_heads=2, global_pool="avg")


def test_a_timm_vit_file_initialises_the_model_but_its_head(tmp_path, capsys):
    torch.manual_seed(0)
    source = _timm_twin(num_classes=1000)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    cfg = _digits(tmp_path, "init", init_checkpoint=str(path))
    _, model, _ = trainer_mod.setup(cfg)
    printed = capsys.readouterr().out
    assert "loaded" in printed and "head skipped" in printed and "head.weight" in printed
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), source.forward_features(x))
    assert model.head.weight.shape == (10, 32)


def test_moe_blocks_report_the_dense_ffn_as_unexpected_and_the_experts_as_missing(tmp_path):
    torch.manual_seed(0)
    source = _timm_twin(num_classes=10)
    model = ermoe.create_model("vit_tiny", num_classes=10, img_size=8, in_chans=1, patch_size=2, depth=2,
                               embed_dim=32, num_heads=2, moe={"router": "softmax_topk", "num_experts": 2,
                                                               "blocks": [1]})
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)  # DDP, nested
    [report] = init_from_checkpoint(model, str(path))
    assert set(report.unexpected) == {"blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc1.bias", "blocks.1.mlp.fc2.weight",
                                      "blocks.1.mlp.fc2.bias"}
    assert report.missing and all(k.startswith("blocks.1.mlp.moe.") for k in report.missing)
    lines = report.lines()
    assert len(lines) == 3 and lines[1].lstrip().startswith("missing") and lines[2].lstrip().startswith("unexpected")
    torch.testing.assert_close(model.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)


def test_position_embedding_is_resampled_to_the_model_grid():
    torch.manual_seed(0)
    source = _timm_twin(num_classes=10, img_size=16)  # an 8 x 8 patch grid; the model's is 4 x 4
    model = ermoe.create_model("vit_tiny", num_classes=10, img_size=8, in_chans=1, patch_size=2, depth=2,
                               embed_dim=32, num_heads=2, moe=None)
    report = load_matching(model, source.state_dict(), "twin")
    assert report.resampled == ["pos_embed"] and not report.missing
    from timm.layers import resample_abs_pos_embed
    want = resample_abs_pos_embed(source.pos_embed.detach(), new_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), want)


def test_a_shape_mismatch_is_refused_naming_the_key(tmp_path):
    source = _timm_twin(num_classes=10)
    weights = dict(source.state_dict())
    weights["blocks.0.attn.qkv.weight"] = torch.zeros(96, 16)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    model = ermoe.create_model("vit_tiny", num_classes=10, img_size=8, in_chans=1, patch_size=2, depth=2,
                               embed_dim=32, num_heads=2, moe=None)
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    with pytest.raises(WeightShapeError, match=r"blocks\.0\.attn\.qkv\.weight has shape \(96, 16\), the model's has "
                                              r"\(96, 32\)"):
        init_from_checkpoint(model, str(path))
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, before)  # nothing loaded
    weights = dict(source.state_dict())
    weights["blocks.1.mlp.fc2.bias"] = torch.full((32,), float("nan"))
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc2\.bias holds NaN or inf: nothing was loaded"):
        load_matching(model, weights, "nan weights")
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, before)


def test_missing_and_corrupt_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors does not exist"):
        read_weights(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read .*bad.safetensors as safetensors"):
        read_weights(bad)
    torch.save({"epoch": 3}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="holds no state dict of tensors"):
        read_weights(tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        read_weights(tmp_path)
    # (issue 42) text under a .pt name, or a file without an extension: what was wrong and what a weights file is,
    # not pickle's bare "101"
    for name in ("notes.pt", "weights"):
        (tmp_path / name).write_text("hello\n")
        with pytest.raises(CheckpointError, match=rf"cannot read .*{name} as a PyTorch state dict \(KeyError: 101\): "
                                                  r"the weights file must be a .safetensors file, a torch.save'd"):
            read_weights(tmp_path / name)


@pytest.mark.parametrize("name,kwargs,shape", [
    ("sfcn3d", {"in_chans": 1, "volume_shape": (16, 16, 16), "num_outputs": 1, "channels": [4, 8, 8]},
     (2, 1, 16, 16, 16)),
    ("vit3d", {"in_chans": 1, "volume_shape": (16, 16, 16), "num_outputs": 1, "patch_size": 8, "embed_dim": 32,
               "depth": 1, "num_heads": 2}, (2, 1, 16, 16, 16)),
])
def test_the_3d_models_load_their_own_weights(tmp_path, name, kwargs, shape):
    torch.manual_seed(0)
    source = ermoe.create_model(name, **kwargs).eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(1)
    model = ermoe.create_model(name, **kwargs).eval()
    [report] = init_from_checkpoint(model, str(path))
    assert not report.missing and not report.unexpected
    x = torch.randn(shape)
    torch.testing.assert_close(model(x), source(x))


def test_each_tower_of_the_dual_encoder_loads_its_own_file(tmp_path):
    torch.manual_seed(0)
    args = dict(img_size=16, in_chans=1, vocab_size=30, context_length=8, embed_dim=16,
                image={"name": "vit_tiny", "embed_dim": 32, "num_heads": 2, "depth": 1, "patch_size": 8},
                text={"width": 32, "depth": 1, "num_heads": 2})
    source = ermoe.create_model("dual_encoder", **args)
    paths = {}
    for tower in ("image", "text"):
        paths[tower] = str(tmp_path / f"{tower}.safetensors")
        save_file({k: v.contiguous() for k, v in getattr(source, tower).state_dict().items()}, paths[tower])
    torch.manual_seed(1)
    model = ermoe.create_model("dual_encoder", **args)
    reports = init_from_checkpoint(model, paths)
    assert [r.missing for r in reports] == [[], []] and [r.unexpected for r in reports] == [[], []]
    ids = torch.randint(1, 30, (2, 8))
    torch.testing.assert_close(model.text(ids), source.text(ids))
    images = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(model.image.forward_features(images), source.image.forward_features(images))
    with pytest.raises(CheckpointError, match="no submodule 'audio'"):
        init_from_checkpoint(model, {"audio": paths["text"]})


def test_an_moe_run_upcycled_from_a_dense_run_starts_at_its_outputs_and_resumes_without_it(tmp_path):
    dense_run = train(_digits(tmp_path, "dense"), quiet=True)
    moe = {"router": "softmax_topk", "num_experts": 4, "blocks": "all", "router_kwargs": {"renormalize": True}}
    cfg = _digits(tmp_path, "upcycled", moe=moe, upcycle_from=str(dense_run))
    _, model, _ = trainer_mod.setup(cfg)
    dense = trainer_mod.load_run(dense_run)[2]
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), dense.eval()(x), rtol=1e-5, atol=1e-5)
    assert [v.name for v in model.routed_layers()] == ["blocks.0.mlp", "blocks.1.mlp"]
    run = train(cfg, quiet=True)
    # The dense run is gone: resuming rebuilds the skeleton and reads the MoE run's own checkpoint only.
    import shutil
    shutil.rmtree(dense_run)
    longer = _digits(tmp_path, "upcycled", moe=moe, upcycle_from=str(dense_run))
    longer.optim.epochs = 2
    train(longer, resume=run, quiet=True)
    assert json.loads((run / "metrics.json").read_text())["step"] == 10


def test_upcycle_and_init_settings_that_cannot_apply_are_config_errors(tmp_path):
    moe = {"router": "ermoe", "num_experts": 4, "blocks": "all"}
    cases = [
        ({"init_checkpoint": "a", "upcycle_from": "b", "moe": moe}, "both set the weights"),
        ({"upcycle_from": "b"}, "needs a moe section"),
        ({"upcycle_from": "b", "moe": {**moe, "placement": "parallel"}}, "placement must be replace"),
        ({"upcycle_from": "b", "moe": {**moe, "hidden_dim": 16}}, "leave moe.hidden_dim null"),
        ({"upcycle_from": "b", "moe": {**moe, "router": "emoe", "placement": "replace"}}, "set model.moe_init: pca"),
        ({"upcycle_from": "b", "moe": moe, "moe_init": "pca"}, "would replace them"),
        ({"upcycle_bases": "shared", "moe": moe}, "needs model.upcycle_from"),
    ]
    for model, message in cases:
        with pytest.raises(ConfigError, match=message):
            _digits(tmp_path, "x", **model)


def test_upcycle_from_a_run_of_another_architecture_is_refused(tmp_path):
    dense_run = train(_digits(tmp_path, "dense"), quiet=True)
    cfg = _digits(tmp_path, "wide", embed_dim=48, upcycle_from=str(dense_run),
                  moe={"router": "softmax_topk", "num_experts": 2, "blocks": "all"})
    with pytest.raises(WeightShapeError, match="has shape"):
        trainer_mod.setup(cfg)
