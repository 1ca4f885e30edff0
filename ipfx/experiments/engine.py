"""The experiment engine: one run = build, transform (SP or IP), prune, train, evaluate, record.

Used by ``ipfx compare`` and ``ipfx demo``, and usable from Python::

    from ipfx.experiments import RunSpec, run, load_dataset
    record = run(RunSpec(model="resnet20", data="cifar10", method="snip", sparsity=0.9, space="ip"),
                 load_dataset("cifar10", "/data/cifar10"))

SP and IP runs with the same seed start from the same initial weights (IP's coefficients express the
same filters in the DCT basis), see the same batches in the same order and get the same budget.

Budget: every method gets ``epochs * (training images // batch_size)`` optimizer steps. One-shot
methods prune before the first step, GMP/RigL/SET change masks during those steps, and IMP (the
lottery ticket with rewinding, :func:`imp_plan`) splits the same steps into its rounds, so its
prune-and-rewind rounds are paid for out of the budget rather than on top of it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import __version__
from ..api import sparsity as model_sparsity
from ..api import transform
from ..errors import IPFXValueError, first_line
from ..config import SPACES
from ..pruning import METHODS as ONE_SHOT
from ..pruning import prune
from . import accel
from . import checkpoint as ckpt
from . import parallel
from .accel import Engine
from .data import Dataset
from .models import build_model

GRADUAL = ("gmp", "rigl", "set")
ITERATIVE = ("imp",)
METHODS = (*ONE_SHOT, *GRADUAL, *ITERATIVE)
IMP_ROUNDS = 3  # prune-and-rewind rounds when a spec does not say
IMP_REWIND = 0.05  # rewind point, as a fraction of one training run (Frankle et al. 2020 rewind early)


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
    imp_rounds: int | None = None
    imp_rewind: float | None = None
    # the data's identity (Dataset.identity), filled from the dataset by run() and sweep(): a store's
    # record of the same settings on other data (another --data-root, a folder whose files changed) is
    # another run. Records written before it existed have none and are not taken for any data's.
    data_id: str | None = None

    def __post_init__(self) -> None:
        # Only IMP runs carry the IMP options (filled with the defaults when not given). For every other
        # method they are None: they do not change those runs, and a key without them equals the key of
        # a record written before they existed, so older result stores still resume.
        imp = self.method in ITERATIVE
        object.__setattr__(self, "imp_rounds", (self.imp_rounds or IMP_ROUNDS) if imp else None)
        object.__setattr__(self, "imp_rewind", (IMP_REWIND if self.imp_rewind is None else self.imp_rewind)
                           if imp else None)

    def key(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def validate(self) -> None:
        if self.method not in METHODS:
            raise IPFXValueError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.space not in SPACES:
            raise IPFXValueError(f"unknown space {self.space!r}; use 'ip' or 'sp'")
        if not 0.0 <= self.sparsity < 1.0:
            raise IPFXValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or not 0 <= self.seed < 2**63:
            raise IPFXValueError(f"seed must be an integer from 0 to 2**63 - 1 (torch's generators take 64 bits), "
                                 f"got {self.seed!r}")
        if self.lr_schedule not in ("cosine", "constant", "step"):
            raise IPFXValueError(f"unknown lr schedule {self.lr_schedule!r}; use cosine, step or constant")
        if self.method in ITERATIVE:
            if isinstance(self.imp_rounds, bool) or not isinstance(self.imp_rounds, int) or self.imp_rounds < 1:
                raise IPFXValueError(f"imp_rounds must be an integer >= 1, got {self.imp_rounds!r}")
            if not 0.0 <= self.imp_rewind < 1.0:
                raise IPFXValueError(f"imp_rewind must be in [0, 1) (a fraction of one training run), "
                                     f"got {self.imp_rewind!r}")


@dataclasses.dataclass(frozen=True)
class IMPPlan:
    """How an IMP run spends its budget (Frankle et al. 2020, "Linear Mode Connectivity and the Lottery
    Ticket Hypothesis", with the steps of every method's budget).

    One *training run* is ``rewind_step + round_steps`` steps, and the learning-rate schedule spans one
    run. The model trains ``rewind_step`` steps, is saved (the rewind point), and trains ``round_steps``
    more: that completes the first run. Each of ``rounds`` rounds then ends by pruning the
    coefficients of smallest magnitude (the same fraction of the remaining ones per round, so the
    requested sparsity is reached after the last round) and rewinding every other tensor and the
    learning-rate schedule to the rewind point (the optimizer's momentum is cleared); the ticket is
    then retrained for ``round_steps`` steps, as every round was. Total: ``rewind_step + (rounds + 1) * round_steps``
    steps, at most the budget (what rounding leaves, fewer than ``rounds + 2`` steps, is not trained).
    """

    rewind_step: int
    round_steps: int
    rounds: int

    @property
    def steps(self) -> int:
        return self.rewind_step + (self.rounds + 1) * self.round_steps

    @property
    def run_steps(self) -> int:
        """Length of one training run: the horizon of the learning-rate schedule (which
        :attr:`ipfx.pruning.IMP.run_position` rewinds with the model)."""
        return self.rewind_step + self.round_steps


def imp_plan(spec: RunSpec, steps_per_epoch: int) -> IMPPlan:
    """Split ``spec``'s budget (``epochs * steps_per_epoch`` steps) into IMP's rewind prefix and rounds.

    ``spec.imp_rewind`` is the rewind point as a fraction ``f`` of one training run
    (``rewind_step = f * (rewind_step + round_steps)``, 0 = the original lottery ticket, rewound to
    the initialisation); the ``imp_rounds + 1`` trainings of the ticket get equal length.
    """
    budget = spec.epochs * steps_per_epoch
    f, rounds = spec.imp_rewind, spec.imp_rounds
    round_steps = int(budget / (rounds + 1 + f / (1.0 - f)))
    if round_steps < 1:
        raise IPFXValueError(
            f"IMP with {rounds} rounds trains its ticket {rounds + 1} times, but the budget is only {budget} steps "
            f"({spec.epochs} epochs of {steps_per_epoch} steps); raise the epochs (--epochs) or lower the rounds "
            f"(--imp-rounds)"
        )
    return IMPPlan(rewind_step=int(f * round_steps / (1.0 - f)), round_steps=round_steps, rounds=rounds)


class StopRequested(Exception):
    """Raised by ``run(..., stop_after_epoch=k)`` after epoch ``k``'s checkpoint is written: a test's
    stand-in for a run killed at that point."""


def run(
    spec: RunSpec,
    dataset: Dataset,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    command: str | None = None,
    keep_model: bool = False,
    checkpoint: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
    stop_after_epoch: int | None = None,
    engine: Engine | None = None,
    resume: bool = True,
) -> dict:
    """Train one configuration and return its record (a JSON-serialisable dict).

    With ``checkpoint`` (a file path) the run saves its state there at every epoch end and, when the
    file already holds this run's state, resumes from it (saying so through ``log``); the caller
    removes the file once the record is safe (:func:`ipfx.experiments.checkpoint.remove`).
    ``stop_after_epoch`` is a test hook: raise :class:`StopRequested` after that epoch's checkpoint.
    ``engine``: how the run uses its device (:class:`~.accel.Engine`; default: the fast engine on CUDA,
    the plain one elsewhere). A checkpoint that does not fit the run (a field missing or out of range,
    tensors of other shapes) is reported and the run starts over; ``resume=False`` starts over always.
    """
    spec = for_data(spec, dataset)
    spec.validate()
    device = torch.device(device)
    engine = engine if engine is not None else Engine.for_device(device)
    engine.setup(device)
    started = time.time()
    data = dataset.subset(spec.train_subset)
    if engine.data_on_device:
        data = data.to(device)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, dataset.num_classes, dataset.in_channels, spec.width)
    model = transform(model, space=spec.space).to(device)
    generator = torch.Generator().manual_seed(spec.seed)
    ranks = parallel.world()  # > 1 under torchrun: each rank trains on its shard of every global batch
    if spec.batch_size % ranks:
        raise IPFXValueError(f"batch size {spec.batch_size} is not divisible by the {ranks} processes; "
                             f"use a multiple of {ranks}")
    if not parallel.is_main():
        progress, log = False, (lambda line: None)
    steps_per_epoch = len(data.train_y) // spec.batch_size
    if steps_per_epoch == 0:
        raise IPFXValueError(f"batch size {spec.batch_size} is larger than the training set ({len(data.train_y)})")
    plan = imp_plan(spec, steps_per_epoch) if spec.method in ITERATIVE and spec.sparsity > 0 else None
    steps = plan.steps if plan else steps_per_epoch * spec.epochs
    total_steps = max(1, steps)

    schedule = _prune_at_start(spec, model, data, device, generator, total_steps)
    optimizer = _optimizer(spec, model)
    if plan is not None:
        schedule = _imp(spec, model, plan, optimizer)
    lr_at = _lr_schedule(spec, plan.run_steps if plan else total_steps)
    path = Path(checkpoint) if checkpoint is not None else None
    at = _Position()
    saved = ckpt.load(path, spec.key()) if path is not None and resume else None
    if saved is not None:
        try:
            _restore(saved, model, optimizer, schedule, generator, at, steps, engine.precision)
        except Exception as exc:  # noqa: BLE001 - a checkpoint that does not fit this run: start over, never crash
            warnings.warn(f"checkpoint {path} does not fit this run ({first_line(exc, 200)}); the run starts over",
                          stacklevel=2)
            return run(spec, dataset, device=device, progress=progress, command=command, keep_model=keep_model,
                       checkpoint=checkpoint, log=log, stop_after_epoch=stop_after_epoch, engine=engine,
                       resume=False)  # set up afresh: the failed restore may have written into the model
        log(f"resuming {describe(spec)} from its checkpoint after epoch {at.epoch} (step {at.step} of {steps})")
    net = parallel.prepare(model, device) if ranks > 1 else model  # train through net; save model
    net = engine.wrap(net)
    losses = accel.LossMeter(at.loss_sum, device, ranks)
    bar = _progress(total_steps, f"{spec.method} {spec.space} s={spec.sparsity:g} seed={spec.seed}", progress)
    if bar is not None and at.step:
        bar.update(at.step)
    model.train()
    while at.step < steps:
        for x, y in data.train_batches(spec.batch_size, generator):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(schedule.run_position if plan else at.step)
            if ranks > 1:
                x, y = parallel.shard(x, y)
            x, y = engine.inputs(accel.to_device(x, device)), accel.to_device(y, device)
            with engine.autocast(device):
                loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            at.step += 1
            losses.add(loss)
            at.loss_count += 1
            if bar is not None:
                bar.update(1)
                if at.step % 20 == 0:
                    bar.set_postfix(loss=f"{losses.peek() / at.loss_count:.3f}")
            if at.step == steps:  # the budget ends here (inside an epoch only for IMP)
                break
        else:  # a whole epoch: the next one's order depends on `generator` alone, so save here
            at.epoch += 1
            at.loss_sum = losses.read()
            if path is not None and at.step < steps and parallel.is_main():
                at.seconds = saved_seconds(saved) + time.time() - started
                ckpt.save(path, _snapshot(spec, model, optimizer, schedule, generator, device, at,
                                          engine.precision))
            if stop_after_epoch is not None and at.epoch >= stop_after_epoch:
                if bar is not None:
                    bar.close()
                raise StopRequested(f"stopped after epoch {at.epoch} (stop_after_epoch={stop_after_epoch})")
    if bar is not None:
        bar.close()
    at.loss_sum = losses.read()
    accuracy = parallel.evaluate(model, data, device) if ranks > 1 else evaluate(model, data, device)
    record = dataclasses.asdict(spec)
    record.update(
        accuracy=accuracy,
        final_train_loss=at.loss_sum / max(at.loss_count, 1),
        achieved_sparsity=model_sparsity(model),
        steps=at.step,
        budget_steps=steps_per_epoch * spec.epochs,
        seconds=round(saved_seconds(saved) + time.time() - started, 2),
        dataset_name=dataset.name,
        train_images=len(data.train_y),
        versions=versions(),
        command=command or " ".join(sys.argv),
        device=str(device),
        engine=engine.record(),
        processes=ranks,
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    if saved is not None:
        record["resumed_from_epoch"] = int(saved["epoch"])
    if plan is not None:
        record.update(imp_rewind_step=plan.rewind_step, imp_round_steps=plan.round_steps)
    if keep_model:
        record["_model"] = model
    return record


def for_data(spec: RunSpec, dataset: Dataset) -> RunSpec:
    """``spec`` with ``dataset``'s identity (:attr:`RunSpec.data_id`); a spec made for other data is refused."""
    if spec.data_id is None:
        return dataclasses.replace(spec, data_id=dataset.identity)
    if spec.data_id != dataset.identity:
        raise IPFXValueError(f"this run was specified for data {spec.data_id}, but the dataset given is "
                             f"{dataset.identity} ({dataset.name}); pass the data it was made for, or data_id=None")
    return spec


def describe(spec: RunSpec) -> str:
    """One run in a few words, for log lines."""
    return f"run {spec.method} {spec.space} sparsity {spec.sparsity:g} seed {spec.seed}"


@dataclasses.dataclass
class _Position:
    """Where a run is: what a checkpoint stores besides tensors (the step fixes the learning rate)."""

    step: int = 0
    epoch: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    seconds: float = 0.0


def saved_seconds(saved: dict | None) -> float:
    """Training time spent before the resume, so that a record's ``seconds`` is the whole run's."""
    return float(saved["seconds"]) if saved is not None else 0.0


def _snapshot(spec, model, optimizer, schedule, generator, device, at: _Position, precision: str) -> dict:
    """The state of a run at an epoch end, as tensors and plain values (``torch.load(weights_only=True)``)."""
    return {
        "key": list(spec.key()),
        **dataclasses.asdict(at),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": None if schedule is None else schedule.state_dict(),
        "data_order": generator.get_state(),
        "rng": ckpt.rng_state(device),
        "precision": precision,  # the forward's (accel.Engine): a resume must compute as the first part did
    }


def _restore(saved, model, optimizer, schedule, generator, at: _Position, steps: int, precision: str) -> None:
    """Load a checkpoint into a run set up as from scratch.

    The setup (model, one-shot pruning, schedule) is redone first, so that every object exists, then
    every state is overwritten by the saved one. Raises on a checkpoint that does not fit (the caller
    starts over).
    """
    for field in dataclasses.fields(at):
        value = saved[field.name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{field.name} is {value!r}")
    if not saved["step"] < steps or not isinstance(saved["step"], int) or not isinstance(saved["epoch"], int):
        raise ValueError(f"step {saved['step']!r} of {steps}, epoch {saved['epoch']!r}")
    if saved.get("precision", precision) != precision:  # (a record names one precision: its whole run's)
        raise ValueError(f"it was trained in {saved['precision']!r} precision, this run computes in {precision!r}")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    for group in optimizer.param_groups:  # torch loads any shape here, and fails at the first step, past the restart
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(f"the optimizer's {name} has shape {tuple(value.shape)} for a parameter of "
                                     f"{tuple(param.shape)}")
    if (saved["schedule"] is None) != (schedule is None):
        raise ValueError("the checkpoint's pruning schedule does not match the run's")
    if schedule is not None:
        schedule.load_state_dict(saved["schedule"])
    generator.set_state(saved["data_order"])
    ckpt.set_rng_state(saved["rng"])
    for field in dataclasses.fields(at):
        setattr(at, field.name, type(getattr(at, field.name))(saved[field.name]))


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, device) -> float:
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in dataset.test_batches():
        correct += (model(x.to(device)).argmax(1) == y.to(device)).sum()
    model.train(was_training)
    return int(correct) / len(dataset.test_y)


def versions() -> dict:
    import torchvision

    return {"ipfx": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _imp(spec: RunSpec, model: nn.Module, plan: IMPPlan, optimizer: torch.optim.Optimizer):
    """The IMP schedule of ``plan``, with the per-round fraction that reaches ``spec.sparsity`` after the
    last round; it saves the rewind point, prunes, rewinds and says where the learning rate stands."""
    from .. import pruning

    fraction = 1.0 - (1.0 - spec.sparsity) ** (1.0 / plan.rounds)
    return pruning.IMP(model, rounds=plan.rounds, steps_per_round=plan.round_steps, fraction=fraction,
                       rewind_step=plan.rewind_step, optimizer=optimizer)


def _prune_at_start(spec, model, data, device, generator, total_steps):
    if spec.sparsity == 0 or spec.method in ITERATIVE:  # IMP starts dense and prunes at its rounds' ends
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

    # disable=None: bars on a terminal only (a log file got thousands of carriage-returned updates)
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)
