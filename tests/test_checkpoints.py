"""Epoch-end checkpoints: a run killed after epoch k and resumed ends exactly as an uninterrupted run."""

import json

import pytest
import torch

from ipfx.cli import main
from ipfx.experiments import RunSpec, load_dataset, run
from ipfx.experiments.engine import StopRequested

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
    assert state["key"] == list(spec.key()) and state["epoch"] == 1 and state["schedule"]["schedule"] == "RigL"
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
