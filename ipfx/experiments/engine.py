"""The experiment engine: one run = build, transform (SP or IP), prune, train, evaluate, record.

Used by ``ipfx compare`` and ``ipfx demo``, and usable from Python::

    from ipfx.experiments import RunSpec, run, load_dataset
    record = run(RunSpec(model="resnet20", data="cifar10", method="snip", sparsity=0.9, space="ip"),
                 load_dataset("cifar10", "/data/cifar10"))

SP and IP runs with the same seed start from the same initial weights (IP's coefficients express the
same filters in the DCT basis), see the same batches in the same order and get the same budget.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import sys
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import __version__
from ..api import sparsity as model_sparsity
from ..api import transform
from ..errors import IPFXValueError
from ..pruning import prune
from .data import Dataset
from .models import build_model

ONE_SHOT = ("random", "magnitude", "snip", "grasp", "synflow")
GRADUAL = ("gmp", "rigl", "set")
METHODS = (*ONE_SHOT, *GRADUAL)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything that determines one run (its identity in the result store)."""

    model: str = "resnet20"
    data: str = "cifar10"
    method: str = "snip"
    sparsity: float = 0.9
    space: str = "ip"
    seed: int = 0
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    train_subset: int | None = None
    width: int | None = None

    def key(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def validate(self) -> None:
        if self.method not in METHODS:
            raise IPFXValueError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.space not in ("ip", "sp"):
            raise IPFXValueError(f"unknown space {self.space!r}; use 'ip' or 'sp'")
        if not 0.0 <= self.sparsity < 1.0:
            raise IPFXValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.lr_schedule not in ("cosine", "constant", "step"):
            raise IPFXValueError(f"unknown lr schedule {self.lr_schedule!r}; use cosine, step or constant")


def run(
    spec: RunSpec,
    dataset: Dataset,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    command: str | None = None,
    keep_model: bool = False,
) -> dict:
    """Train one configuration and return its record (a JSON-serialisable dict)."""
    spec.validate()
    device = torch.device(device)
    started = time.time()
    data = dataset.subset(spec.train_subset)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, dataset.num_classes, dataset.in_channels, spec.width)
    model = transform(model, space=spec.space).to(device)
    generator = torch.Generator().manual_seed(spec.seed)
    steps_per_epoch = len(data.train_y) // spec.batch_size
    total_steps = max(1, steps_per_epoch * spec.epochs)
    if steps_per_epoch == 0:
        raise IPFXValueError(f"batch size {spec.batch_size} is larger than the training set ({len(data.train_y)})")

    schedule = _prune_at_start(spec, model, data, device, generator, total_steps)
    optimizer = _optimizer(spec, model)
    lr_at = _lr_schedule(spec, total_steps)
    bar = _progress(total_steps, f"{spec.method} {spec.space} s={spec.sparsity:g} seed={spec.seed}", progress)
    step, loss_sum, loss_count = 0, 0.0, 0
    model.train()
    for _ in range(spec.epochs):
        for x, y in data.train_batches(spec.batch_size, generator):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            step += 1
            loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{loss_sum / loss_count:.3f}")
    if bar is not None:
        bar.close()
    accuracy = evaluate(model, dataset, device)
    record = dataclasses.asdict(spec)
    record.update(
        accuracy=accuracy,
        final_train_loss=loss_sum / max(loss_count, 1),
        achieved_sparsity=model_sparsity(model),
        steps=step,
        seconds=round(time.time() - started, 2),
        dataset_name=dataset.name,
        train_images=len(data.train_y),
        versions=versions(),
        command=command or " ".join(sys.argv),
        device=str(device),
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    if keep_model:
        record["_model"] = model
    return record


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, device) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for x, y in dataset.test_batches():
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    model.train(was_training)
    return correct / len(dataset.test_y)


def versions() -> dict:
    import torchvision

    return {"ipfx": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _prune_at_start(spec, model, data, device, generator, total_steps):
    if spec.sparsity == 0:
        return None
    if spec.method in ONE_SHOT:
        batch = [(x.to(device), y.to(device)) for x, y in _first_batches(data, spec, 1)]
        prune(model, spec.method, spec.sparsity, data=batch, loss_fn=F.cross_entropy,
              example_inputs=batch[0][0], seed=spec.seed)
        return None
    from .. import pruning

    frequency = max(1, total_steps // 50)
    if spec.method == "gmp":  # Zhu & Gupta: prune from dense over the first 75% of training
        return pruning.GMP(model, spec.sparsity, start_step=0, end_step=int(0.75 * total_steps), frequency=frequency)
    loader = _Cycle(data, spec)
    if spec.method == "rigl":
        return pruning.RigL(model, spec.sparsity, end_step=int(0.75 * total_steps), data=loader,
                            loss_fn=F.cross_entropy, frequency=frequency)
    return pruning.SET(model, spec.sparsity, end_step=int(0.75 * total_steps), frequency=frequency, seed=spec.seed)


def _first_batches(data: Dataset, spec: RunSpec, n: int):
    g = torch.Generator().manual_seed(10_000 + spec.seed)
    batches = data.train_batches(spec.batch_size, g)
    return [next(batches) for _ in range(n)]


class _Cycle:
    """Endless batches for RigL's dense-gradient passes (its own generator: training order is unaffected)."""

    def __init__(self, data: Dataset, spec: RunSpec):
        self.data, self.spec = data, spec
        self.generator = torch.Generator().manual_seed(20_000 + spec.seed)

    def __iter__(self):
        while True:
            yield from self.data.train_batches(self.spec.batch_size, self.generator)


def _optimizer(spec: RunSpec, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum; weight decay on everything but the IP bases (a basis is a reparametrisation)."""
    basis = [p for n, p in model.named_parameters() if n.endswith(".basis")]
    ids = {id(p) for p in basis}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": rest, "weight_decay": spec.weight_decay}]
    if basis:
        groups.append({"params": basis, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum)


def _lr_schedule(spec: RunSpec, total_steps: int) -> Callable[[int], float]:
    if spec.lr_schedule == "cosine":
        return lambda t: 0.5 * spec.lr * (1 + math.cos(math.pi * t / total_steps))
    if spec.lr_schedule == "step":  # /10 at 50% and 75%
        return lambda t: spec.lr * (0.1 ** ((t >= total_steps // 2) + (t >= 3 * total_steps // 4)))
    return lambda t: spec.lr


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
