"""Runs that never lie (issue 11), one test per problem found: overrides on resume apply or are refused, one writer
per run directory (kill -9 and a concurrent writer, on digits), no silent data fallback (tests/test_data.py),
divergence that can be recovered, strict config values, metrics across resumes, layer robustness (tests/test_moe.py),
and clean-up of interrupted writes."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ermoe.cli import main
from ermoe.train import (CheckpointError, ConfigError, NonFiniteLossError, Run, RunLockedError, evaluate,
                         load_checkpoint, load_config, train)
from ermoe.train import checkpoint as checkpoint_mod
from ermoe.train.checkpoint import save_checkpoint
from ermoe.train import trainer as trainer_mod
from ermoe.train.components import lr_lambda

pytest.importorskip("sklearn")

BASE = {"run_name": "run", "progress": False, "tensorboard": False, "log_every": 1, "probe_size": 32,
        "data": {"name": "digits", "train_limit": 640},
        "model": {"patch_size": 2, "depth": 2, "embed_dim": 32, "num_heads": 2,
                  "moe": {"router": "ermoe", "num_experts": 4, "blocks": "all"}},
        "optim": {"epochs": 2, "batch_size": 64, "warmup_steps": 3, "eval_batch_size": 128, "lr": 2e-3}}


def config(out, **changes):
    tree = json.loads(json.dumps({**BASE, "out_dir": str(out)}))
    for key, value in changes.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return load_config(None, tree)


def resumed_config(run, **changes):
    """The run's own config with overrides, as `ermoe train --resume RUN --key=value` builds it."""
    from ermoe.train.config import config_from_dict, config_to_dict
    tree = config_to_dict(Run(run).read_config())
    for key, value in changes.items():
        section, leaf = key.split(".")
        tree[section][leaf] = value
    return config_from_dict(tree)


def records(run, kind=None):
    lines = [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]
    return [r for r in lines if kind is None or r["kind"] == kind]


def snapshot(run):
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(Path(run).rglob("*")) if p.is_file()}


def same_weights(a, b):
    wa, _ = load_checkpoint(a)
    wb, _ = load_checkpoint(b)
    return all(torch.equal(wa[k], wb[k]) for k in wa)


# 1. overrides on resume -------------------------------------------------------------------------------------------
def test_a_learning_rate_override_on_resume_applies_from_the_resumed_step(tmp_path):
    full = train(config(tmp_path / "a"), quiet=True)
    part = train(config(tmp_path / "b", **{"optim.max_steps": 13}), quiet=True)
    run = train(resumed_config(part, **{"optim.lr": 1e-5, "optim.max_steps": None}), resume=part, quiet=True)
    lrs = {r["step"]: r["lr"] for r in records(run, "train")}
    for step in (5, 13):  # before the resume: the old rate; after: the new one, on the same schedule
        assert lrs[step] == pytest.approx(2e-3 * lr_lambda(step, 3, 20, 0.01))
    for step in (14, 20):
        assert lrs[step] == pytest.approx(1e-5 * lr_lambda(step, 3, 20, 0.01))
    assert not same_weights(full, run)  # today's main ignored the override: bitwise the uninterrupted run
    change = records(run, "config_change")
    assert change == [{"kind": "config_change", "step": 13, "changes": {
        "optim.lr": {"from": 2e-3, "to": 1e-5}, "optim.max_steps": {"from": 13, "to": None}}}]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 1e-5  # what runs now ...
    assert [h["step"] for h in saved["history"]] == [0, 13]  # ... and from which step
    assert saved["history"][1]["changes"]["optim.lr"] == {"from": 2e-3, "to": 1e-5}


def test_more_epochs_on_resume_rebuild_the_schedule(tmp_path):
    run = train(config(tmp_path), quiet=True)
    train(resumed_config(run, **{"optim.epochs": 3}), resume=run, quiet=True)
    lrs = {r["step"]: r["lr"] for r in records(run, "train")}
    assert max(lrs) == 30 and lrs[25] == pytest.approx(2e-3 * lr_lambda(25, 3, 30, 0.01))
    assert json.loads((run / "metrics.json").read_text())["step"] == 30


@pytest.mark.parametrize("key,value", [("data.train_limit", 320), ("optim.batch_size", 32), ("model.depth", 3),
                                       ("seed", 1)])
def test_an_override_that_would_make_another_run_is_refused(tmp_path, key, value):
    run = train(config(tmp_path, **{"optim.max_steps": 4}), quiet=True)
    before = snapshot(run)
    from ermoe.train.config import config_from_dict, config_to_dict
    tree = config_to_dict(Run(run).read_config())
    if "." in key:
        tree[key.split(".")[0]][key.split(".")[1]] = value
    else:
        tree[key] = value
    with pytest.raises(ConfigError, match=f"cannot change on resume: {key}"):
        train(config_from_dict(tree), resume=run, quiet=True)
    assert snapshot(run) == before


def test_a_moved_run_resumes_where_it_is_now(tmp_path, capsys):
    full = train(config(tmp_path / "a"), quiet=True)
    part = train(config(tmp_path / "b", **{"optim.max_steps": 13}), quiet=True)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    part.rename(moved)
    # as `ermoe train --resume` builds it: the stored config, which still names the old place
    run = train(resumed_config(moved, **{"optim.max_steps": None}), resume=moved, quiet=True)
    assert run == moved and same_weights(full, moved)  # the same run as the uninterrupted one
    saved = yaml.safe_load((moved / "config.yaml").read_text())
    assert (saved["out_dir"], saved["run_name"]) == (str(moved.parent), "moved")
    assert "out_dir" not in saved["history"][1]["changes"]  # where it lives is not a change of the run
    assert main(["train", "--resume", str(moved), f"--out_dir={tmp_path}"]) == 1
    assert "--out_dir does not apply with --resume" in capsys.readouterr().err


def test_cli_refuses_a_config_file_with_resume(tmp_path, capsys):
    run = train(config(tmp_path, **{"optim.max_steps": 2}), quiet=True)
    other = tmp_path / "other.yaml"
    other.write_text("optim:\n  lr: 0.1\n")
    assert main(["train", "--resume", str(run), "--config", str(other)]) == 1
    assert "--config does not apply with --resume" in capsys.readouterr().err


# 2. one writer per run directory; `latest` read once ------------------------------------------------------------
def test_a_concurrent_writer_is_refused_and_a_killed_one_is_taken_over(tmp_path):
    out = tmp_path / "runs"
    long = {"optim.epochs": 200, "checkpoint_every": 2}
    script = ("import sys, json; from ermoe.train import load_config, train; "
              "train(load_config(None, json.loads(sys.argv[1])), quiet=True)")
    tree = json.loads(json.dumps({**BASE, "out_dir": str(out)}))
    tree["optim"]["epochs"], tree["checkpoint_every"] = 200, 2
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(tree)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    run = out / "run"
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "latest").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the writer wrote no checkpoint in 120 s"
            time.sleep(0.2)
        assert json.loads((run / ".lock").read_text())["pid"] == proc.pid
        with pytest.raises(RunLockedError, match=f"process {proc.pid}"):
            train(resumed_config(run), resume=run, quiet=True)
        with pytest.raises(RunLockedError):
            evaluate(run, quiet=True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    # kill -9 left the lock behind: the next writer takes it over, and resumes exactly
    kept = checkpoint_mod.step_of(checkpoint_mod.resolve_checkpoint(run))
    with pytest.warns(UserWarning, match="taking over the lock .* gone"):
        train(resumed_config(run, **{"optim.max_steps": kept + 4}), resume=run, quiet=True)
    assert not (run / ".lock").exists()
    reference = train(config(tmp_path / "ref", **long, **{"optim.max_steps": kept + 4}), quiet=True)
    assert same_weights(run, reference)


def test_latest_is_read_once_on_resume(tmp_path, monkeypatch):
    full = train(config(tmp_path / "a", checkpoint_every=5), quiet=True)
    part = train(config(tmp_path / "b", checkpoint_every=5, **{"optim.max_steps": 15}), quiet=True)
    real = checkpoint_mod.find_checkpoint

    def then_move_latest(run_dir, *args, **kwargs):  # another writer moves `latest` right after we read it
        found = real(run_dir, *args, **kwargs)
        (Path(run_dir) / "checkpoints" / "latest").write_text("step_00000010\n")
        return found
    monkeypatch.setattr(trainer_mod, "find_checkpoint", then_move_latest)
    train(resumed_config(part, **{"optim.max_steps": None}), resume=part, quiet=True)
    assert same_weights(full, part)  # weights, optimizer and step all from the one read of step 15


# 4. divergence that can be recovered ----------------------------------------------------------------------------
def test_a_blow_up_reaches_the_divergence_handler_and_keeps_a_finite_checkpoint(tmp_path, monkeypatch):
    real_update = trainer_mod.Trainer._update

    def poisoned(self):  # step 12 sends one weight to 1e38: the next forward's activations overflow
        if self.step == 12:
            with torch.no_grad():
                self.model.patch_embed.proj.weight.fill_(1e38)
        real_update(self)
    monkeypatch.setattr(trainer_mod.Trainer, "_update", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 13.*--resume .*--optim.lr=.*--from-step"):
        train(config(tmp_path), quiet=True)
    run = tmp_path / "run"
    weights, state = load_checkpoint(run)
    assert state["step"] == 10
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_a_non_finite_gradient_stops_before_the_optimizer_step(tmp_path, monkeypatch):
    real = trainer_mod.Trainer._train_step

    def inf_grad(self, batch, epoch):
        stats = real(self, batch, epoch)
        if self.step == 12:
            self.model.head.weight.grad[0, 0] = float("inf")
        return stats
    monkeypatch.setattr(trainer_mod.Trainer, "_train_step", inf_grad)
    monkeypatch.setattr(trainer_mod.Trainer, "checkpoint", lambda self: None)  # nothing saved: check the weights
    seen = {}
    real_update = trainer_mod.Trainer._update

    def spy(self):
        seen["before"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        seen["optimizer"] = self.optimizer.state_dict()["state"]
        real_update(self)
    monkeypatch.setattr(trainer_mod.Trainer, "_update", spy)
    # (no checkpoint written: the advice is to start again, not a resume that would fail, issue 42)
    with pytest.raises(NonFiniteLossError, match="gradient norm is inf at step 12.*No checkpoint was written yet, so "
                                                 "there is nothing to resume: start the run again with a lower"):
        train(config(tmp_path), quiet=True)
    assert all(torch.isfinite(t).all() for s in seen["optimizer"].values() for t in s.values()
               if torch.is_tensor(t) and t.is_floating_point())


def test_non_finite_optimizer_moments_are_never_checkpointed(tmp_path, monkeypatch):
    real = trainer_mod.Trainer._update

    def poison_moments(self):
        real(self)
        if self.step == 15:
            next(iter(self.optimizer.state.values()))["exp_avg_sq"].fill_(float("inf"))
    monkeypatch.setattr(trainer_mod.Trainer, "_update", poison_moments)
    with pytest.raises(NonFiniteLossError, match="non-finite weights or optimizer moments at step 20"):
        train(config(tmp_path), quiet=True)
    assert load_checkpoint(tmp_path / "run")[1]["step"] == 10


@pytest.mark.parametrize("how", ["from_step", "checkpoint_dir"])
def test_resume_from_an_older_checkpoint(tmp_path, how):
    full = train(config(tmp_path / "a", checkpoint_every=5), quiet=True)
    run = train(config(tmp_path / "b", checkpoint_every=5, keep_checkpoints=4), quiet=True)
    assert [p.name for p in checkpoint_mod.list_checkpoints(run / "checkpoints")][0] == "step_00000005"
    if how == "from_step":
        assert main(["train", "--resume", str(run), "--from-step", "5"]) == 0
    else:
        assert main(["train", "--resume", str(run / "checkpoints" / "step_00000005")]) == 0
    assert [r["step"] for r in records(run, "train")] == list(range(1, 21))  # steps 6-20 redone once
    assert same_weights(full, run)
    with pytest.raises(CheckpointError, match="no checkpoint of step 7 .*kept steps: 5, 10, 15, 20"):
        train(resumed_config(run), resume=run, from_step=7, quiet=True)


@pytest.mark.parametrize("damage", ["corrupt_latest", "delete_latest"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, damage):
    full = train(config(tmp_path / "a", checkpoint_every=5), quiet=True)
    run = train(config(tmp_path / "b", checkpoint_every=5, **{"optim.max_steps": 15}), quiet=True)
    if damage == "corrupt_latest":
        weights = run / "checkpoints" / "step_00000015" / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
        match = "resuming from .*step_00000010 .*newest intact.*step_00000015/model.safetensors is corrupt"
    else:
        (run / "checkpoints" / "latest").unlink()
        match = "resuming from .*step_00000015.*latest is missing"
    with pytest.warns(UserWarning, match=match):
        train(resumed_config(run, **{"optim.max_steps": None}), resume=run, quiet=True)
    assert same_weights(full, run)


def test_a_torn_last_log_line_is_dropped_and_a_corrupt_one_named(tmp_path):
    run = train(config(tmp_path, **{"optim.max_steps": 13}), quiet=True)
    log = run / "log.jsonl"
    log.write_text(log.read_text() + '{"kind": "train", "st')  # a crash mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        train(resumed_config(run, **{"optim.max_steps": None}), resume=run, quiet=True)
    assert [r["step"] for r in records(run, "train")] == list(range(1, 21))
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:3] + ["garbage"] + lines[3:]) + "\n")
    with pytest.raises(CheckpointError, match="log.jsonl: line 4 is not JSON"):
        train(resumed_config(run, **{"optim.epochs": 3}), resume=run, quiet=True)


# 5. strict config values, no raw traceback -----------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["--model.moe.router_kwargs={standardize: 'false'}"], "standardize: expected bool, got str 'false'"),
    (["--model.depth=0"], "depth must be a positive int, got 0"),
    (["--model.embed_dim=-8"], "embed_dim must be a positive int, got -8"),
    (["--model.mlp_ratio=0"], "mlp_ratio must be > 0"),
    (["--data.name=imagefolder", "--data.img_size=0", "--data.data_dir=/tmp"], "data.img_size must be >= 1, got 0"),
    (["--optim.lr=.inf"], "optim.lr must be a finite number, got inf"),
    (["--optim.weight_decay=.inf"], "optim.weight_decay must be a finite number, got inf"),
    (["--device=cuda"], "no CUDA GPU"),
    (["--device=cpu:abc"], "device must be auto, cpu, cuda[:N] or mps, got 'cpu:abc'"),
    (["--threads=-1"], "threads must be >= 1, got -1"),
    (["--data.crop_padding=true"], "data.crop_padding: expected int, got bool True"),
])
def test_bad_values_are_one_line_errors_naming_the_key(tmp_path, capsys, args, message):
    if message == "no CUDA GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code = main(["train", f"--out_dir={tmp_path}", "--data.name=digits", "--model.patch_size=2", *args])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())  # nothing was written


def test_paths_that_are_not_what_they_should_be(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["train", f"--out_dir={tmp_path / 'file'}", "--data.name=digits", "--model.patch_size=2"]) == 1
    assert "out_dir" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path)]) == 1
    assert "is not a file" in capsys.readouterr().err


def test_a_write_error_names_the_path_and_cause_and_says_how_the_run_goes_on(tmp_path, capsys, monkeypatch):
    """Issue 42: a disk that fills at a checkpoint is a one-line error naming the path and the cause, with the
    resume command when a checkpoint was kept (and the resume then works), or "start again" when none was."""
    import errno
    real = trainer_mod.save_checkpoint
    fail_at = {"steps": {20}}

    def disk_full_at(ckpt_dir, step, *args, **kwargs):
        if step in fail_at["steps"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(ckpt_dir) / f".step_{step:08d}"))
        return real(ckpt_dir, step, *args, **kwargs)
    monkeypatch.setattr(trainer_mod, "save_checkpoint", disk_full_at)
    args = ["train", f"--out_dir={tmp_path}", "--data.name=digits", "--data.train_limit=640", "--model.patch_size=2",
            "--model.depth=2", "--model.embed_dim=16", "--model.num_heads=2", "--optim.epochs=2",
            "--optim.batch_size=64", "--progress=false", "--tensorboard=false"]
    assert main([*args, "--run_name=run"]) == 1
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert err.startswith(f"ermoe train: error: {run / 'checkpoints' / '.step_00000020'}: the disk is full; the "
                          f"run keeps its checkpoint of step 10: once the cause is fixed, go on with "
                          f"`ermoe train --resume {run}`")
    fail_at["steps"] = set()
    assert main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "metrics.json").read_text())["step"] == 20
    fail_at["steps"] = {10}
    assert main([*args, "--run_name=early"]) == 1
    assert "no checkpoint was written yet, so there is nothing to resume: once the cause is fixed, start the run " \
           f"again (its directory {tmp_path / 'early'} can be removed)" in capsys.readouterr().err


def test_torch_saves_failed_write_is_the_os_error_it_is_and_leaves_nothing(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError from its zip writer: a checkpoint write turns it into the
    OSError (ENOSPC when the disk has under a megabyte left), removes its temporary directory, keeps `latest`."""
    import errno
    import shutil as shutil_mod
    from collections import namedtuple

    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {"step": 1})
    def failing_save(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")
    monkeypatch.setattr(checkpoint_mod.torch, "save", failing_save)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_mod, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9, 4096))
    with pytest.raises(OSError) as caught:
        save_checkpoint(tmp_path, 2, {"w": torch.ones(2)}, {"step": 2})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename.endswith("state.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]
    monkeypatch.setattr(shutil_mod, "disk_usage", lambda path: usage(10 ** 9, 0, 10 ** 9))
    with pytest.raises(OSError, match="the write failed .*file write failed") as caught:
        save_checkpoint(tmp_path, 2, {"w": torch.ones(2)}, {"step": 2})
    assert caught.value.errno == errno.EIO


def test_a_checkpoint_of_another_shape_is_a_named_error_and_nothing_is_loaded(tmp_path):
    """Issue 42: a class folder added after the run started rebuilds the model with one more output; resume and
    `ermoe eval` said `RuntimeError: size mismatch for head.weight`. Now the key, both shapes and the likely cause."""
    from ermoe.models import create_model
    from ermoe.train.checkpoint import load_weights

    args = dict(img_size=8, in_chans=1, patch_size=4, depth=1, embed_dim=16, num_heads=2)
    then = create_model("vit_tiny", num_classes=10, **args).state_dict()
    now = create_model("vit_tiny", num_classes=11, **args)
    before = {k: v.clone() for k, v in now.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"head.weight is \(10, 16\) there, \(11, 16\) here; head.bias is "
                                              r"\(10,\) there, \(11,\) here\. .*did the data change"):
        load_weights(now, then, tmp_path / "step_00000010")
    assert all(torch.equal(v, before[k]) for k, v in now.state_dict().items())


# 6. metrics across resumes; strict JSON --------------------------------------------------------------------------
def test_training_time_accumulates_over_segments_and_a_finished_run_is_left_alone(tmp_path, capsys):
    run = train(config(tmp_path, **{"optim.max_steps": 8}), quiet=True)
    train(resumed_config(run, **{"optim.max_steps": None}), resume=run, quiet=True)
    metrics = json.loads((run / "metrics.json").read_text())
    segments = metrics["segments"]
    assert [(s["from_step"], s["to_step"]) for s in segments] == [(0, 8), (8, 20)]
    assert metrics["train_time_s"] == pytest.approx(sum(s["train_time_s"] for s in segments))
    assert metrics["train_time_s"] > segments[1]["train_time_s"] > 0
    assert metrics["train_img_per_s"] == pytest.approx(20 * 64 / metrics["train_time_s"])
    before = snapshot(run)
    train(resumed_config(run), resume=run)  # finished: nothing to do, nothing rewritten, no duplicate eval line
    assert "already finished at step 20" in capsys.readouterr().out
    assert snapshot(run) == before


def test_metrics_json_is_strict_json(tmp_path):
    run = train(config(tmp_path, **{"optim.max_steps": 2, "model.moe.num_experts": 8}), quiet=True)
    text = (run / "metrics.json").read_text()

    def refuse(constant):
        raise ValueError(f"bare {constant} in metrics.json")
    metrics = json.loads(text, parse_constant=refuse)
    angles = [a for layer in metrics["layers"].values() for a in layer.get("principal_angle_deg", [])]
    assert None in angles  # experts with fewer probe tokens than their rank: undefined, written as null


# 8. interrupted writes are cleaned up ----------------------------------------------------------------------------
def test_leftovers_of_interrupted_checkpoint_writes_are_removed_on_resume(tmp_path):
    run = train(config(tmp_path, **{"optim.max_steps": 4}), quiet=True)
    ckpts = run / "checkpoints"
    (ckpts / ".step_00000006.x1y2").mkdir()
    (ckpts / ".step_00000006.x1y2" / "model.safetensors").write_bytes(b"half")
    (ckpts / ".latest.abc.tmp").write_text("step_0000")
    train(resumed_config(run, **{"optim.max_steps": 6}), resume=run, quiet=True)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000004", "step_00000006"]
    assert math.isfinite(json.loads((run / "metrics.json").read_text())["test_loss"])
