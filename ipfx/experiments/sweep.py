"""A resumable sweep over runs: skip what the store already holds, record each run as it finishes."""

from __future__ import annotations

import itertools
from typing import Iterable, Sequence

from .data import Dataset
from .engine import RunSpec, run
from .store import ResultStore


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
          command: str | None = None, log=print) -> list[dict]:
    specs = list(specs)
    done = store.done()
    todo = [s for s in specs if s.key() not in done]
    if len(todo) < len(specs):
        log(f"resuming: {len(specs) - len(todo)} of {len(specs)} runs already in {store.path}")
    for i, spec in enumerate(todo, 1):
        record = run(spec, dataset, device=device, progress=progress, command=command)
        store.append(record)
        log(f"[{i}/{len(todo)}] {spec.method:9s} {spec.space} sparsity {spec.sparsity:<6g} seed {spec.seed}: "
            f"accuracy {100 * record['accuracy']:.2f}% ({record['seconds']:.0f} s)")
    return [r for r in store.records() if tuple(r.get(k) for k in RunSpec.__dataclass_fields__) in
            {s.key() for s in specs}]
