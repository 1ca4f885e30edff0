"""How a run uses its device: where the data lives, the forward pass's precision, the memory layout and
compilation (``ipfx compare --precision``, ``--compile``).

None of these changes *what* a run computes: the spec, the batches (drawn from the same CPU generator
on every device, see :meth:`Dataset.to <ipfx.experiments.data.Dataset.to>`), the pruning and the
budget stay the same; only float rounding differs (bf16 autocast rounds the inputs of convolutions and
matmuls to 8 bits of mantissa; weights, gradients and the optimizer stay float32).

On CUDA the default is the fast engine: the uint8 training images held on the GPU and augmented there
(only the batch's indices, crop offsets and flips travel, pinned and asynchronous), bf16 autocast where
the GPU has it, channels_last inputs (convolutions then run NHWC: cuDNN's fast layout for reduced
precision), ``cudnn.benchmark``, and no host synchronisation in a training step (the running loss is
summed on the device and read at epoch ends and for the progress bar). On CPU the default engine is
the plain one the tests exercise: fp32, data on the host, no compilation. Every option can be asked for
on either device, so the CUDA engine's pieces are tested on CPU too.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from ..errors import IPFXValueError

PRECISIONS = ("auto", "fp32", "bf16")


@dataclasses.dataclass(frozen=True)
class Engine:
    """The execution options of a run (recorded with it; not part of its identity in the result store)."""

    data_on_device: bool = False
    precision: str = "fp32"  # "fp32", or "bf16": autocast of the forward pass and the loss
    channels_last: bool = False  # 4-d inputs in NHWC, so convolutions run channels-last
    compile: str | None = None  # a torch.compile backend ("inductor", "aot_eager", ...), None = eager
    cudnn_benchmark: bool = False

    @classmethod
    def for_device(cls, device, precision: str = "auto", compile: str | None = None) -> "Engine":
        """The default engine for ``device`` (fast on CUDA, plain elsewhere), with ``precision``
        (``auto``: bf16 on a CUDA device that supports it, else fp32) and ``compile`` as asked."""
        device = torch.device(device)
        if precision not in PRECISIONS:
            raise IPFXValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        cuda = device.type == "cuda"
        if precision == "auto":
            precision = "bf16" if cuda and _native_bf16(device) else "fp32"
        elif precision == "bf16" and cuda and not _native_bf16(device):
            raise IPFXValueError(f"this GPU ({torch.cuda.get_device_name(device)}) has no native bfloat16 "
                                 "(compute capability 8.0 or newer); use --precision fp32")
        return cls(data_on_device=cuda, precision=precision, channels_last=cuda, compile=compile,
                   cudnn_benchmark=cuda)

    def setup(self, device: torch.device) -> None:
        """Process-wide settings, before the first step. ``cudnn.benchmark`` picks convolution algorithms
        by timing, so CUDA runs are not bitwise repeatable (and it stays on for the process)."""
        if self.cudnn_benchmark and device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def wrap(self, net: torch.nn.Module) -> torch.nn.Module:
        """What the training steps call: ``net`` itself, or compiled (evaluation and checkpoints keep using
        the uncompiled module, which shares every parameter and buffer with the compiled one; masks that
        the pruning schedules change in place are inputs of the compiled graph, not constants)."""
        if self.compile is None:
            return net
        return torch.compile(net, backend=self.compile)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self, device: torch.device):
        """The context of a training forward pass and its loss."""
        if self.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def record(self) -> dict:
        return dataclasses.asdict(self)


def _native_bf16(device: torch.device) -> bool:
    """The GPU ``device`` computes in bfloat16 natively (Ampere and newer), not only by emulation."""
    if not torch.cuda.is_available():
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without making the host wait: from pinned memory, asynchronously, on CUDA."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class LossMeter:
    """The running sum of step losses, kept as a float64 tensor on the device, so that a step never waits
    for the host; read (one synchronisation) at epoch ends and for the progress bar.

    In one process the sum is the float64 sum of the float32 step losses in step order, as it was when
    every step read its loss on the host. Under torchrun each rank sums its own shard losses;
    :meth:`read` (collective: every rank calls it) averages the sums over the ranks, since the mean of
    the shard losses is the global batch's loss.
    """

    def __init__(self, start: float, device: torch.device, ranks: int = 1):
        self.start, self.ranks = start, ranks
        dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
        self.sum = torch.full((), start if ranks == 1 else 0.0, dtype=dtype, device=device)

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss.detach().to(self.sum.dtype)

    def read(self) -> float:
        """The sum of the global step losses so far."""
        if self.ranks == 1:
            return float(self.sum)
        from . import parallel

        return self.start + parallel.sum_tensor(self.sum) / self.ranks

    def peek(self) -> float:
        """This rank's view, without communicating (for a progress bar shown on one rank)."""
        return float(self.sum) if self.ranks == 1 else self.start + float(self.sum)
