"""``ipfx compare --executor ray`` on a local Ray on CPU: the records of a one-process sweep."""

import json

import pytest
import torch

from ipfx.cli.main import main

pytest.importorskip("ray")

TINY = ["--model", "cnn", "--width", "4", "--data", "digits", "--epochs", "2", "--batch-size", "256",
        "--sparsities", "0.9", "--seeds", "0,1", "--methods", "random", "--no-progress", "--threads", "1"]


def by_run(folder):
    records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    return {(r["seed"], r["space"]): (r["accuracy"], r["final_train_loss"]) for r in records}


@pytest.mark.slow  # ~20 s: the default run stays near 10 minutes on 2 cores
def test_a_ray_sweep_gives_the_records_of_one_process(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert main(["compare", *TINY, "--out", str(tmp_path / "one"), "--seeds", "0"]) == 0
        capsys.readouterr()
        # half of the sweep is in the store already: Ray runs the other half, next to those records
        ray = ["compare", *TINY, "--out", str(tmp_path / "ray"), "--executor", "ray", "--cpus-per-run", "1"]
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "results.jsonl").write_text((tmp_path / "one" / "results.jsonl").read_text())
        assert main(ray) == 0
        assert main(["compare", *TINY, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "resuming: 2 of 4 runs already" in capsys.readouterr().out
    one, ray = by_run(tmp_path / "one"), by_run(tmp_path / "ray")
    assert len(ray) == 4 and ray == one  # same seeds and thread count: the same numbers in Ray's workers
