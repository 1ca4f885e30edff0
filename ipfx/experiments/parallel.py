"""Data-parallel runs: ``torchrun --nproc-per-node N -m ipfx compare ...``.

Every rank builds the same model from the same seed, draws the same global batch of ``B`` images
(same data order and augmentation as a one-process run) and trains on its contiguous shard of
``B / N`` of them; DistributedDataParallel averages the gradients, so a step equals the one-process
step on the whole batch up to float reduction order. Batch norm uses statistics of the whole global
batch (:class:`GlobalBatchNorm`, so that the forward pass too equals the one-process one), masks are
identical on every rank (:mod:`ipfx.pruning.distributed`: scores averaged, masks broadcast from rank
0), evaluation is split over the ranks with the correct counts summed, and only rank 0 writes
records, checkpoints, tables, plots and log lines.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn


def active() -> bool:
    """A process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def from_main(value):
    """Rank 0's ``value`` on every rank (any picklable object; ``value`` itself outside torchrun): the
    ranks of a data-parallel sweep train the same runs in the same order, so rank 0 decides for all."""
    if not active():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launched_world() -> int:
    """The number of processes torchrun started (1 when not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
    gloo for CPU, NCCL for CUDA. Returns the device of this rank (``cuda`` becomes ``cuda:LOCAL_RANK``).
    Nothing to do outside torchrun, or when a group is already up (a test harness)."""
    if launched_world() <= 1 or (dist.is_available() and dist.is_initialized()):
        return _local_device(device) if active() else device
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return _local_device(device)


def _local_device(device: str) -> str:
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if device == "cuda" else device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized() and launched_world() > 1:
        dist.destroy_process_group()


def shard(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous share of a global batch (its size is divisible by the world size)."""
    n = len(y) // world()
    r = rank()
    return x[r * n : (r + 1) * n], y[r * n : (r + 1) * n]


def sum_tensor(value: torch.Tensor) -> float:
    """The sum of a scalar over the ranks, as a number. ``value`` lives on this rank's device, so the
    same call works with gloo (CPU tensors) and NCCL (CUDA tensors)."""
    value = value.detach().clone()
    dist.all_reduce(value)
    return value.item()


def prepare(model: nn.Module, device: torch.device) -> nn.Module:
    """Batch norm over the global batch, then the DDP wrapper (train through it; save ``model``)."""
    group = dist.new_group()  # batch-norm reductions apart from DDP's gradient buckets
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
            module.__class__ = _global_class(type(module))
            module.sync_group = group
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


_CLASSES: dict[type, type] = {}


def _global_class(base: type) -> type:
    """A subclass of ``base`` (so isinstance checks and state-dict keys stay as they are) whose
    training forward uses the statistics of the global batch."""
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Global{base.__name__}", (GlobalBatchNorm, base), {})
    return _CLASSES[base]


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the global batch over all ranks (works on
    CPU with gloo, where ``torch.nn.SyncBatchNorm`` does not). Two passes, like one-process batch
    norm: the mean, then the mean squared deviation from it; both sums are all-reduced with autograd,
    so the backward pass is the global batch's too. Running statistics follow ``nn.BatchNorm``."""

    sync_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        local = x.numel() // x.shape[1]
        n = local * world()
        mean = _SumOverRanks.apply(x.sum(dims), self.sync_group) / n
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = x - mean.view(shape)
        var = _SumOverRanks.apply((centred * centred).sum(dims), self.sync_group) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / max(n - 1, 1)), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks; every rank's output depends on every rank's input, so
    the gradient is the sum over the ranks of the output gradients."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def evaluate(model: nn.Module, dataset, device) -> float:
    """Test accuracy with the test batches split over the ranks (every rank gets the same figure)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for i, (x, y) in enumerate(dataset.test_batches()):
            if i % world() == rank():
                correct += (model(x.to(device)).argmax(1) == y.to(device)).sum()
    model.train(was_training)
    return int(sum_tensor(correct)) / len(dataset.test_y)


__all__ = ["active", "rank", "world", "is_main", "barrier", "init_from_env", "shard", "prepare", "evaluate",
           "sum_tensor", "GlobalBatchNorm"]
