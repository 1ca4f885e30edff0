"""``ipfx.prune``: one-shot pruning in coefficient space.

The same call prunes SP and IP models: scores are computed on ``coeff``; allocation turns them into
masks (:mod:`.allocation`); masks are written to every :class:`~ipfx.form.reparam.BasisWeight` and the
coefficients they remove are zeroed. Invariant: afterwards ``ipfx.sparsity(model)`` equals
``round((1 - sparsity) N)`` kept out of ``N`` exactly, and no previously masked coefficient returns.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from ..errors import IPFXTypeError, IPFXValueError
from . import allocation, distributed, scores
from .report import PruneReport, Row
from .targets import Target, targets as find_targets

METHODS = ("random", "magnitude", "snip", "grasp", "synflow")


def prune(
    model: nn.Module,
    method: str,
    sparsity: float,
    *,
    data: Iterable | None = None,
    loss_fn: Callable | None = None,
    example_inputs: Any = None,
    scope: str = "global",
    batches: int = 1,
    keep_dense: Sequence[str] = (),
    allow_empty: bool = False,
    seed: int | None = None,
    iterations: int = 100,
    temperature: float = 200.0,
) -> PruneReport:
    """Mask coefficients of a transformed model so that a fraction ``sparsity`` of them is pruned.

    Args:
        model: a model returned by :func:`ipfx.transform` (or one containing it, e.g. under DDP).
        method: ``"random"``, ``"magnitude"``, ``"snip"``, ``"grasp"`` or ``"synflow"``.
        sparsity: fraction of all prunable coefficients to mask, in ``[0, 1)``.
        data: iterable of ``(inputs, targets)`` batches (a DataLoader works) for snip/grasp; synflow
            only takes the input shape from it.
        loss_fn: ``loss_fn(outputs, targets)`` for snip/grasp.
        example_inputs: a tuple of positional arguments as for :func:`ipfx.transform` (``(x,)``), a tensor,
            or a shape: synflow takes the shape of its all-ones input from it.
        scope: ``"global"`` (one ranking), ``"layerwise"`` (uniform density) or ``"erk"``.
        batches: how many batches of ``data`` to score on.
        keep_dense: weight names (globs) kept dense, plus ``"first"``/``"last"`` for the first/last
            prunable tensor.
        allow_empty: allow a tensor to lose every coefficient (off by default: each keeps >= 1).
        seed: seed for ``"random"``.
        iterations: synflow rounds (100 in the paper).
        temperature: grasp's logit temperature (200 in the paper).

    Returns:
        a :class:`PruneReport` (kept/total per tensor; ``print(report)`` shows a table).
    """
    _check(model, method, sparsity, data, loss_fn, batches)
    found = find_targets(model, "prune")
    dense = _dense_flags(found, keep_dense)
    ctx = scores.ScoreContext(model, found, data, loss_fn, batches, example_inputs,
                              torch.Generator().manual_seed(seed if seed is not None else 0), temperature)
    kwargs = dict(scope=scope, shapes=[t.module.weight_shape for t in found], dense=dense, allow_empty=allow_empty)
    if method == "synflow":
        keep = _synflow(ctx, sparsity, iterations, kwargs)
    else:
        values = scores.SCORES[method](ctx)  # data-driven scores average their gradients over ranks
        keep = allocation.select(exclude_masked(values, found), sparsity, **kwargs)
    apply_masks(found, keep)
    return report(method, found)


def apply_masks(found: Sequence[Target], keep: Sequence[torch.Tensor]) -> None:
    """Write keep-masks to the targets; under torch.distributed, rank 0's masks win everywhere."""
    for t, k in zip(found, keep):
        t.mask.copy_(k.to(t.mask.dtype))
    distributed.broadcast_([t.mask for t in found])
    for t in found:
        t.set_mask(t.mask.bool())


def report(method: str, found: Sequence[Target]) -> PruneReport:
    spaces = {t.module.space for t in found if t.module.has_basis} or {"sp"}
    return PruneReport(method, spaces.pop() if len(spaces) == 1 else "mixed",
                       tuple(Row(t.name, t.kept(), t.numel) for t in found))


def _synflow(ctx: scores.ScoreContext, sparsity: float, iterations: int, kwargs: dict) -> list[torch.Tensor]:
    ones = scores.example_ones(ctx)
    work = scores.linearised_copy(ctx.model)
    work_targets = find_targets(work, "prune")
    density = 1.0 - sparsity
    keep = [t.mask.bool() for t in work_targets]
    for k in range(1, iterations + 1):
        values = scores.synflow_scores_of(work, ones)
        keep = allocation.select(exclude_masked(values, work_targets), 1.0 - density ** (k / iterations), **kwargs)
        for t, m in zip(work_targets, keep):
            t.set_mask(m)
    # the last round lands exactly on `sparsity`; map the masks back to the real model
    return [m.to(t.mask.device) for m, t in zip(keep, ctx.targets)]


def exclude_masked(values: Sequence[torch.Tensor], found: Sequence[Target]) -> list[torch.Tensor]:
    """Scores with NaN as 0 and every currently masked coefficient at ``-inf`` (never kept again)."""
    out = []
    for v, t in zip(values, found):
        v = torch.nan_to_num(v.float(), nan=0.0)
        out.append(torch.where(t.mask.bool(), v, torch.full_like(v, -math.inf)))
    return out


def _dense_flags(found: Sequence[Target], keep_dense: Sequence[str]) -> list[bool]:
    if isinstance(keep_dense, str):
        keep_dense = (keep_dense,)
    flags = [any(fnmatch.fnmatchcase(t.name, p) for p in keep_dense) for t in found]
    if "first" in keep_dense:
        flags[0] = True
    if "last" in keep_dense:
        flags[-1] = True
    return flags


def _check(model, method, sparsity, data, loss_fn, batches) -> None:
    if not isinstance(model, nn.Module):
        raise IPFXTypeError(f"ipfx.prune takes a torch.nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise IPFXValueError(f"unknown pruning method {method!r}; known methods: {', '.join(METHODS)}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise IPFXValueError(
            f"sparsity must be a number in [0, 1) (the fraction of coefficients to mask), got {sparsity!r}"
        )
    if method in scores.DATA_DRIVEN and (data is None or loss_fn is None):
        missing = " and ".join(n for n, v in (("data", data), ("loss_fn", loss_fn)) if v is None)
        raise IPFXValueError(
            f"method {method!r} scores coefficients with gradients of a loss, so it needs {missing}: "
            "data=<iterable of (inputs, targets)>, loss_fn=<loss_fn(outputs, targets)>, "
            "e.g. loss_fn=torch.nn.functional.cross_entropy"
        )
    if not isinstance(batches, int) or batches < 1:
        raise IPFXValueError(f"batches must be a positive integer, got {batches!r}")
