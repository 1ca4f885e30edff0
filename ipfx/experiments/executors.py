"""Running the runs of a sweep in several worker processes on one machine (``ipfx compare --workers N``).

Each worker is a fresh process (the ``spawn`` start method: no state forked from the parent, and safe
with CUDA and with torch's thread pools), holds the dataset once (sent when it starts, not with every
run), uses ``threads`` torch threads so that N workers do not oversubscribe the cores, and appends
its records to the shared result store itself; the store's lock keeps concurrent appends whole.
Runs are independent and seeded by their spec, so a run gives the same record in any worker.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import checkpoint as ckpt
from .data import Dataset
from .engine import RunSpec, run
from .store import ResultStore

_DATASET: Dataset | None = None  # the worker's copy, set by _start_worker
_WATCHING = False  # whether this process already ends with its parent


def cores() -> int:
    """CPU cores this process may use (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads_per_worker(workers: int, threads: int | None = None) -> int:
    """``threads`` if given, else an equal share of the cores: N workers with torch's default of one
    thread per core each would fight over the cores and run slower than one worker."""
    return threads if threads else max(1, cores() // workers)


def run_in_pool(todo: Sequence[RunSpec], dataset: Dataset, store: ResultStore, *, workers: int,
                threads: int | None, device, command: str | None, checkpoints, keep_checkpoints: bool,
                stop_after_epoch: int | None, on_record: Callable[[RunSpec, dict], None], engine=None) -> None:
    """Run ``todo`` in ``workers`` processes; ``on_record`` is called in this process as each one ends.

    The first run that fails stops the sweep: runs not yet started are cancelled, the ones under way
    are waited for (their records and checkpoints are kept), and the error is raised here.
    """

    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_start_worker,
                               initargs=(dataset, threads_per_worker(workers, threads), os.getpid()))
    try:
        futures = {pool.submit(_run_one, spec, str(store.path), str(device), command,
                               ckpt.checkpoint_path(checkpoints, spec), keep_checkpoints, stop_after_epoch, engine): spec
                   for spec in todo}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in finished:
                if future.exception() is not None:
                    raise future.exception()
                on_record(futures[future], future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _start_worker(dataset: Dataset, threads: int, sweep_pid: int | None = None) -> None:
    """Worker set-up: keep the dataset, share the cores, end with the sweep (process ``sweep_pid``)."""
    global _DATASET
    _DATASET = dataset
    torch.set_num_threads(threads)
    if sweep_pid is not None:
        _exit_with_parent(sweep_pid)


def _exit_with_parent(parent: int) -> None:
    """End this worker as soon as the sweep's process is gone (killed, or ended by a signal the pool never
    saw). A pool's workers would otherwise finish the run they hold and append its record, while the
    rerun that resumes the sweep trains the same run again: a duplicated record. The run's last
    epoch-end checkpoint is what the rerun resumes from. ``parent`` comes from the sweep itself: a worker
    still starting when the sweep died would otherwise take its new parent (init) for the sweep."""
    global _WATCHING
    if _WATCHING:
        return
    _WATCHING = True

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="ipfx-exit-with-parent", daemon=True).start()


def _run_one(spec: RunSpec, store_path: str, device: str, command: str | None, checkpoint: Path | None,
             keep_checkpoint: bool, stop_after_epoch: int | None, engine=None) -> dict:
    """One run in a worker: train, append the record, drop the checkpoint; the record goes back to the
    parent for its log line (without the model)."""
    record = run(spec, _DATASET, device=device, progress=False, command=command, checkpoint=checkpoint,
                 log=lambda line: print(line, flush=True), stop_after_epoch=stop_after_epoch, engine=engine)
    ResultStore(store_path).append(record)
    if not keep_checkpoint:
        ckpt.remove(checkpoint)
    return {k: v for k, v in record.items() if not k.startswith("_")}


def run_on_ray(todo: Sequence[RunSpec], dataset: Dataset, store: ResultStore, *, address: str | None,
               cpus_per_run: float, gpus_per_run: float, threads: int | None, device, command: str | None,
               checkpoints, keep_checkpoints: bool, stop_after_epoch: int | None,
               on_record: Callable[[RunSpec, dict], None], engine=None) -> None:
    """Run ``todo`` as Ray tasks, each asking for ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs.

    ``address`` None starts a local Ray for this sweep (and stops it at the end); otherwise it names an
    existing cluster (``auto``, ``host:port``, ``ray://host:port``), whose nodes must see the output
    folder (a shared file system) and have ipfx installed. The dataset is put into Ray's object store
    once. The first failed run stops the sweep: the other tasks are cancelled and the error is raised.
    """
    import ray


    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"PYTHONPATH": _import_path()}} if address is None else None)
    try:
        task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)(_ray_run)
        data = ray.put(dataset)
        threads = threads or max(1, int(cpus_per_run))
        refs = {task.remote(spec, data, threads, str(store.path), str(device), command,
                            ckpt.checkpoint_path(checkpoints, spec), keep_checkpoints, stop_after_epoch, engine): spec
                for spec in todo}
        pending = list(refs)
        try:
            while pending:
                finished, pending = ray.wait(pending, num_returns=1)
                on_record(refs[finished[0]], ray.get(finished[0]))
        except BaseException:
            for ref in pending:
                ray.cancel(ref)
            raise
    finally:
        if started_here:
            ray.shutdown()


def _ray_run(spec, dataset, threads, store_path, device, command, checkpoint, keep_checkpoint, stop_after_epoch,
             engine=None):
    """One run as a Ray task: as in a pool worker, with the dataset from the object store."""
    global _DATASET
    _start_worker(dataset, threads)
    try:
        return _run_one(spec, store_path, device, command, checkpoint, keep_checkpoint, stop_after_epoch, engine)
    finally:
        _DATASET = None


def _import_path() -> str:
    """The folder this ipfx is imported from, ahead of the rest: local Ray workers then import the
    same ipfx as this process (a source checkout, not another installed copy)."""
    here = str(Path(__file__).resolve().parents[2])
    rest = os.environ.get("PYTHONPATH", "")
    return here + (os.pathsep + rest if rest else "")
