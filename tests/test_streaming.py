"""Data through torch.utils.data: the step sampler's rows per rank, augmentation keyed by (seed, step, example),
streamed ImageFolder batches that are bitwise the same for any number of workers, any world size and any resume
step, pair-wise mixup / CutMix by hand, named errors for corrupt files and dead workers, and the ImageNet config
end to end at a tiny size."""

import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from ermoe.data.folder import FolderDataset, ImageAugment, ImageFolderData, cutmix_box, mix_pairs
from ermoe.data.images import CorruptDatasetError, DatasetNotFoundError
from ermoe.data.loader import (DataLoaderWorkerError, ExampleKey, StepBatchSampler, epoch_order, example_seed,
                               iterate, seeded)
from ermoe.train import ConfigError, load_config, train

pytest.importorskip("PIL")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def make_folder(root: Path, per_class: tuple[int, int] = (12, 4), classes: int = 3, size: tuple[int, int] = (20, 24),
                seed: int = 0) -> Path:
    """A generated ImageFolder tree: train/ and val/, ``classes`` class folders of JPEGs (one greyscale PNG)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 200, (*size, 3), dtype=np.uint8)
                arr[..., c] = 255  # the class is the dominant channel
                Image.fromarray(arr).save(d / f"{i:03d}.jpg", quality=90)
    Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(root / "train" / "c0" / "grey.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("folder"))


# sampler and keyed randomness ---------------------------------------------------------------------------------------
def test_epoch_order_is_the_seeded_permutation_of_each_epoch():
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 100_003 + 2))
    assert torch.equal(epoch_order(10, seed=3, epoch=2), expected)


def test_step_sampler_gives_each_rank_its_rows_of_the_global_batch_from_any_step():
    n, batch, seed = 22, 8, 5  # 2 steps an epoch (6 examples dropped each epoch)
    one = list(StepBatchSampler(n, batch, seed, 0, 6))
    assert len(one) == 6 and all(len(keys) == batch for keys in one)
    for step, keys in enumerate(one):
        order = epoch_order(n, seed, step // 2)
        i = step % 2
        assert [k.index for k in keys] == order[i * batch:(i + 1) * batch].tolist()
        assert [k.step for k in keys] == [step] * batch and [k.row for k in keys] == list(range(batch))
    for world in (2, 4):
        shards = [list(StepBatchSampler(n, batch, seed, 0, 6, rank, world)) for rank in range(world)]
        for step in range(6):
            assert [k for shard in shards for k in shard[step]] == one[step]
    assert list(StepBatchSampler(n, batch, seed, 3, 6)) == one[3:]  # resume at step 3
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        StepBatchSampler(n, batch, seed, 0, 6, 0, 3)


def test_grouped_steps_keep_each_group_in_one_batch_but_at_the_cuts():
    """Groups (e.g. captions that only word order tells apart) are visited as a block in a seeded order of the
    groups: every example once an epoch, a group split between two batches only where a batch ends; resumable and
    sharded as the plain sampler."""
    from ermoe.data.loader import grouped_epoch_order

    n, batch, seed = 30, 8, 5
    groups = [[0, 7], [1], [2, 3, 4], *[[i] for i in range(5, 7)], *[[i, i + 1] for i in range(8, 30, 2)]]
    order = grouped_epoch_order([torch.tensor(g) for g in groups], seed, epoch=1)
    by_group = epoch_order(len(groups), seed, 1)  # the groups' order: epoch_order over the groups
    assert order.tolist() == [i for g in by_group.tolist() for i in groups[g]]
    one = list(StepBatchSampler(n, batch, seed, 0, 9, groups=groups))  # 3 steps an epoch, 3 epochs
    for step, keys in enumerate(one):
        rows = grouped_epoch_order([torch.tensor(g) for g in groups], seed, step // 3)
        assert [k.index for k in keys] == rows[(step % 3) * batch:(step % 3 + 1) * batch].tolist()
    for e in range(3):
        batches = [{k.index for k in keys} for keys in one[3 * e:3 * e + 3]]
        split = [g for g in groups if len(g) > 1 and not any(set(g) <= b for b in batches)
                 and any(set(g) & b for b in batches)]
        assert len(split) <= 3  # at most one group cut at each of the epoch's batch ends
    shards = [list(StepBatchSampler(n, batch, seed, 0, 9, rank, 2, groups)) for rank in range(2)]
    assert all([k for shard in shards for k in shard[step]] == one[step] for step in range(9))
    assert list(StepBatchSampler(n, batch, seed, 4, 9, groups=groups)) == one[4:]
    overlapping, short, empty = [[0, 1], [1, 2], *[[i] for i in range(3, 30)]], [[i] for i in range(29)], [[]]
    for bad in (overlapping, short, empty + [[i] for i in range(30)]):
        with pytest.raises(ValueError, match="exactly once"):
            StepBatchSampler(n, batch, seed, 0, 9, groups=bad)


def test_seeded_draws_are_a_function_of_the_key_and_give_the_callers_state_back():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with seeded(example_seed(0, 7, 3)):
        first = (random.random(), np.random.rand(), torch.rand(1).item())
    with seeded(example_seed(0, 7, 3)):
        again = (random.random(), np.random.rand(), torch.rand(1).item())
    with seeded(example_seed(0, 7, 4)):
        other = (random.random(), np.random.rand(), torch.rand(1).item())
    assert first == again and all(a != b for a, b in zip(first, other))
    after = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert after == (random.random(), np.random.rand(), torch.rand(1).item())  # as if nothing had been drawn
    assert len({example_seed(0, s, i) for s in range(20) for i in range(20)}) == 400


# mixing by hand -----------------------------------------------------------------------------------------------------
class FixedDraws:
    """A stand-in for numpy's Generator in cutmix_box: integers() returns the given values in turn."""

    def __init__(self, *values: int) -> None:
        self.values = list(values)

    def integers(self, high: int) -> int:
        return self.values.pop(0)


def test_cutmix_box_by_hand():
    # lam 0.75: sides sqrt(0.25) = 0.5 of 8 = 4; centre (4, 4): rows and columns 2..6, area 16 = 1 - 0.75 of 64
    assert cutmix_box(0.75, 8, 8, FixedDraws(4, 4)) == (2, 6, 2, 6)
    # centre (0, 7) clips to the image: rows 0..2, columns 5..8
    assert cutmix_box(0.75, 8, 8, FixedDraws(0, 7)) == (0, 2, 5, 8)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_pairs_mix_images_and_targets_by_the_same_lambda(kind):
    aug = ImageAugment(mixup_alpha=0.8 if kind == "mixup" else 0.0, cutmix_alpha=1.0 if kind == "cutmix" else 0.0)
    images = torch.stack([torch.full((3, 32, 32), float(v)) for v in (0, 1, 10, 20, 5)])
    labels = torch.tensor([0, 1, 2, 3, 1])
    rows = [4, 5, 6, 7, 9]  # pairs (4, 5) and (6, 7); row 9's partner (8) is absent: unmixed
    mixed, target = mix_pairs(images, labels, rows, 4, aug, seed=0, step=3)
    assert torch.allclose(target.sum(1), torch.ones(5))
    assert torch.equal(mixed[4], images[4]) and torch.equal(target[4], torch.tensor([0.0, 1, 0, 0]))
    for i, j in ((0, 1), (2, 3)):
        lam = float(target[i, labels[i]])
        assert 0 < lam < 1 and float(target[i, labels[j]]) == pytest.approx(1 - lam, abs=1e-6)
        assert float(target[j, labels[j]]) == pytest.approx(lam, abs=1e-6)  # both of a pair keep lam of their own
        a, b = images[i], images[j]
        if kind == "mixup":
            torch.testing.assert_close(mixed[i], lam * a + (1 - lam) * b)
            torch.testing.assert_close(mixed[j], lam * b + (1 - lam) * a)
        else:  # the pasted box's share of the pixels is 1 - lam, the same box in both
            from_partner = mixed[i] == b
            assert float(from_partner.float().mean()) == pytest.approx(1 - lam, abs=1e-6)
            assert torch.equal(from_partner, mixed[j] == a)
    again, _ = mix_pairs(images, labels, rows, 4, aug, seed=0, step=3)
    other, _ = mix_pairs(images, labels, rows, 4, aug, seed=0, step=4)
    assert torch.equal(again, mixed) and not torch.equal(other, mixed)


def test_augment_options_are_checked():
    with pytest.raises(ValueError, match="color_jitter does not apply beside auto_augment"):
        ImageAugment(color_jitter=0.4)
    with pytest.raises(ValueError, match="RandAugment spec"):
        ImageAugment(auto_augment="augmix-m5")
    with pytest.raises(ValueError, match="section 'zz' is none of timm's RandAugment settings"):
        ImageAugment(auto_augment="rand-m9-zz")
    assert ImageAugment(auto_augment="rand-m9-n2-mstd0.5-mmax10-inc1-p0.5").auto_augment  # every key timm reads
    with pytest.raises(ValueError, match="scale must be"):
        ImageAugment(scale=[0.5, 0.1])
    assert not ImageAugment(mixup_alpha=0, cutmix_alpha=0).mixes


# streamed ImageFolder -----------------------------------------------------------------------------------------------
def batches(data: ImageFolderData, rank: int = 0, world: int = 1, start: int = 0, stop: int = 4, batch: int = 8):
    return list(data.train_batches(seed=2, batch_size=batch, start_step=start, stop_step=stop, rank=rank,
                                   world=world, device=torch.device("cpu")))


def test_streamed_batches_are_the_same_for_any_workers_world_size_and_resume_step(folder):
    def data(workers: int) -> ImageFolderData:
        return ImageFolderData(folder, 16, augment=ImageAugment(), num_workers=workers)

    zero = batches(data(0))
    assert len(zero) == 4 and zero[0][0].shape == (8, 3, 16, 16) and zero[0][1].shape == (8, 3)
    assert not torch.equal(zero[0][0], zero[1][0])
    two = batches(data(2))
    for (x0, y0), (x2, y2) in zip(zero, two):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    ranks = [batches(data(1), rank, 2) for rank in range(2)]
    for step in range(4):
        assert torch.equal(torch.cat([ranks[0][step][0], ranks[1][step][0]]), zero[step][0])
        assert torch.equal(torch.cat([ranks[0][step][1], ranks[1][step][1]]), zero[step][1])
    resumed = batches(data(0), start=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, zero[2:]))
    with pytest.raises(ValueError, match="must be even"):
        batches(data(0), 0, 4, batch=4)  # one row per rank cannot hold a pair


def test_streamed_evaluation_decodes_in_order_without_augmentation(folder):
    data = ImageFolderData(folder, 16, augment=ImageAugment(), num_workers=2, val_size=5, test_limit=7)
    assert data.split_size("val") == 5 and data.split_size("train") == 32 and data.split_size("test") == 7
    first = list(data.eval_batches("test", 4, None, torch.device("cpu")))
    again = list(data.eval_batches("test", 4, None, torch.device("cpu")))  # the kept loader, a second pass
    assert [len(y) for _, y in first] == [4, 3] and first[0][1].dtype == torch.int64
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    labels = torch.cat([y for _, y in first]).tolist()
    assert labels == [label for _, label in data.splits["test"]]


def test_a_folder_with_val_and_test_uses_each_as_its_name_says(tmp_path):
    """Issue 42: with val/ beside test/, val/ is the validation split and test/ the test split (val/ alone is
    the test split, ImageNet's layout); data.val_size then does not apply."""
    root = make_folder(tmp_path / "f", per_class=(4, 2))
    shutil.copytree(root / "val", root / "test")
    for f in list((root / "test" / "c0").iterdir())[:1]:
        f.unlink()
    data = ImageFolderData(root, 16)
    assert data.split_size("val") == 6 and data.split_size("test") == 5 and data.split_size("train") == 13
    assert all("/test/" in path for path, _ in data.splits["test"])
    assert all("/val/" in path for path, _ in data.splits["val"])
    with pytest.raises(ValueError, match="has its own val/ beside test/.*data.val_size=0"):
        ImageFolderData(root, 16, val_size=2)
    shutil.rmtree(root / "test")
    only_val = ImageFolderData(root, 16)
    assert only_val.split_size("val") == 0 and only_val.split_size("test") == 6


def test_folder_layout_errors_are_named(tmp_path, folder):
    with pytest.raises(DatasetNotFoundError, match="needs --data.data_dir"):
        ImageFolderData(None)
    with pytest.raises(DatasetNotFoundError, match="expected .*train and .*val"):
        ImageFolderData(tmp_path)
    other = make_folder(tmp_path / "other", per_class=(2, 2))
    (other / "val" / "c2").rename(other / "val" / "c9")
    with pytest.raises(CorruptDatasetError, match=r"missing \['c2'\], extra \['c9'\]"):
        ImageFolderData(other)
    (other / "val" / "c9").rename(other / "val" / "c2")
    (other / "train" / "c3").mkdir()  # a class folder without images
    with pytest.raises(DatasetNotFoundError, match="c3"):
        ImageFolderData(other)


def test_a_corrupt_file_met_in_a_worker_is_a_named_error_or_left_out_with_skip_corrupt(tmp_path):
    root = make_folder(tmp_path / "f", per_class=(4, 2))
    bad = root / "train" / "c1" / "001.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    data = ImageFolderData(root, 16, num_workers=2)
    with pytest.raises(CorruptDatasetError, match=r"cannot decode image .*c1/001\.jpg") as err:
        batches(data, stop=3, batch=4)
    assert "DataLoader worker" not in str(err.value) and "Traceback" not in str(err.value)
    data = ImageFolderData(root, 16, num_workers=2, skip_corrupt=True)
    with pytest.warns(UserWarning, match=r"left out 1 file.*c1/001\.jpg"):
        got = batches(data, stop=3, batch=4)
    assert sum(len(y) for _, y in got) == 11 and list(data.skipped) == [str(bad)]


def _kill_at_index_5(self, key):
    if isinstance(key, ExampleKey) and key.step == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return _getitem(self, key)


_getitem = FolderDataset.__getitem__


def test_a_worker_killed_mid_run_is_a_named_error_and_the_run_resumes_exactly(tmp_path, folder, monkeypatch):
    def cfg(name: str, **optim) -> object:
        return load_config(None, {
            "out_dir": str(tmp_path), "run_name": name, "progress": False, "tensorboard": False, "log_every": 1,
            "probe_size": 8, "checkpoint_every": 2,
            "data": {"name": "imagefolder", "data_dir": str(folder), "img_size": 16, "num_workers": 1,
                     "augment": {"re_prob": 0.0}},
            "model": {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2,
                      "moe": {"router": "ermoe", "num_experts": 4, "blocks": "all"}},
            "optim": {"epochs": 2, "batch_size": 8, "warmup_steps": 2, "eval_batch_size": 16, **optim}})

    full = train(cfg("full"), quiet=True)
    monkeypatch.setattr(FolderDataset, "__getitem__", _kill_at_index_5)
    with pytest.raises(DataLoaderWorkerError, match="worker died.*resumes with `ermoe train --resume"):
        train(cfg("killed"), quiet=True)
    monkeypatch.undo()
    killed = tmp_path / "killed"
    assert (killed / "checkpoints" / "latest").exists()
    resumed = train(cfg("killed"), resume=killed, quiet=True)

    def losses(run: Path) -> dict[int, float]:
        lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in lines if r["kind"] == "train"}

    a, b = losses(full), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in a)
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["data_skipped_files"] == 0 and metrics["test_images"] == 12


def test_a_run_refuses_to_go_on_over_changed_data_unless_told_and_then_logs_it(tmp_path, capsys):
    """Issue 42: the run's data fingerprint (RUN/data_fingerprint.json). A training file deleted after the run
    started: resume names it and stops (before, it went on over 1 file fewer with no warning); --accept-data-change
    goes on and logs the change. A class folder added: `ermoe eval` names the added files before the model's size
    mismatch (was a raw RuntimeError)."""
    from ermoe.cli import main
    from ermoe.data.fingerprint import FILE, DataChangedError

    root = make_folder(tmp_path / "data", per_class=(6, 2))
    args = ["--out_dir", str(tmp_path), "--run_name=run", "--progress=false", "--tensorboard=false",
            "--data.name=imagefolder", f"--data.data_dir={root}", "--data.img_size=16", "--model.patch_size=8",
            "--model.depth=2", "--model.embed_dim=16", "--model.num_heads=2", "--optim.batch_size=6",
            "--optim.epochs=2", "--optim.max_steps=2", "--optim.eval_batch_size=16", "--probe_size=4"]
    assert main(["train", *args]) == 0
    run = tmp_path / "run"
    recorded = json.loads((run / FILE).read_text())
    assert recorded["splits"]["train"]["n"] == 19 and recorded["splits"]["test"]["n"] == 6
    assert "train/c1/001.jpg:" in "\n".join(recorded["splits"]["train"]["entries"])
    (root / "train" / "c1" / "001.jpg").unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--optim.max_steps=4"]) == 1
    err = capsys.readouterr().err
    assert "the data changed since the run started" in err and "train: 1 removed (e.g. train/c1/001.jpg:" in err
    assert "0 added" in err and "--accept-data-change" in err
    with pytest.warns(UserWarning, match="going on over changed data from step 2"):
        assert main(["train", "--resume", str(run), "--optim.max_steps=4", "--accept-data-change"]) == 0
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    change = [r for r in logged if r["kind"] == "data_change"]
    assert len(change) == 1 and change[0]["step"] == 2 and change[0]["changes"][0].startswith("train: 1 removed")
    assert json.loads((run / FILE).read_text())["splits"]["train"]["n"] == 18  # today's data is the run's now
    shutil.copytree(root / "val" / "c0", root / "val" / "c3")
    shutil.copytree(root / "train" / "c0", root / "train" / "c3")
    capsys.readouterr()
    assert main(["eval", str(run)]) == 1
    assert "test: 0 removed, 2 added (e.g. val/c3/000.jpg:" in capsys.readouterr().err
    with pytest.raises(DataChangedError, match="train: 0 removed, 7 added"):
        from ermoe.train.trainer import load_run
        load_run(run)


def test_a_run_stopped_by_a_corrupt_file_goes_on_with_skip_corrupt_turned_on(tmp_path, capsys):
    """Issue 42: the error's advice works. A corrupt training JPEG stops the run with a named error after its first
    checkpoint; `--resume RUN --data.skip_corrupt=true` goes on without that file (its data fingerprint unchanged:
    the file is still listed, only left out when met), the change logged like any override."""
    from ermoe.cli import main

    root = make_folder(tmp_path / "data", per_class=(6, 2))
    args = ["--out_dir", str(tmp_path), "--run_name=run", "--progress=false", "--tensorboard=false",
            "--data.name=imagefolder", f"--data.data_dir={root}", "--data.img_size=16", "--model.patch_size=8",
            "--model.depth=2", "--model.embed_dim=16", "--model.num_heads=2", "--optim.batch_size=6",
            "--optim.epochs=2", "--optim.eval_batch_size=16", "--probe_size=4", "--checkpoint_every=1"]
    assert main(["train", *args, "--optim.max_steps=1"]) == 0
    run = tmp_path / "run"
    for c in ("c1", "c2"):  # their headers zeroed, sizes kept: as if corrupt from the start (the fingerprint holds)
        for f in (root / "train" / c).glob("*.jpg"):
            f.write_bytes(bytes(64) + f.read_bytes()[64:])
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--optim.max_steps=2"]) == 1
    err = capsys.readouterr().err
    assert "cannot decode image" in err and "data.skip_corrupt: true leaves such files out" in err
    assert f"the run keeps its checkpoint of step 1: once the cause is fixed, go on with `ermoe train --resume {run}`" \
        in err
    with pytest.warns(UserWarning, match="left out"):
        assert main(["train", "--resume", str(run), "--optim.max_steps=2", "--data.skip_corrupt=true"]) == 0
    assert json.loads((run / "metrics.json").read_text())["step"] == 2
    changes = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "config_change" and "data.skip_corrupt" in r["changes"] for r in changes)


# configs ------------------------------------------------------------------------------------------------------------
def test_the_imagenet_config_trains_end_to_end_at_a_tiny_size(tmp_path, folder):
    cfg = load_config(CONFIGS / "imagenet_ermoe_vit_s16.yaml", [
        f"--data.data_dir={folder}", "--data.img_size=32", "--data.num_workers=0", "--model.depth=2",
        "--model.embed_dim=48", "--model.num_heads=2", "--optim.batch_size=8", "--optim.epochs=1",
        "--optim.warmup_steps=2", "--optim.eval_batch_size=16", "--log_every=1", "--checkpoint_every=0",
        f"--out_dir={tmp_path}", "--progress=false", "--tensorboard=false", "--probe_size=8"])
    assert cfg.data.augment == ImageAugment() and cfg.optim.label_smoothing == 0.1
    run = train(cfg, quiet=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["test_images"] == 12
    assert set(metrics["layers"]) == {"blocks.1.mlp"}  # every other block of 2
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log if r["kind"] == "train")


def test_switching_data_name_on_the_command_line_drops_the_files_keys_the_new_dataset_does_not_read(capsys):
    pytest.importorskip("nibabel")
    cfg = load_config(CONFIGS / "brainage_ermoe.yaml", ["--data.name=nifti_csv", "--data.csv=subjects.csv"])
    assert cfg.data.name == "nifti_csv" and cfg.data.csv == "subjects.csv"
    assert "cohort_size" not in cfg.data.to_dict()  # the file's 1,000 dropped: nifti_csv has no such key
    printed = capsys.readouterr().err
    assert printed.count("\n") == 1 and "data.name=nifti_csv" in printed and "cohort_size" in printed
    with pytest.raises(ConfigError, match="data.cohort_size does not apply to dataset 'nifti_csv'"):
        load_config(CONFIGS / "brainage_ermoe.yaml", ["--data.name=nifti_csv", "--data.cohort_size=10"])


def test_streaming_keys_do_not_apply_to_in_memory_sets_and_vice_versa():
    with pytest.raises(ConfigError, match="data.num_workers does not apply to dataset 'digits'"):
        load_config(None, {"data": {"name": "digits", "num_workers": 2}})
    with pytest.raises(ConfigError, match="data.hflip does not apply to dataset 'imagefolder'"):
        load_config(None, {"data": {"name": "imagefolder", "data_dir": "/x", "hflip": True}})
    with pytest.raises(ConfigError, match="optim.batch_size must be even"):
        load_config(None, {"data": {"name": "imagefolder", "data_dir": "/x", "augment": {}},
                           "optim": {"batch_size": 7}})
    with pytest.raises(ConfigError, match="data.num_workers must be >= 0"):
        load_config(None, {"data": {"name": "imagefolder", "data_dir": "/x", "num_workers": -1}})


def test_randaugment_at_its_top_magnitude_posterizes_to_black_on_any_pillow(folder):
    """timm's increasing posterize keeps 0 bits at magnitude 10; Pillow 13 refuses 0 bits, older Pillow gave a
    black image: ermoe's transform gives the black image (the recipe as timm meant it)."""
    from PIL import Image
    from timm.data.auto_augment import RandAugment, posterize

    from ermoe.data.folder import posterize_any_bits

    img = Image.fromarray(np.full((4, 4, 3), 200, dtype=np.uint8))
    assert np.asarray(posterize_any_bits(img, 0)).max() == 0
    assert np.array_equal(np.asarray(posterize_any_bits(img, 2)), np.full((4, 4, 3), 192))  # 200 & 0b11000000
    data = ImageFolderData(folder, 16, augment=ImageAugment(auto_augment="rand-m10-n3-mstd0-inc1"))
    transform = data.transform(training=True)
    ops = [op for t in transform.transforms if isinstance(t, RandAugment) for op in t.ops
           if op.name == "PosterizeIncreasing"]
    assert ops and all(op.aug_fn is posterize_any_bits and op.aug_fn is not posterize for op in ops)
    batches(data, stop=6)  # 48 examples x 3 ops at magnitude 10: posterize to 0 bits is drawn (it raised before)


def test_sample_table_holds_the_paths_and_labels_as_given():
    from ermoe.data.folder import SampleTable

    samples = [("/data/a/1.jpg", 0), ("/data/ü/éé.JPEG", 3), ("", 1), ("/x", 2)]
    table = SampleTable(samples)
    assert len(table) == 4 and [table[i] for i in range(4)] == samples
    assert table.paths.dtype == np.uint8 and table.labels.dtype == np.int64  # no Python object per sample


def test_mixed_soft_targets_train_by_timm_s_loss():
    """Soft targets of a mixed pair with optim.label_smoothing equal timm's mixup_target (smoothing applied, then
    mixed with the flipped batch) under timm's SoftTargetCrossEntropy."""
    from timm.data.mixup import mixup_target
    from timm.loss import SoftTargetCrossEntropy

    from ermoe.tasks.classification import CrossEntropy

    torch.manual_seed(0)
    logits, labels, lam = torch.randn(6, 5), torch.tensor([0, 3, 1, 4, 2, 2]), 0.7
    ours = lam * torch.nn.functional.one_hot(labels, 5).float() + \
        (1 - lam) * torch.nn.functional.one_hot(labels.flip(0), 5).float()
    peer = SoftTargetCrossEntropy()(logits, mixup_target(labels, 5, lam=lam, smoothing=0.1))
    torch.testing.assert_close(CrossEntropy(label_smoothing=0.1).loss(logits, ours), peer)


class _DeadWorkerIterator:
    """What torch's multi-process iterator does when next() finds a worker gone before the SIGCHLD handler runs."""

    def __init__(self) -> None:
        self.shut_down = 0

    def __iter__(self) -> "_DeadWorkerIterator":
        return self

    def __next__(self) -> None:
        raise RuntimeError("DataLoader worker (pid(s) 12345) exited unexpectedly")

    def _shutdown_workers(self) -> None:
        self.shut_down += 1


def test_a_dead_workers_iterator_is_shut_down_with_the_named_error():
    """When next() finds the worker gone first, torch keeps the worker's pid until its iterator is shut down, and the
    iterator lives on in the error's traceback: the SIGCHLD that follows then raised torch's raw "killed by signal"
    error wherever the process was (once in the run lock's release, in place of the named error). The named error
    shuts the iterator's workers down first; other errors leave them alone (a persistent loader keeps its workers)."""
    dead = _DeadWorkerIterator()
    with pytest.raises(DataLoaderWorkerError, match="worker died.*exited unexpectedly"):
        next(iterate(dead))
    assert dead.shut_down == 1

    class _BadBatch(_DeadWorkerIterator):
        def __next__(self) -> None:
            raise RuntimeError("shape mismatch")

    other = _BadBatch()
    with pytest.raises(RuntimeError, match="shape mismatch"):
        next(iterate(other))
    assert other.shut_down == 0
