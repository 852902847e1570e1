"""Checkpoint formats: a run written before the trainer saved its components by name (format 1, a committed
fixture made by tests/fixtures/make_checkpoint_v1.py at commit d7f2353) resumes exactly; a format this version does
not know is refused naming it."""

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ermoe.train import CheckpointError, evaluate, load_checkpoint, train
from ermoe.train.checkpoint import STATE_FORMAT, save_checkpoint, upgrade_state
from ermoe.train.run import Run

pytest.importorskip("sklearn")
FIXTURES = Path(__file__).parent / "fixtures"


def digests(weights) -> dict[str, str]:
    return {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in sorted(weights.items())}


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.fixture
def keep_threads():
    """The fixture's run sets ``threads: 1`` (the expected digests were made so): torch's thread count is the
    process's, given back after the test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kernels", ["these", "others"])
def test_a_format_1_run_resumes_to_the_same_weights_as_the_old_trainers_uninterrupted_run(tmp_path, keep_threads,
                                                                                          monkeypatch, kernels):
    """Bit for bit where the float kernels are the fixture's (its platform); to float32 rounding elsewhere ("others"
    stands in for another CPU)."""
    if kernels == "others":
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "another CPU")
    run = tmp_path / "checkpoint_v1"
    shutil.copytree(FIXTURES / "checkpoint_v1", run)
    expected = json.loads((FIXTURES / "checkpoint_v1_expected.json").read_text())
    cfg = Run(run).read_config()
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, max_steps=None))
    train(cfg, resume=run, quiet=True)
    weights, state = load_checkpoint(run)
    assert state["step"] == expected["step"] == 20
    metrics = json.loads((run / "metrics.json").read_text())
    here = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}
    if here == expected["platform"]:  # the same kernels as the run that made the fixture: bit for bit
        differ = sorted(k for k, v in digests(weights).items() if v != expected["weights_sha256"][k])
        assert not differ, f"weights differ from the format-1 trainer's uninterrupted run: {differ[:5]}"
        assert losses(run) == expected["losses"]
        assert metrics["test_top1"] == expected["test_top1"]
        assert metrics["ema"]["test_top1"] == expected["ema_test_top1"]
    else:  # other float kernels (another CPU's vector width, another torch): the same run to float32 rounding
        old = load_file(str(FIXTURES / "checkpoint_v1_expected.safetensors"))
        for key, value in old.items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-5, msg=key)
        assert losses(run) == pytest.approx(expected["losses"], rel=1e-5)


def test_a_format_this_version_does_not_know_is_refused_naming_it(tmp_path):
    run = tmp_path / "checkpoint_v1"
    shutil.copytree(FIXTURES / "checkpoint_v1", run)
    weights, state = load_checkpoint(run)
    future = {**state, "format_version": STATE_FORMAT + 1}
    ckpt = save_checkpoint(tmp_path / "future" / "checkpoints", 10, weights, future)
    with pytest.raises(CheckpointError,
                       match=f"checkpoint format {STATE_FORMAT + 1}; this ermoe reads formats 1 to {STATE_FORMAT}"):
        load_checkpoint(ckpt)


def test_format_1_maps_every_key_to_its_part():
    """The converter by hand: each key of the old flat state lands in the part that now owns it."""
    old = {"step": 7, "optimizer": {"state": {}, "param_groups": []}, "scaler": {}, "rng": {"torch": torch.ones(2)},
           "probe_assignment": {"l": torch.zeros(3, 1)}, "probe_changed": {"l": (0.1, 0.5)}, "train_time_s": 2.5,
           "segments": [{"from_step": 0, "to_step": 7, "train_time_s": 2.5}], "straggler": {"l": 8.4},
           "straggler_steps": 7, "ema": {"w": torch.zeros(1)}}
    new = upgrade_state(old)
    assert new["format_version"] == STATE_FORMAT and new["step"] == 7
    parts = new["components"]
    assert parts["position"] == parts["logger"] == {"step": 7} and parts["guard"] == {}
    assert parts["optimization"] == {"optimizer": old["optimizer"], "scaler": {}, "schedule_step": 7}
    assert parts["rng"] is old["rng"] and parts["ema"] == {"weights": old["ema"]}
    assert parts["routing"] == {"assignment": old["probe_assignment"], "changed": {"l": (0.1, 0.5)}}
    assert parts["clock"] == {"train_time_s": 2.5, "segments": old["segments"]}
    assert parts["straggler"] == {"sums": {"l": 8.4}, "steps": 7}
    assert upgrade_state(new) is new


def test_ermoe_eval_reads_a_format_1_checkpoint_with_its_ema(tmp_path, keep_threads):
    run = tmp_path / "checkpoint_v1"
    shutil.copytree(FIXTURES / "checkpoint_v1", run)
    with pytest.warns(UserWarning, match="has no data_fingerprint.json .*its data cannot be checked"):
        metrics = evaluate(run, quiet=True)  # (a run of before the fingerprint: said, not refused)
    assert metrics["step"] == 10 and set(metrics["ema"]) == {"test_top1", "test_top5", "test_loss"}
    assert metrics["ema"]["test_loss"] != metrics["test_loss"]  # the EMA's own weights, read from the old "ema" key


def test_a_checkpoint_whose_parts_are_not_the_trainers_is_refused(tmp_path, keep_threads):
    from ermoe.train import trainer as trainer_mod

    run = tmp_path / "checkpoint_v1"
    shutil.copytree(FIXTURES / "checkpoint_v1", run)
    cfg = Run(run).read_config()
    _, state = load_checkpoint(run)
    task, model, device = trainer_mod.setup(cfg)
    trainer = trainer_mod.Trainer(cfg, Run(run), task, model, device, quiet=True)
    try:
        without_ema = {**state, "components": {k: v for k, v in state["components"].items() if k != "ema"}}
        with pytest.raises(CheckpointError, match=r"holds the parts \[.*\]; this run's trainer has \[.*'ema'"):
            trainer.load_state_dict(without_ema)
    finally:
        trainer.close()


def test_the_log_is_cut_back_to_the_checkpoint_before_its_first_record(tmp_path):
    from ermoe.train.components import Logger, Position

    run = Run(tmp_path / "run")
    run.root.mkdir()
    (run.root / "log.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s}) + "\n" for s in (1, 2, 3)))
    position = Position(steps_per_epoch=10, epochs=1, max_steps=None)
    logger = Logger(run, tensorboard=False, position=position)
    logger.load_state_dict({"step": 2})
    logger.log({"kind": "train", "step": 3, "loss": 0.5})
    with pytest.raises(RuntimeError, match="restored before its first record"):
        logger.load_state_dict({"step": 1})
    logger.close()
    assert [json.loads(line) for line in (run.root / "log.jsonl").read_text().splitlines()] == [
        {"kind": "train", "step": 1}, {"kind": "train", "step": 2}, {"kind": "train", "step": 3, "loss": 0.5}]
    position.step = 3
    assert logger.state_dict() == {"step": 3}
