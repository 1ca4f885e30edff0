"""How many coefficients each tensor keeps, and which: scores -> boolean keep-masks.

Scopes:

* ``"global"``: one ranking over every prunable coefficient; the ``k = round((1 - s) N)`` best are kept.
* ``"layerwise"``: every tensor keeps ``round((1 - s) n_l)`` of its own best (uniform density).
* ``"erk"``: Erdos-Renyi-Kernel densities (Evci et al. 2020): ``density_l = min(1, eps * sum(shape_l) /
  prod(shape_l))`` with ``eps`` solved so that the kept total is ``k``; tensors that would exceed density 1
  are made dense and ``eps`` solved again for the rest.

Scores are "higher is kept". A score of ``-inf`` marks a coefficient that is already masked: it is
never kept again. Unless ``allow_empty``, every tensor keeps at least one coefficient (its best); the
global total stays exact by giving up the lowest-scored kept coefficients of tensors that keep several.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import IPFXValueError

SCOPES = ("global", "layerwise", "erk")


def kept_total(sizes: Sequence[int], sparsity: float) -> int:
    return int(round((1.0 - sparsity) * sum(sizes)))


def erk_counts(shapes: Sequence[Sequence[int]], sizes: Sequence[int], k: int) -> list[int]:
    """Per-tensor kept counts with ERK densities summing exactly to ``k``."""
    raw = [sum(shape) / math.prod(shape) for shape in shapes]
    dense: set[int] = set()
    while True:
        budget = k - sum(sizes[i] for i in dense)
        denom = sum(raw[i] * sizes[i] for i in range(len(sizes)) if i not in dense)
        eps = budget / denom if denom > 0 else 0.0
        over = [i for i in range(len(sizes)) if i not in dense and eps * raw[i] > 1.0]
        if not over:
            break
        dense.add(max(over, key=lambda i: raw[i]))
    exact = [float(sizes[i]) if i in dense else eps * raw[i] * sizes[i] for i in range(len(sizes))]
    return _round_to_total(exact, sizes, k)


def uniform_counts(sizes: Sequence[int], k: int) -> list[int]:
    total = sum(sizes)
    return _round_to_total([k * n / total for n in sizes], sizes, k)


def _round_to_total(exact: Sequence[float], sizes: Sequence[int], k: int) -> list[int]:
    """Round each count down, then hand the remainder to the largest fractional parts (<= 1 off each)."""
    counts = [min(int(math.floor(e)), n) for e, n in zip(exact, sizes)]
    order = sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)
    missing = k - sum(counts)
    for i in order:
        if missing <= 0:
            break
        if counts[i] < sizes[i]:
            counts[i] += 1
            missing -= 1
    return counts


def select(
    scores: Sequence[torch.Tensor],
    sparsity: float,
    *,
    scope: str = "global",
    shapes: Sequence[Sequence[int]] | None = None,
    dense: Sequence[bool] = (),
    allow_empty: bool = False,
) -> list[torch.Tensor]:
    """Boolean keep-masks, one per score tensor, meeting ``sparsity`` over all tensors.

    ``dense[i]`` keeps tensor ``i`` whole (first/last layer); the others share the remaining budget.
    """
    if scope not in SCOPES:
        raise IPFXValueError(f"unknown scope {scope!r}; use one of {', '.join(map(repr, SCOPES))}")
    sizes = [s.numel() for s in scores]
    dense = list(dense) or [False] * len(scores)
    k = kept_total(sizes, sparsity)
    available = [int(torch.isfinite(s).sum()) for s in scores]
    if k > sum(available):
        raise IPFXValueError(
            f"the model is already pruned to sparsity {1 - sum(available) / sum(sizes):.4f}, above the requested "
            f"{sparsity:.4f}; pruning only removes coefficients (use a higher sparsity)"
        )
    free = [i for i in range(len(scores)) if not dense[i]]
    k_free = k - sum(available[i] for i in range(len(scores)) if dense[i])
    if k_free < 0:
        raise IPFXValueError(
            f"sparsity {sparsity} cannot be reached while keeping {sum(dense)} layer(s) dense; "
            "lower the sparsity or prune every layer"
        )
    if not allow_empty and k_free < len(free):
        raise IPFXValueError(
            f"sparsity {sparsity} keeps {k_free} coefficient(s) for {len(free)} tensors, but every tensor keeps at "
            "least one; lower the sparsity, or pass allow_empty=True to let tensors be pruned away"
        )
    keep = [torch.isfinite(s) if dense[i] else torch.zeros_like(s, dtype=torch.bool) for i, s in enumerate(scores)]
    if not free:
        return keep
    if scope == "global":
        chosen = _global_topk([scores[i] for i in free], k_free, allow_empty)
    else:
        free_sizes = [sizes[i] for i in free]
        if scope == "layerwise":
            counts = uniform_counts(free_sizes, k_free)
        else:
            counts = erk_counts([shapes[i] for i in free], free_sizes, k_free)
        counts = [min(c, available[i]) for c, i in zip(counts, free)]
        if not allow_empty:
            counts = [max(c, 1) if available[i] else 0 for c, i in zip(counts, free)]
        chosen = [topk_mask(scores[i], c) for c, i in zip(counts, free)]
    for i, mask in zip(free, chosen):
        keep[i] = mask
    return keep


def topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` highest entries of ``score`` (an exact count, ties broken by topk)."""
    flat = score.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.reshape(score.shape)


def _global_topk(scores: Sequence[torch.Tensor], k: int, allow_empty: bool) -> list[torch.Tensor]:
    flat = torch.cat([s.reshape(-1).double() for s in scores])
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    bounds = [0]
    for s in scores:
        bounds.append(bounds[-1] + s.numel())
    if not allow_empty:
        _keep_one_per_tensor(flat, mask, bounds)
    return [mask[a:b].reshape(s.shape) for a, b, s in zip(bounds, bounds[1:], scores)]


def _keep_one_per_tensor(flat: torch.Tensor, mask: torch.Tensor, bounds: list[int]) -> None:
    """Give every empty tensor its best coefficient; take as many of the worst from tensors keeping >1."""
    for a, b in zip(bounds, bounds[1:]):
        if mask[a:b].any() or not torch.isfinite(flat[a:b]).any():
            continue
        mask[a + int(torch.argmax(flat[a:b]))] = True
        counts = torch.tensor([int(mask[x:y].sum()) for x, y in zip(bounds, bounds[1:])])
        removable = mask.clone()
        for (x, y), c in zip(zip(bounds, bounds[1:]), counts):
            if c <= 1:
                removable[x:y] = False
        candidates = torch.where(removable, flat, torch.full_like(flat, math.inf))
        mask[int(torch.argmin(candidates))] = False
