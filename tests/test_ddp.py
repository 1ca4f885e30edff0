"""Data-parallel runs (``torchrun -m ipfx compare``): 2 processes with gloo on CPU against 1 process.

* through torchrun and the CLI: a 2-process sweep (SNIP and GMP, 2 epochs, global batch 64) stores the
  same accuracies as the 1-process sweep, final train losses equal up to float reduction order, and
  rank 0's checkpoint after epoch 1 holds the same masks; results are written once;
* through the engine on 2 ranks (tests/gloo.py): both ranks end with the masks of the 1-process run;
* a global batch that does not split over the processes, and ``--workers`` under torchrun, are refused
  with one line.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gloo import run_on_ranks
from ipfx.cli.main import main
from ipfx.pruning.targets import targets

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["compare", "--model", "cnn", "--width", "4", "--data", "digits", "--epochs", "2", "--batch-size", "64",
        "--sparsities", "0.9", "--methods", "snip,gmp", "--spaces", "ip", "--seeds", "0", "--threads", "1",
        "--no-progress", "--keep-checkpoints"]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", "-m", "ipfx", *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


def records(out: Path) -> dict:
    return {r["method"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def masks_of(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.endswith("mask")}


def test_two_processes_equal_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*ARGS, "--out", str(one)]) == 0
    done = torchrun([*ARGS, "--out", str(two)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # the table and plot are written once (rank 0)
    a, b = records(one), records(two)
    assert len((two / "results.jsonl").read_text().splitlines()) == 2  # one record per run, not one per rank
    assert set(a) == set(b) == {"snip", "gmp"}
    for method in a:
        assert a[method]["processes"] == 1 and b[method]["processes"] == 2
        assert abs(a[method]["accuracy"] - b[method]["accuracy"]) <= 1e-6, method
        assert a[method]["final_train_loss"] == pytest.approx(b[method]["final_train_loss"], rel=1e-5, abs=1e-6)
        assert a[method]["steps"] == b[method]["steps"] == 2 * (a[method]["train_images"] // 64)
        ca = torch.load(next((one / "checkpoints").glob(f"cnn-{method}-*.pt")), weights_only=True)
        cb = torch.load(next((two / "checkpoints").glob(f"cnn-{method}-*.pt")), weights_only=True)
        ma, mb = masks_of(ca["model"]), masks_of(cb["model"])
        assert ma and ma.keys() == mb.keys()
        assert all(torch.equal(ma[k], mb[k]) for k in ma), method
        assert 0 < sum(int(m.sum()) for m in ma.values()) < sum(m.numel() for m in ma.values())


def _engine_run(rank: int, spec):
    from ipfx.experiments import load_dataset, run

    torch.set_num_threads(1)
    record = run(spec, load_dataset("digits"), progress=False, keep_model=True, log=lambda line: None)
    model = record.pop("_model")
    return {"accuracy": record["accuracy"], "masks": [t.mask.clone() for t in targets(model)]}


@pytest.mark.slow  # 15 s; test_two_processes_equal_one_process covers the same path by default
def test_every_rank_ends_with_the_one_process_masks(tmp_path):
    from ipfx.experiments import RunSpec, load_dataset, run

    spec = RunSpec(model="cnn", width=4, data="digits", method="gmp", sparsity=0.9, space="ip", epochs=2,
                   batch_size=64)
    torch.set_num_threads(1)
    ref = run(spec, load_dataset("digits"), progress=False, keep_model=True, log=lambda line: None)
    ref_masks = [t.mask for t in targets(ref["_model"])]
    ranks = run_on_ranks(functools.partial(_engine_run, spec=spec), str(tmp_path))
    for got in ranks:
        assert abs(got["accuracy"] - ref["accuracy"]) <= 1e-6
        assert len(got["masks"]) == len(ref_masks)
        assert all(torch.equal(m, r) for m, r in zip(got["masks"], ref_masks))
    assert 0 < sum(int(m.sum()) for m in ref_masks) < sum(m.numel() for m in ref_masks)


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "63"], "argument --batch-size: the global batch must be divisible by the 2 processes, got 63"),
    (["--workers", "2"], "argument --workers: not with torchrun"),
])
def test_torchrun_refuses_with_one_line(tmp_path, extra, message, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the check comes before joining a group
    monkeypatch.setenv("RANK", "0")
    assert main([*ARGS, *extra, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "results.jsonl").exists()


@pytest.mark.slow
@pytest.mark.slow  # ~20 s: the default run stays near 10 minutes on 2 cores
def test_two_torchrun_sweeps_at_once_train_each_run_once(tmp_path):
    """Rank 0 claims runs for its group (the other ranks follow its decisions): two data-parallel sweeps
    started together on one --out store each run once."""
    out = tmp_path / "out"
    args = [*[a if a != "snip,gmp" else "snip,gmp,random" for a in ARGS], "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--rdzv-id={i}",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{29600 + i}",
                               "--nproc-per-node=2", "-m", "ipfx", *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    methods = [r["method"] for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())]
    assert sorted(methods) == ["gmp", "random", "snip"], logs
    trained = [line for log in logs for line in log.splitlines() if line.startswith("[")]
    assert len(trained) == 3, logs
