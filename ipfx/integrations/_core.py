"""What both trainer callbacks share: transform, prune at init, build and step a schedule, lower.

Framework-free (torch and ipfx only): the Lightning and Hugging Face callbacks call into :class:`Plan`
from their own hooks.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from .. import api
from ..config import SPACES
from ..errors import IPFXTypeError, IPFXValueError
from ..pruning import GMP, IMP, METHODS, SET, RigL, Schedule
from ..pruning import prune as one_shot_prune
from ..form.reparam import is_transformed

SCHEDULES: dict[str, type[Schedule]] = {"gmp": GMP, "imp": IMP, "rigl": RigL, "set": SET}
LOWER_TARGETS = (None, "dense", "fused")


class Plan:
    """The checked options of a callback and the state it builds during training."""

    def __init__(
        self,
        *,
        owner: str,
        space: str,
        example_inputs: Any,
        example_kwargs: dict | None,
        transform_kwargs: dict | None,
        prune: str | None,
        sparsity: float | None,
        data: Iterable | None,
        loss_fn: Callable | None,
        prune_kwargs: dict | None,
        schedule: str | type[Schedule] | Callable | None,
        schedule_kwargs: dict | None,
        lower: str | None,
    ) -> None:
        self.owner = owner
        if space not in SPACES:
            raise IPFXValueError(f"{owner}: space must be 'ip' or 'sp', got {space!r}")
        if prune is not None and prune not in METHODS:
            raise IPFXValueError(f"{owner}: unknown prune method {prune!r}; use one of {', '.join(METHODS)} (or None)")
        if prune is not None and sparsity is None:
            raise IPFXValueError(f"{owner}: prune={prune!r} needs sparsity=<fraction of coefficients to mask>")
        if isinstance(schedule, str) and schedule.lower() not in SCHEDULES:
            raise IPFXValueError(f"{owner}: unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}, "
                                 "an ipfx.pruning.Schedule subclass, or a callable (model, optimizer) -> Schedule")
        if schedule is not None and not isinstance(schedule, str) and not callable(schedule):
            raise IPFXTypeError(f"{owner}: schedule must be a name, a Schedule class or a callable, "
                                f"got {type(schedule).__name__}")
        if lower not in LOWER_TARGETS:
            raise IPFXValueError(f"{owner}: lower must be None, 'dense' or 'fused', got {lower!r}")
        for name, value in (("example_kwargs", example_kwargs), ("transform_kwargs", transform_kwargs),
                            ("prune_kwargs", prune_kwargs), ("schedule_kwargs", schedule_kwargs)):
            if value is not None and not isinstance(value, dict):
                raise IPFXTypeError(f"{owner}: {name} must be a dict, got {type(value).__name__}")
        self.space = space
        self.example_inputs = example_inputs
        self.example_kwargs = example_kwargs
        self.transform_kwargs = dict(transform_kwargs or {})
        self.prune = prune
        self.sparsity = sparsity
        self.data = data
        self.loss_fn = loss_fn
        self.prune_kwargs = dict(prune_kwargs or {})
        self.schedule_spec = schedule
        self.schedule_kwargs = dict(schedule_kwargs or {})
        self.lower_target = lower
        self.schedule: Schedule | None = None
        self.prune_report = None
        self.current_sparsity: float | None = None

    # -- steps --------------------------------------------------------------------------------------
    def transform(self, model: nn.Module, example_inputs: Any = None) -> nn.Module:
        """``ipfx.transform`` the model, or return it as it is when it is already in coefficient form."""
        if is_transformed(model):
            return model
        inputs = self.example_inputs if self.example_inputs is not None else example_inputs
        return api.transform(model, space=self.space, example_inputs=inputs, example_kwargs=self.example_kwargs,
                             **self.transform_kwargs)

    def prune_at_init(self, model: nn.Module, data: Iterable | None = None) -> None:
        if self.prune is not None:
            self.prune_report = one_shot_prune(model, self.prune, self.sparsity,
                                               data=self.data if self.data is not None else data,
                                               loss_fn=self.loss_fn, **self.prune_kwargs)
        self.refresh()

    def build_schedule(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, total_steps: int | None,
                       data: Iterable | None = None) -> None:
        spec = self.schedule_spec
        if spec is None:
            return
        if isinstance(spec, str) or (isinstance(spec, type) and issubclass(spec, Schedule)):
            cls = SCHEDULES[spec.lower()] if isinstance(spec, str) else spec
            self.schedule = cls(model, **self._schedule_arguments(cls, optimizer, total_steps, data))
        else:
            self.schedule = spec(model, optimizer)
            if not isinstance(self.schedule, Schedule):
                raise IPFXTypeError(f"{self.owner}: the schedule factory returned {type(self.schedule).__name__}, "
                                    "not an ipfx.pruning.Schedule")
        self.refresh()

    def _schedule_arguments(self, cls, optimizer, total_steps, data) -> dict[str, Any]:
        params = inspect.signature(cls.__init__).parameters
        kwargs = dict(self.schedule_kwargs)
        first = "final_sparsity" if "final_sparsity" in params else "sparsity"
        if first in params and first not in kwargs:
            if self.sparsity is None:
                raise IPFXValueError(f"{self.owner}: schedule {cls.__name__} needs a sparsity: pass sparsity=... "
                                     f"or schedule_kwargs={{'{first}': ...}}")
            kwargs[first] = self.sparsity
        if "optimizer" in params and "optimizer" not in kwargs:
            kwargs["optimizer"] = optimizer
        # defaults from the run's length: masks change until 75% of training (GMP's last pruning step, RigL's
        # and SET's last update), about ten times on the way, so the network trains after each change
        if cls is GMP:
            kwargs.setdefault("start_step", 0)
        if "end_step" in params and "end_step" not in kwargs:
            kwargs["end_step"] = self._total(total_steps, cls, 0.75)
        if "frequency" in params and "frequency" not in kwargs and "end_step" in kwargs:
            kwargs["frequency"] = max(1, (kwargs["end_step"] - kwargs.get("start_step", 0)) // 10)
        if "frequency" in kwargs and "end_step" in kwargs:
            self._warn_if_late(cls, kwargs, total_steps)
        if cls is RigL:
            if "data" not in kwargs:
                kwargs["data"] = self.data if self.data is not None else data
            kwargs.setdefault("loss_fn", self.loss_fn)
        return kwargs

    def _warn_if_late(self, cls, kwargs: dict, total_steps: int | None) -> None:
        """A schedule whose masks change only at its last step, or at the run's very end, trains nothing after
        pruning: say so (the user's own numbers, or a run too short for them)."""
        start, end, every = kwargs.get("start_step", 0), kwargs["end_step"], kwargs["frequency"]
        if every >= end - start and end > start:
            warnings.warn(f"{self.owner}: {cls.__name__} with frequency {every} changes masks only at step {end} "
                          f"(start {start}, end {end}): there is one pruning step; pass a smaller frequency "
                          f"(schedule_kwargs={{'frequency': ...}}) for a gradual schedule", stacklevel=4)
        if total_steps and end >= total_steps:
            warnings.warn(f"{self.owner}: {cls.__name__} changes masks until step {end} of a {total_steps}-step run, "
                          "so nothing trains after its last change; end it earlier (schedule_kwargs={'end_step': "
                          f"{max(1, int(0.75 * total_steps))}}})", stacklevel=4)

    def _total(self, total_steps, cls, fraction: float) -> int:
        if total_steps is None or total_steps <= 0:
            raise IPFXValueError(f"{self.owner}: the trainer does not know its number of steps, so {cls.__name__} "
                                 "needs schedule_kwargs={'end_step': ...}")
        return max(1, int(round(fraction * total_steps)))

    def step_to(self, global_step: int) -> bool:
        """Step the schedule once per optimizer step taken since the last call (robust to accumulation)."""
        changed = False
        if self.schedule is not None:
            while self.schedule.t < global_step:
                changed |= self.schedule.step()
            if changed:
                self.refresh()
        return changed

    def refresh(self) -> None:
        self.current_sparsity = None

    def sparsity_of(self, model: nn.Module) -> float:
        """``ipfx.sparsity(model)``, recomputed only after a pruning decision."""
        if self.current_sparsity is None:
            self.current_sparsity = api.sparsity(model)
        return self.current_sparsity

    def lower(self, model: nn.Module) -> nn.Module | None:
        return api.lower(model, target=self.lower_target) if self.lower_target is not None else None


def check_optimizers_see_coefficients(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer], owner: str,
                                      hint: str) -> None:
    """Every trainable coefficient (and basis) of ``model`` must be in some optimizer's param groups."""
    held = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    missing = [name for name, p in model.named_parameters()
               if p.requires_grad and (name.endswith(".coeff") or name.endswith(".basis")) and id(p) not in held]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise IPFXValueError(f"{owner}: the optimizer does not train the model's coefficients ({shown}): it was "
                             f"built on the parameters of the model before ipfx transformed it. {hint}")
