"""The result store under concurrent appends, cut lines, and sweeps run in worker processes."""

import json
import subprocess
import sys
import warnings

import pytest
import torch

from helpers import store_record
from ipfx.cli.main import main
from ipfx.experiments import ResultStore
from ipfx.experiments import store as store_module

TINY = ["--model", "cnn", "--width", "4", "--data", "digits", "--epochs", "2", "--batch-size", "256",
        "--sparsities", "0.9", "--seeds", "0,1", "--methods", "random", "--no-progress", "--threads", "1"]

# the store's file alone (it needs neither torch nor the rest of ipfx to append), so the writers start at once
# and their appends overlap
WRITER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("store", sys.argv[4])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
ResultStore = module.ResultStore
store, writer, n = ResultStore(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    store.append({"writer": writer, "i": i, "padding": "x" * (5000 + 37 * i)})  # long lines: several writes
"""


def test_concurrent_appends_lose_and_duplicate_nothing(tmp_path):
    path, writers, n = tmp_path / "results.jsonl", 4, 300
    source = store_module.__file__
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(w), str(n), source]) for w in range(writers)]
    assert [p.wait(timeout=120) for p in procs] == [0] * writers
    lines = path.read_text().splitlines()
    assert len(lines) == writers * n
    seen = [(r["writer"], r["i"]) for r in map(json.loads, lines)]  # every line is one whole record
    assert sorted(seen) == [(w, i) for w in range(writers) for i in range(n)]


def test_a_cut_last_line_is_reported_skipped_and_not_glued_to_the_next_record(tmp_path):
    store = ResultStore(tmp_path / "results.jsonl")
    store.append(store_record(method="random"))
    with store.path.open("a") as f:
        f.write('{"method": "sn')  # the writer was killed halfway through the line
    with pytest.warns(UserWarning, match=r"line 2: cut or not JSON.* a sweep on this store runs them again"):
        assert [r["method"] for r in store.records()] == ["random"]
    store.append(store_record(method="gmp"))
    with pytest.warns(UserWarning, match="line 2: cut or not JSON"):
        assert [r["method"] for r in store.records()] == ["random", "gmp"]
    assert json.loads(store.path.read_text().splitlines()[2])["method"] == "gmp"


@pytest.mark.slow  # ~20 s: the default run stays near 10 minutes on 2 cores
def test_two_workers_give_the_records_of_one_also_after_a_kill_and_resume(tmp_path, capsys):
    threads = torch.get_num_threads()
    two = ["compare", *TINY, "--out", str(tmp_path / "two"), "--workers", "2"]
    try:
        assert main(["compare", *TINY, "--out", str(tmp_path / "one")]) == 0
        assert main([*two, "--_stop-after-epoch", "1"]) == 130  # the workers' runs are killed after epoch 1
        assert "stopped after epoch 1" in capsys.readouterr().err
        assert list((tmp_path / "two" / "checkpoints").glob("*.pt"))
        assert main(two) == 0
    finally:
        torch.set_num_threads(threads)
    assert "[4/4]" in capsys.readouterr().out

    def by_run(name):
        records = [json.loads(line) for line in (tmp_path / name / "results.jsonl").read_text().splitlines()]
        return records, {(r["seed"], r["space"]): (r["accuracy"], r["final_train_loss"]) for r in records}

    (_, one), (records, two) = by_run("one"), by_run("two")
    assert len(records) == 4 and two == one  # same seeds, same thread count: the same numbers
    assert any(r.get("resumed_from_epoch") == 1 for r in records)  # some came back from a checkpoint
    assert not (tmp_path / "two" / "checkpoints").exists()
    assert "Paired by seed" in (tmp_path / "two" / "results.md").read_text()  # two seeds: the paired tables


def _children(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(p) for p in f.read().split()}
    except OSError:
        return set()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_end_when_the_sweep_is_killed(tmp_path):
    """A killed sweep leaves no workers behind to finish their runs and append records a rerun would
    append again."""
    import os
    import signal
    import time

    long = [a if a != "2" else "200" for a in TINY]  # --epochs 200: still training when killed
    sweep = subprocess.Popen([sys.executable, "-m", "ipfx", *["compare", *long], "--workers", "2",
                              "--out", str(tmp_path / "s")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "s" / "checkpoints").exists():
            time.sleep(0.2)  # a worker has finished an epoch: the pool is up and training
        workers = {p for p in _children(sweep.pid) if _alive(p)}
        assert len(workers) >= 2
        os.kill(sweep.pid, signal.SIGKILL)
        sweep.wait()
        deadline = time.time() + 60  # a worker still importing ipfx on a loaded machine ends once it has
        while time.time() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert not (tmp_path / "s" / "results.jsonl").exists() or not (tmp_path / "s" / "results.jsonl").read_text()


@pytest.mark.slow  # 14 s; test_faults.test_two_sweeps_at_once_then_a_kill_of_one covers it by default
def test_two_identical_sweeps_at_once_train_and_store_each_run_once(tmp_path):
    """Two `ipfx compare` processes started together on one --out: each run is claimed by one of them
    (.claims/), so the store holds each run once and the two logs report each run once in all."""
    out = tmp_path / "out"
    args = ["compare", *[a if a != "0,1" else "0,1,2" for a in TINY], "--out", str(out)]
    command = [sys.executable, "-m", "ipfx", *args]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    keys = [(r["method"], r["space"], r["sparsity"], r["seed"]) for r in records]
    assert len(keys) == 6 and len(set(keys)) == 6  # 3 seeds x 2 spaces, once each
    trained = [line for log in logs for line in log.splitlines() if line.startswith("[")]
    assert len(trained) == 6, logs


def test_a_run_recorded_twice_is_counted_once(tmp_path):
    store = ResultStore(tmp_path / "results.jsonl")
    record = store_record(method="random", space="ip", sparsity=0.9, seed=0)
    store.append(record)
    store.append(record)
    store.append({**record, "seed": 1})
    with pytest.warns(UserWarning, match="1 record\\(s\\) repeat a run recorded before; each run is counted once"):
        assert [r["seed"] for r in store.records()] == [0, 1]


def test_one_value_spelt_twice_is_refused(capsys):
    for option, value in (("--sparsities", "0.9,0.90"), ("--seeds", "1,01")):
        with pytest.raises(SystemExit):
            main(["compare", *TINY, option, value])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "are the same value; give each value once" in err, err


def _image_folder(root, shade: int) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for c, cls in enumerate(("a", "b")):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(8):
                Image.new("RGB", (8, 8), ((shade + 40 * c + i) % 255, i, c)).save(folder / f"{i}.png")


def test_a_rerun_on_other_data_is_another_run(tmp_path, capsys, monkeypatch):
    """The data's identity is in the run key: the same --out with another --data-root trains again and
    reports that data's result, not the record of the first; the first data again resumes; changing a file
    of the folder makes it other data."""
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    _image_folder(a, 0)
    _image_folder(b, 100)
    args = ["compare", "--model", "cnn", "--width", "4", "--data", "folder", "--epochs", "1", "--batch-size", "8",
            "--sparsities", "0.9", "--seeds", "0", "--methods", "random", "--spaces", "ip", "--no-progress",
            "--threads", "1", "--out", str(out)]
    monkeypatch.setenv("IPFX_CACHE", str(tmp_path / "cache"))
    logs = []
    for root in (a, b, a):
        assert main([*args, "--data-root", str(root)]) in (None, 0)
        logs.append(capsys.readouterr().out)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[0]["data_id"] != records[1]["data_id"]
    assert "already" not in logs[1] and "resuming: 1 of 1 runs already" in logs[2]
    assert f"{100 * records[1]['accuracy']:.2f}" in logs[1]
    from PIL import Image

    Image.new("RGB", (8, 8), (1, 2, 3)).save(a / "train" / "a" / "0.png")  # one image changed
    assert main([*args, "--data-root", str(a)]) in (None, 0)
    assert "already" not in capsys.readouterr().out
    assert len((out / "results.jsonl").read_text().splitlines()) == 3


def test_a_spec_for_other_data_is_refused():
    import dataclasses

    from ipfx.errors import IPFXValueError
    from ipfx.experiments import RunSpec, load_dataset, run

    digits = load_dataset("digits")
    other = dataclasses.replace(digits, train_y=digits.train_y.flip(0), fingerprint=None)
    assert digits.identity != other.identity and digits.identity == load_dataset("digits").identity
    spec = RunSpec(model="cnn", width=4, data="digits", data_id=digits.identity)
    with pytest.raises(IPFXValueError, match="specified for data"):
        run(spec, other, progress=False)


@pytest.mark.parametrize("line", [b"\xff\xfe not text", b"[1, 2]", b'{"method": {"a": 1}, "space": 3}',
                                  b"accuracy: 'high'", b"missing accuracy", b"seed 'zero'", b"sparsity [1]",
                                  b"accuracy 7", b"no model"])
def test_a_store_line_that_is_not_a_record_is_reported_skipped_and_redone(tmp_path, capsys, line):
    """A line of results.jsonl that is not text, not JSON, not an object, lacks a field or holds one of the
    wrong type is reported (the line and why) and skipped, and its run is redone: never a traceback after the
    runs have trained."""
    out = tmp_path / "out"
    args = ["compare", *TINY, "--seeds", "0", "--out", str(out)]
    assert main(args) == 0
    good = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    edits = {b"accuracy: 'high'": {"accuracy": "high"}, b"seed 'zero'": {"seed": "zero"},
             b"sparsity [1]": {"sparsity": [1]}, b"accuracy 7": {"accuracy": 7}}
    if line in edits:
        line = json.dumps({**good, **edits[line]}).encode()
    elif line in (b"missing accuracy", b"no model"):
        field = "accuracy" if line == b"missing accuracy" else "model"
        line = json.dumps({k: v for k, v in good.items() if k != field}).encode()
    (out / "results.jsonl").write_bytes(line + b"\n")
    capsys.readouterr()
    with pytest.warns(UserWarning, match="line 1: .*skipped: a sweep on this store runs them again"):
        assert main(args) == 0
    assert "[2/2]" in capsys.readouterr().out  # both runs trained again
    with pytest.warns(UserWarning, match="line 1: "):  # the bad line is still there, reported on every read
        assert len(ResultStore(out / "results.jsonl").records()) == 2


def test_records_of_another_precision_taken_for_a_run_are_said(tmp_path, capsys):
    """A run's key leaves its engine out, so a sweep in fp32 on a folder of bf16 records takes those records: it
    says so, naming both precisions; the same precision again says nothing."""
    args = ["compare", "--model", "cnn", "--width", "4", "--data", "digits", "--epochs", "1", "--batch-size", "64",
            "--sparsities", "0.8", "--seeds", "0", "--methods", "random", "--spaces", "ip", "--no-progress",
            "--threads", "1", "--out", str(tmp_path / "out")]
    assert main([*args, "--precision", "bf16"]) in (None, 0)
    with pytest.warns(UserWarning, match="computed in 'bf16' precision, not the 'fp32' asked for"):
        assert main([*args, "--precision", "fp32"]) in (None, 0)
    assert "resuming: 1 of 1 runs already" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same precision again: nothing to say
        assert main([*args, "--precision", "bf16"]) in (None, 0)
