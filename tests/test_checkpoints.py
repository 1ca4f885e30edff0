"""Epoch-end checkpoints: a run killed after epoch k and resumed ends exactly as an uninterrupted run."""

import json

import pytest
import torch

from ipfx.cli.main import main
from ipfx.experiments import RunSpec, load_dataset, run
from ipfx.experiments.engine import StopRequested, for_data

TINY = ["--model", "cnn", "--width", "4", "--data", "digits", "--epochs", "3", "--batch-size", "128",
        "--sparsities", "0.9", "--seeds", "0", "--spaces", "ip", "--no-progress"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def masks(model):
    return {k: v for k, v in model.state_dict().items() if k.endswith(".mask")}


@pytest.mark.parametrize("method", ["snip", "gmp", "rigl", "set", "imp"])
def test_a_run_killed_after_an_epoch_resumes_to_the_same_end(method, digits, tmp_path):
    spec = RunSpec(model="cnn", width=4, data="digits", method=method, sparsity=0.9, epochs=2, batch_size=128,
                   imp_rewind=0.3 if method == "imp" else None)
    whole = run(spec, digits, progress=False, keep_model=True)
    path = tmp_path / "run.pt"
    with pytest.raises(StopRequested):
        run(spec, digits, progress=False, checkpoint=path, stop_after_epoch=1)
    assert path.exists()
    lines = []
    resumed = run(spec, digits, progress=False, checkpoint=path, keep_model=True, log=lines.append)
    assert lines == [f"resuming run {method} ip sparsity 0.9 seed 0 from its checkpoint after epoch 1 "
                     f"(step 11 of {whole['steps']})"]
    assert resumed["resumed_from_epoch"] == 1 and "resumed_from_epoch" not in whole
    assert resumed["accuracy"] == whole["accuracy"]
    assert resumed["final_train_loss"] == whole["final_train_loss"] and resumed["steps"] == whole["steps"]
    a, b = masks(whole["_model"]), masks(resumed["_model"])
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)
    for k, v in whole["_model"].state_dict().items():  # every weight, not only the masks
        assert torch.equal(v, resumed["_model"].state_dict()[k]), k


def test_a_checkpoint_opens_with_weights_only_and_names_its_run(digits, tmp_path):
    spec = RunSpec(model="cnn", width=4, data="digits", method="rigl", sparsity=0.9, epochs=2, batch_size=128)
    with pytest.raises(StopRequested):
        run(spec, digits, progress=False, checkpoint=tmp_path / "c.pt", stop_after_epoch=1)
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert state["key"] == list(for_data(spec, digits).key()) and state["epoch"] == 1 and state["schedule"]["schedule"] == "RigL"
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was moved into place
    other = RunSpec(model="cnn", width=4, data="digits", method="rigl", sparsity=0.8, epochs=2, batch_size=128)
    with pytest.warns(UserWarning, match="belongs to another run"):  # never resume another run's state
        record = run(other, digits, progress=False, checkpoint=tmp_path / "c.pt", log=lambda line: None)
    assert "resumed_from_epoch" not in record


def test_compare_resumes_a_killed_sweep_and_removes_finished_checkpoints(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["compare", *TINY, "--methods", "gmp", "--out", str(out), "--_stop-after-epoch", "2"]) == 130
    assert "stopped after epoch 2" in capsys.readouterr().err
    assert len(list((out / "checkpoints").glob("*.pt"))) == 1 and not (out / "results.jsonl").exists()
    assert main(["compare", *TINY, "--methods", "gmp", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "resuming run gmp ip sparsity 0.9 seed 0 from its checkpoint after epoch 2 (step 22 of 33)" in printed
    record, = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert record["resumed_from_epoch"] == 2 and record["steps"] == 33
    assert not (out / "checkpoints").exists()  # the finished run's checkpoint is gone, and the empty folder


def test_keep_checkpoints_keeps_them(tmp_path):
    out = tmp_path / "sweep"
    assert main(["compare", *TINY, "--epochs", "2", "--methods", "random", "--out", str(out),
                 "--keep-checkpoints"]) == 0
    kept, = (out / "checkpoints").glob("*.pt")
    assert kept.name.startswith("cnn-random-ip-s0.9-seed0-")
    assert torch.load(kept, weights_only=True)["epoch"] == 1  # the last epoch end before the end of training


def test_a_checkpoint_left_by_a_run_that_was_stored_is_cleaned_up(tmp_path):
    out = tmp_path / "sweep"
    assert main(["compare", *TINY, "--epochs", "2", "--methods", "random", "--out", str(out),
                 "--keep-checkpoints"]) == 0
    assert list((out / "checkpoints").glob("*.pt"))  # as if killed between the record and the deletion
    assert main(["compare", *TINY, "--epochs", "2", "--methods", "random", "--out", str(out)]) == 0
    assert not (out / "checkpoints").exists() and len((out / "results.jsonl").read_text().splitlines()) == 1


def _corrupt(state: dict, how: str) -> None:
    if how.startswith("no "):
        del state[how[3:]]
    elif how == "a coefficient of another shape":
        state["model"]["conv1.coeff"] = torch.zeros(3, 3)
    elif how == "a mask missing":
        del state["model"]["conv1.mask"]
    elif how == "a step that is text":
        state["step"] = "x"
    elif how == "a negative epoch":
        state["epoch"] = -5
    elif how == "a step past the run":
        state["step"] = 10**6
    elif how == "a random state of the wrong type":
        state["rng"]["torch"] = torch.zeros(3)
    elif how == "an empty optimizer state":
        state["optimizer"] = {}
    elif how == "a data order cut short":
        state["data_order"] = state["data_order"][:3]
    elif how == "another precision":  # written by a run in bf16: a resume in fp32 would record a mix as fp32
        state["precision"] = "bf16"
    elif how == "momentum of another shape":  # torch's load takes it; the first step would crash, every rerun
        momenta = [s for s in state["optimizer"]["state"].values() if "momentum_buffer" in s]
        assert momenta  # the premise: the run's SGD keeps momentum
        momenta[0]["momentum_buffer"] = momenta[0]["momentum_buffer"].flatten()[:3].clone()
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["no model", "no rng", "no schedule", "a coefficient of another shape", "a mask missing",
                                 "a step that is text", "a negative epoch", "a step past the run",
                                 "a random state of the wrong type", "an empty optimizer state",
                                 "a data order cut short", "momentum of another shape",
                                 "another precision"])
def test_a_checkpoint_that_does_not_fit_is_reported_and_the_run_starts_over(how, digits, tmp_path):
    """A checkpoint of this run's key whose contents do not fit (edited, or written by a broken program) is
    never a crash and never half-restored: the run warns, starts over, and ends as an uninterrupted run."""
    spec = RunSpec(model="cnn", width=4, data="digits", method="gmp", sparsity=0.9, epochs=2, batch_size=128)
    whole = run(spec, digits, progress=False)
    path = tmp_path / "run.pt"
    with pytest.raises(StopRequested):
        run(spec, digits, progress=False, checkpoint=path, stop_after_epoch=1)
    state = torch.load(path, weights_only=True)
    _corrupt(state, how)
    torch.save(state, path)
    with pytest.warns(UserWarning, match="does not fit this run .*; the run starts over"):
        again = run(spec, digits, progress=False, checkpoint=path)
    assert "resumed_from_epoch" not in again
    assert (again["accuracy"], again["final_train_loss"]) == (whole["accuracy"], whole["final_train_loss"])


def test_a_temporary_file_left_by_a_killed_writer_is_deleted(digits, tmp_path):
    """A checkpoint write killed midway leaves ``.<name>.<host>.<pid>[.<thread>].tmp``; the next save or the removal of
    the run's checkpoint deletes it (its writer is dead), and never a live writer's."""
    import socket
    import subprocess
    import sys

    from ipfx.atomic import HOST
    from ipfx.experiments import checkpoint as ckpt

    path = tmp_path / "checkpoints" / "run.pt"
    path.parent.mkdir()
    dead = subprocess_pid()
    stale = path.with_name(f".run.pt.{HOST}.{dead}.tmp")
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # another live writer
    live = path.with_name(f".run.pt.{HOST}.{writer.pid}.{writer.pid}.tmp")
    elsewhere = path.with_name(".run.pt.another-host.1.tmp")
    for f in (stale, live, elsewhere):
        f.write_bytes(b"partial")
    spec = RunSpec(model="cnn", width=4, data="digits", method="gmp", sparsity=0.9, epochs=2, batch_size=128)
    try:
        with pytest.raises(StopRequested):
            run(spec, digits, progress=False, checkpoint=path, stop_after_epoch=1)
        assert not stale.exists() and live.exists() and elsewhere.exists() and path.exists()
    finally:
        writer.kill()
        writer.wait()
    ckpt.remove(path)  # the run is done: its checkpoint and the dead writer's temporary go
    assert not path.exists() and not live.exists() and elsewhere.exists()
    assert socket.gethostname()  # the host names temporaries, so a shared folder's other writers are left alone


def subprocess_pid() -> int:
    """The pid of a process that has ended."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid
