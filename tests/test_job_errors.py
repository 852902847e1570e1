"""A torchrun job's errors: each rank's named error goes to the file torchrun gives it, so that torchrun's summary
(rendered here by torch.distributed.elastic's own code) shows the first failure's named error as the root cause,
once, and a rank stopped by a lost peer is a named error dated after it."""

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

import ermoe.train
from ermoe.cli import main
from ermoe.job_errors import PeerLostError, peer_lost

# what rank 0 of a 2-process gloo job raised when rank 1 was killed (kill -9) during an all_reduce (torch 2.14.1)
GLOO_PEER_KILLED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                    "[127.0.0.1]:47306: Connection reset by peer. This is typically caused by a remote worker hanging "
                    "or bugs in the application. Check the logs of the remote worker before reporting an error.")


def _as_rank(monkeypatch, tmp_path, rank: int) -> str:
    path = str(tmp_path / f"error_{rank}.json")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    return path


def test_the_first_named_error_is_torchruns_root_cause_and_said_once(tmp_path, monkeypatch, capsys):
    # rank 1 fails on a bad setting; rank 0, waiting on it in a collective, loses its connection
    error_1 = _as_rank(monkeypatch, tmp_path, 1)
    assert main(["train", f"--out_dir={tmp_path}", "--optim.epochs=-1"]) == 1
    error_0 = _as_rank(monkeypatch, tmp_path, 0)
    monkeypatch.setattr(ermoe.train, "train", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(GLOO_PEER_KILLED)))
    assert main(["train", f"--out_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "optim.epochs" not in err and err.count("torchrun's summary") == 2  # each rank: one pointer line

    failures = {rank: ProcessFailure(rank, 1000 + rank, 1, path) for rank, path in ((0, error_0), (1, error_1))}
    summary = ChildFailedError("ermoe", failures).format_msg()
    others, root = summary.split("Root Cause (first observed failure):")
    assert "rank      : 1" in root and "ermoe train: error: " in root and "optim.epochs" in root
    assert "Traceback" not in summary and summary.count("optim.epochs") == 1
    assert "rank 0 lost another process of the job (Connection reset by peer)" in others
    assert failures[0].timestamp > failures[1].timestamp  # the lost peer is dated after the cause


def test_peer_loss_is_recognised_and_other_runtime_errors_are_not():
    lost = peer_lost(RuntimeError(GLOO_PEER_KILLED))
    assert isinstance(lost, PeerLostError) and "Connection reset by peer" in str(lost)
    assert peer_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert peer_lost(ValueError(GLOO_PEER_KILLED)) is None


def test_an_unnamed_error_in_a_job_leaves_its_traceback_for_torchrun(tmp_path, monkeypatch):
    path = _as_rank(monkeypatch, tmp_path, 1)
    monkeypatch.setattr(ermoe.train, "train", lambda *a, **k: (_ for _ in ()).throw(KeyError("lost_key")))
    with pytest.raises(KeyError):
        main(["train", f"--out_dir={tmp_path}"])
    failure = ProcessFailure(1, 1001, 1, path)
    assert "KeyError" in failure.message["message"] and "Traceback" in failure.message["extraInfo"]["py_callstack"]


def test_alone_the_named_error_goes_to_stderr(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    assert main(["train", f"--out_dir={tmp_path}", "--optim.epochs=-1"]) == 1
    assert "ermoe train: error: " in capsys.readouterr().err
