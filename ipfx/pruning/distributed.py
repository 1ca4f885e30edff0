"""torch.distributed glue: identical pruning decisions on every rank.

Data-driven scores and regrowth gradients are averaged over ranks (``all_reduce``), so every rank
decides from all the data; the masks are then broadcast from rank 0, so ranks agree bit for bit even
where float reductions or ties could make local decisions differ.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    if world_size() == 1:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world_size())


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    if world_size() == 1:
        return
    for t in tensors:
        dist.broadcast(t, src=src)
