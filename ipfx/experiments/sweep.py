"""A resumable sweep over runs: skip what the store already holds, record each run as it finishes."""

from __future__ import annotations

import itertools
import os
import warnings
from typing import Iterable, Sequence

from . import checkpoint as ckpt
from .claims import Claims
from .data import Dataset
from . import parallel
from .engine import RunSpec, for_data, run
from .store import ResultStore, _key_fields


#: The folder, next to the store, of the runs' claims (:mod:`.claims`).
CLAIMS = ".claims"


def grid(base: RunSpec, methods: Sequence[str], sparsities: Sequence[float], spaces: Sequence[str],
         seeds: Sequence[int], *, imp_rounds: int | None = None, imp_rewind: float | None = None) -> list[RunSpec]:
    """Every combination; SP and IP of one (method, sparsity, seed) are adjacent, so pairs finish together.

    ``imp_rounds``/``imp_rewind`` (default: ``base``'s, else the engine's defaults) reach the IMP runs
    only: a spec of another method drops them (see :class:`RunSpec`), so they are passed here rather
    than through a ``base`` whose method may not be IMP.
    """
    import dataclasses

    imp = dict(imp_rounds=base.imp_rounds if imp_rounds is None else imp_rounds,
               imp_rewind=base.imp_rewind if imp_rewind is None else imp_rewind)
    return [dataclasses.replace(base, method=m, sparsity=s, seed=seed, space=space, **imp)
            for m, s, seed, space in itertools.product(methods, sparsities, seeds, spaces)]


def sweep(specs: Iterable[RunSpec], dataset: Dataset, store: ResultStore, *, device="cpu", progress=True,
          command: str | None = None, log=print, checkpoints: str | os.PathLike | None = None,
          keep_checkpoints: bool = False, stop_after_epoch: int | None = None, workers: int = 1,
          threads: int | None = None, executor: str = "local", ray_address: str | None = None,
          cpus_per_run: float = 1.0, gpus_per_run: float = 0.0, engine=None) -> list[dict]:
    """Run what ``store`` does not hold yet (one after another, or in worker processes), appending each
    record as it finishes.

    With ``checkpoints`` (a folder) every run saves its state there at epoch ends, as
    ``<folder>/<run name>.pt``, and a run killed midway resumes from it when the sweep is rerun; a
    finished run's checkpoint is deleted once its record is in the store, unless ``keep_checkpoints``.
    With ``workers`` > 1 the runs go to that many worker processes (:mod:`.executors`), each with
    ``threads`` torch threads (default: an equal share of the cores); records are the same as in one
    process with the same thread count. ``executor="ray"`` runs them as Ray tasks instead, with
    ``cpus_per_run``/``gpus_per_run`` each, on a local Ray or the cluster at ``ray_address``.
    ``stop_after_epoch`` is a test hook passed to :func:`~.engine.run`; ``engine`` (an
    :class:`~.accel.Engine`, default: the device's) reaches every run.
    """
    specs = [for_data(s, dataset) for s in specs]  # the data's identity is part of every run's key
    main = parallel.is_main()  # under torchrun every rank trains every run; rank 0 alone writes
    if not main:
        log = lambda line: None  # noqa: E731
    elif parallel.active() and (executor != "local" or workers > 1):
        from ..errors import IPFXValueError

        raise IPFXValueError("a data-parallel sweep (torchrun) runs its runs one after another; drop --workers/--executor")
    done = store.done()
    parallel.barrier()  # every rank has read the store before rank 0 appends to it
    todo = [s for s in specs if s.key() not in done]
    if len(todo) < len(specs):
        log(f"resuming: {len(specs) - len(todo)} of {len(specs)} runs already in {store.path}")
        _warn_other_precision(store, {s.key() for s in specs} & done, engine)
        if not keep_checkpoints and main:  # a kill between storing a record and deleting the checkpoint leaves one behind
            for spec in specs:
                if spec.key() in done:
                    ckpt.remove(ckpt.checkpoint_path(checkpoints, spec))
    # another sweep on this folder trains what it has claimed (.claims); under torchrun rank 0 claims for
    # its group and every rank follows its decisions (parallel.from_main)
    claims = Claims(store.path.parent / CLAIMS) if main else None
    held: list[RunSpec] = []
    if claims is not None and todo:
        mine = [s for s in todo if claims.take(s)]
        done = store.done()  # read again: a run finished and released just before it was claimed is done
        held = [s for s in todo if s not in mine]
        todo = [s for s in mine if s.key() not in done]
        for spec in mine:
            if spec.key() in done:
                claims.release(spec)
        if held:
            log(f"{len(held)} run(s) are being trained by another sweep on {store.path.parent}: running the others "
                "first, then waiting for those")
    todo, held = parallel.from_main((todo, held))
    finished = 0

    def report(spec: RunSpec, record: dict) -> None:
        nonlocal finished
        finished += 1
        if claims is not None:
            claims.release(spec)  # its record is stored
        log(f"[{finished}/{len(todo) + len(held)}] {spec.method:9s} {spec.space} sparsity {spec.sparsity:<6g} "
            f"seed {spec.seed}: accuracy {100 * record['accuracy']:.2f}% ({record['seconds']:.0f} s)")

    def run_here(spec: RunSpec) -> None:
        path = ckpt.checkpoint_path(checkpoints, spec)
        record = run(spec, dataset, device=device, progress=progress, command=command, checkpoint=path,
                     log=log, stop_after_epoch=stop_after_epoch, engine=engine)
        if main:
            store.append(record)
            if not keep_checkpoints:
                ckpt.remove(path)
        report(spec, record)

    try:
        if executor == "ray" and todo:
            from .executors import run_on_ray

            run_on_ray(todo, dataset, store, address=ray_address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run,
                       threads=threads, device=device, command=command, checkpoints=checkpoints,
                       keep_checkpoints=keep_checkpoints, stop_after_epoch=stop_after_epoch, engine=engine,
                       on_record=report)
        elif workers > 1 and len(todo) > 1:
            from .executors import run_in_pool

            run_in_pool(todo, dataset, store, workers=min(workers, len(todo)), threads=threads, device=device,
                        command=command, checkpoints=checkpoints, keep_checkpoints=keep_checkpoints,
                        stop_after_epoch=stop_after_epoch, engine=engine, on_record=report)
        else:
            for spec in todo:
                run_here(spec)
        for spec in held:  # claimed by another sweep: its record comes from there, unless that sweep died
            orphan = None
            if claims is not None:
                claims.take(spec, wait=True)
                orphan = spec.key() not in store.done()
                if not orphan:
                    claims.release(spec)
            if parallel.from_main(orphan):
                log(f"the sweep that claimed {ckpt.run_name(spec)} ended without its record: running it here")
                run_here(spec)
    finally:
        if claims is not None:
            claims.release_all()
    parallel.barrier()  # rank 0's records are all in the store
    return [r for r in store.records() if tuple(r.get(k) for k in RunSpec.__dataclass_fields__) in
            {s.key() for s in specs}]


def _warn_other_precision(store: ResultStore, keys: set, engine) -> None:
    """Say so where runs this sweep takes from the store were computed in another precision than it asks for
    (a run's key leaves its engine out: :class:`~.accel.Engine`): their records stand for these runs."""
    if engine is None or not keys:
        return
    fields = _key_fields()
    other = [r for r in store.records()
             if tuple(r.get(k) for k in fields) in keys and (r.get("engine") or {}).get("precision", engine.precision)
             != engine.precision]
    if other:
        warnings.warn(f"{len(other)} of the runs already in {store.path} were computed in "
                      f"{other[0]['engine']['precision']!r} precision, not the {engine.precision!r} asked for; their "
                      "records stand for those runs (a run's precision is not part of its key): write to another "
                      "folder to compute them again", stacklevel=2)
