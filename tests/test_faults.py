"""Fault injection: sweeps killed at random points and at the worst moments, run twice at once, and fed
corrupt files; after the rerun the store must equal an uninterrupted sweep's.

"Equal" means: one record per run, no run missing, none twice, and every record's numbers (accuracy, final
train loss, sparsity reached, steps) bitwise those of the uninterrupted sweep (one torch thread, so resumed
runs continue the very same computation). Faults are real ``SIGKILL``s: from outside at a random time, or
from inside at a chosen point (halfway through a checkpoint's bytes, halfway through a record's line,
between storing a record and deleting its checkpoint). The default run injects a few of each kind; the
``slow`` ones add many more random kills, worker pools and Ray.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

import ipfx.cli.main  # noqa: F401 - imported once here, inherited by every forked sweep
import ipfx.experiments.sweep  # noqa: F401

SWEEP = ["compare", "--model", "cnn", "--width", "4", "--data", "digits", "--epochs", "2", "--batch-size", "128",
         "--sparsities", "0.9", "--seeds", "0", "--methods", "random,gmp", "--spaces", "sp,ip", "--no-progress",
         "--threads", "1"]
RUNS = 4  # 2 methods x 2 spaces
NUMBERS = ("accuracy", "final_train_loss", "achieved_sparsity", "steps")

#: Code run before the sweep in the child process: each fault kills the process at one point, by SIGKILL.
FAULTS = {
    "none": "",
    # the checkpoint's temporary file holds half its bytes when the process dies
    "checkpoint write": """
import os, signal, torch
real = torch.save
def save(obj, f, *a, **k):
    real(obj, f, *a, **k)
    if "checkpoints" in str(getattr(f, "name", f)):
        f.flush(); f.truncate(f.tell() // 2); f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
""",
    # a record's line is half written
    "record write": """
import os, signal
from ipfx.experiments import store
def append(self, record):
    import json
    with self.path.open("ab") as f:
        f.write(json.dumps(record).encode()[:40]); f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
store.ResultStore.append = append
""",
    # the second record is stored, its checkpoint not yet deleted
    "after a record": """
import os, signal
from ipfx.experiments import store
real, calls = store.ResultStore.append, []
def append(self, record):
    real(self, record)
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
store.ResultStore.append = append
""",
}


INJECTED = {"kills": 0, "corrupt files": 0}  # what this session injected (conftest reports it at the end)


def _child(out: Path, fault: str, extra: list[str], log: Path) -> None:
    """The sweep, in a process forked from this one (no second import of torch and ipfx): its own process
    group (a kill takes any workers too), its output to ``log``, the fault installed, then the CLI."""
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = os.fdopen(fd, "w", buffering=1)
    try:
        exec(FAULTS[fault], {})
        from ipfx.cli.main import main

        code = main([*SWEEP, *extra, "--out", str(out)])
    except BaseException:  # noqa: BLE001 - reported in the log, seen as exit 1
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    os._exit(code)


def _start(out: Path, fault: str = "none", extra: list[str] = ()) -> multiprocessing.Process:
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(out, fault, list(extra),
                                                                            out.parent / "sweeps.log"))
    proc.start()
    return proc


def _wait(proc: multiprocessing.Process, out: Path, kill_after: float | None = None) -> int:
    """The exit status of ``proc`` once it ends, or after a SIGKILL at ``kill_after`` seconds."""
    proc.join(600 if kill_after is None else kill_after)
    if proc.is_alive():
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and any workers it started
        proc.join()
    log = (out.parent / "sweeps.log").read_text(errors="replace") if (out.parent / "sweeps.log").exists() else ""
    assert proc.exitcode in (0, -signal.SIGKILL), log[-3000:]
    INJECTED["kills"] += proc.exitcode == -signal.SIGKILL
    return proc.exitcode


def _sweep(out: Path, fault: str = "none", extra: list[str] = (), kill_after: float | None = None) -> int:
    """Run one sweep to its end, its fault, or ``kill_after`` seconds (a SIGKILL from outside)."""
    return _wait(_start(out, fault, extra), out, kill_after)


def _records(out: Path) -> list[dict]:
    records = []
    for line in (out / "results.jsonl").read_bytes().splitlines():
        try:
            records.append(json.loads(line.decode()))
        except (UnicodeDecodeError, json.JSONDecodeError):  # a cut or garbled line: the store skips it too
            continue
    return records


def _compare(out: Path, reference: dict) -> dict:
    """How the store at ``out`` differs from the uninterrupted sweep's: runs lost, duplicated, changed."""
    records = _records(out)
    keys = [(r["method"], r["space"]) for r in records]
    got = {(r["method"], r["space"]): tuple(r[k] for k in NUMBERS) for r in records}
    return {"lost": len(set(reference) - set(got)), "duplicated": len(keys) - len(set(keys)),
            "changed": sum(got[k] != reference[k] for k in set(got) & set(reference))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, float]:
    """The uninterrupted sweep's numbers per run, and how long the sweep took."""
    out = tmp_path_factory.mktemp("reference") / "out"
    started = time.time()
    assert _sweep(out) == 0
    records = _records(out)
    assert len(records) == RUNS
    return {(r["method"], r["space"]): tuple(r[k] for k in NUMBERS) for r in records}, time.time() - started


def _finish(out: Path, reference: dict, extra: list[str] = ()) -> None:
    assert _sweep(out, extra=extra) == 0
    assert _compare(out, reference) == {"lost": 0, "duplicated": 0, "changed": 0}
    assert len((out / "results.jsonl").read_bytes().splitlines()) >= RUNS
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))  # no temporary left behind
    assert not (out / "checkpoints").exists()  # every run finished: every checkpoint deleted


def test_kills_at_the_worst_moments_lose_duplicate_and_change_nothing(reference, tmp_path):
    """One sweep killed at each worst moment in turn (each rerun resumes the last), then finished."""
    numbers, _ = reference
    out = tmp_path / "out"
    for fault in ("checkpoint write", "after a record", "record write"):
        assert _sweep(out, fault) == -signal.SIGKILL, fault
    _finish(out, numbers)


def _random_kills(tmp_path: Path, reference, kills: int, seed: int, extra: list[str] = ()) -> None:
    numbers, seconds = reference
    rng = random.Random(seed)
    out = tmp_path / "out"
    for _ in range(kills):
        _sweep(out, extra=extra, kill_after=rng.uniform(0.5, seconds))
    _finish(out, numbers, extra)


def test_sweeps_killed_at_random_times_end_as_an_uninterrupted_one(reference, tmp_path):
    _random_kills(tmp_path, reference, kills=2, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_many_random_kills(reference, tmp_path, seed):
    _random_kills(tmp_path, reference, kills=5, seed=100 + seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2))
def test_random_kills_of_a_worker_pool(reference, tmp_path, seed):
    _random_kills(tmp_path, reference, kills=3, seed=200 + seed, extra=["--workers", "2"])


@pytest.mark.slow
def test_random_kills_of_a_ray_sweep(reference, tmp_path):
    pytest.importorskip("ray")
    _random_kills(tmp_path, reference, kills=2, seed=300, extra=["--executor", "ray", "--cpus-per-run", "1"])


def test_two_sweeps_at_once_then_a_kill_of_one(reference, tmp_path):
    """Two sweeps on one folder, one killed midway: the other trains what it had claimed, takes over the
    killed one's runs (their claims die with it), and the store holds each run once."""
    numbers, seconds = reference
    out = tmp_path / "out"
    first, second = _start(out), _start(out)
    _wait(first, out, kill_after=seconds / 2)
    assert _wait(second, out) == 0
    assert _compare(out, numbers) == {"lost": 0, "duplicated": 0, "changed": 0}


def _corrupt(out: Path, what: str) -> None:
    garbage = b"\x00\xff garbage \xfe\n" * 7
    INJECTED["corrupt files"] += 1
    if what == "store":
        with (out / "results.jsonl").open("ab") as f:
            f.write(garbage)
    elif what == "checkpoint":
        for path in (out / "checkpoints").glob("*.pt"):
            path.write_bytes(garbage)
    elif what == "claim":
        (out / ".claims").mkdir(exist_ok=True)
        for path in [*(out / ".claims").glob("*.lock"), out / ".claims" / "stray.lock"]:
            path.write_bytes(garbage)
    else:
        (out / ".ipfx-output.json").write_bytes(garbage)


def test_corrupt_files_are_reported_and_worked_around(reference, tmp_path):
    """The store, the checkpoints and the claim files overwritten with garbage after a kill: the rerun
    reports the store's lines and the checkpoints (and redoes their runs), a claim's contents mean nothing,
    and the store ends as an uninterrupted sweep's."""
    numbers, _ = reference
    out = tmp_path / "out"
    assert _sweep(out, "after a record") == -signal.SIGKILL  # two runs stored, the third's checkpoint written
    assert list((out / "checkpoints").glob("*.pt"))
    for what in ("store", "checkpoint", "claim"):
        _corrupt(out, what)
    _finish(out, numbers)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["store", "checkpoint", "claim", "output marker"])
def test_each_corrupt_file_alone(what, reference, tmp_path):
    """As above, one kind of file at a time; a garbled output marker is refused with one line (the folder's
    owner is unknown)."""
    numbers, _ = reference
    out = tmp_path / "out"
    assert _sweep(out, "after a record") == -signal.SIGKILL
    _corrupt(out, what)
    if what == "output marker":
        log = out.parent / "sweeps.log"
        log.unlink()
        proc = _start(out)
        proc.join(600)
        assert proc.exitcode == 2, log.read_text(errors="replace")
        lines = log.read_text().strip().splitlines()
        assert len(lines) == 1 and ": error: " in lines[0], lines
        return
    _finish(out, numbers)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["checkpoint write", "record write", "after a record"])
def test_each_worst_moment_alone(fault, reference, tmp_path):
    numbers, _ = reference
    out = tmp_path / "out"
    assert _sweep(out, fault) == -signal.SIGKILL
    _finish(out, numbers)
