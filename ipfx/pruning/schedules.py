"""Pruning schedules stepped during training: IMP (lottery ticket with rewinding), GMP, RigL and SET.

Usage, the same for every schedule and for both spaces (SP and IP differ only by the basis; nothing
here looks at the space)::

    schedule = ipfx.pruning.GMP(model, 0.9, start_step=1000, end_step=20000)
    for inputs, labels in loader:
        loss_fn(model(inputs), labels).backward()
        optimizer.step(); optimizer.zero_grad()
        schedule.step()                      # True when it changed the masks

Step counting: ``schedule.t`` is the number of ``step()`` calls so far, i.e. the number of optimizer
steps taken. ``step()`` first increments ``t`` and then does what the schedule prescribes at ``t``.
Something a formula prescribes at ``t = 0`` happens at construction.

Scores are computed on ``coeff`` (magnitude: ``|coeff_j| * ||F_j||``, see :mod:`.scores`) and masks are
written through :func:`.oneshot.apply_masks`, which zeroes removed coefficients and, under
``torch.distributed``, broadcasts rank 0's masks so every rank holds identical masks after every
decision. Gradient-based regrowth (RigL) all-reduces (averages) its dense gradients over ranks first.

Checkpointing: ``state_dict()`` holds the step counter and whatever else the schedule needs (random
generator state, IMP's rewind checkpoint, RigL's position in its data). Restoring the model's, the
optimizer's and the schedule's state dicts into fresh objects and continuing gives the same masks as
an uninterrupted run. A schedule may be built before or after the fresh model's state is loaded.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from ..errors import IPFXValueError
from . import allocation, distributed, scores
from .allocation import topk_mask
from .oneshot import apply_masks, exclude_masked
from .targets import Target, targets as find_targets

__all__ = ["Schedule", "GMP", "IMP", "RigL", "SET"]


class Schedule:
    """Base of the pruning schedules: a step counter, masks written through ``apply_masks``.

    Subclasses implement :meth:`_on_step` (what happens at step ``t``) and extend
    :meth:`_extra_state` / :meth:`_load_extra_state` with what a resumed run needs.

    Attributes:
        model: the model passed in (possibly wrapped, e.g. in ``DistributedDataParallel``).
        targets: its prunable coefficient tensors (:class:`~.targets.Target`).
        t: number of :meth:`step` calls so far.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.targets: list[Target] = find_targets(model, type(self).__name__)
        self.t = 0

    # -- public -------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Advance one training step (call once after each ``optimizer.step()``).

        Returns True when the masks were changed at this step.
        """
        self.t += 1
        return bool(self._on_step())

    @property
    def sparsity(self) -> float:
        """Fraction of masked coefficients over all prunable tensors, now."""
        total = sum(t.numel for t in self.targets)
        return 1.0 - sum(t.kept() for t in self.targets) / total

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs besides the model's and the optimizer's state."""
        return {"schedule": type(self).__name__, "t": self.t, **self._extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (load the model's own state dict separately)."""
        kind = state.get("schedule")
        if kind != type(self).__name__:
            raise IPFXValueError(
                f"this state dict belongs to a {kind} schedule, not to {type(self).__name__}; "
                "load it into the same kind of schedule that saved it"
            )
        self.t = int(state["t"])
        self._load_extra_state(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t={self.t}, sparsity={self.sparsity:.4f})"

    # -- for subclasses -----------------------------------------------------------------------------
    def _on_step(self) -> bool:
        raise NotImplementedError

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    @property
    def _net(self) -> nn.Module:
        """The model without DDP/DataParallel wrappers (their forward must not be run outside training)."""
        return _unwrap(self.model)

    def _shapes(self) -> list[tuple[int, ...]]:
        return [t.module.weight_shape for t in self.targets]

    def _masked_magnitudes(self) -> list[torch.Tensor]:
        """``|coeff| * ||basis row||``, ``-inf`` where already masked."""
        values = scores.magnitude_scores(scores.ScoreContext(self.model, self.targets))
        return exclude_masked(values, self.targets)


# ---------------------------------------------------------------------------------------------------
# GMP
# ---------------------------------------------------------------------------------------------------
class GMP(Schedule):
    """Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune").

    The sparsity follows the cubic schedule

        s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_end - t_0))^3        for t_0 <= t <= t_end

    (``s_i = initial_sparsity``, ``s_f = final_sparsity``, ``t_0 = start_step``, ``t_end = end_step``),
    applied at ``t = t_0, t_0 + frequency, t_0 + 2 frequency, ...`` and at ``t_end``. At each of these
    steps the coefficients of smallest magnitude ``|coeff_j| * ||F_j||`` are masked until exactly
    ``round((1 - s_t) N)`` of the ``N`` prunable coefficients are kept (over all tensors with
    ``scope="global"``; ``"layerwise"``/``"erk"`` allocate per tensor). Masked coefficients stay
    masked; between pruning steps and after ``t_end`` the masks do not change. ``start_step=0`` prunes
    to ``initial_sparsity`` at construction.

    Args:
        model: a model returned by :func:`ipfx.transform` (or one containing it, e.g. DDP-wrapped).
        final_sparsity: ``s_f`` in ``[0, 1)``.
        start_step, end_step: ``t_0 < t_end``.
        frequency: steps between pruning steps (``Delta t`` in the paper).
        initial_sparsity: ``s_i`` in ``[0, s_f]``.
        scope: ``"global"``, ``"layerwise"`` or ``"erk"``.
        allow_empty: let a tensor lose every coefficient (by default each keeps at least one).
    """

    def __init__(
        self,
        model: nn.Module,
        final_sparsity: float,
        *,
        start_step: int,
        end_step: int,
        frequency: int = 100,
        initial_sparsity: float = 0.0,
        scope: str = "global",
        allow_empty: bool = False,
    ) -> None:
        _check_sparsity("final_sparsity", final_sparsity)
        _check_sparsity("initial_sparsity", initial_sparsity)
        if initial_sparsity > final_sparsity:
            raise IPFXValueError(
                f"GMP only prunes: initial_sparsity ({initial_sparsity}) must not exceed "
                f"final_sparsity ({final_sparsity})"
            )
        _check_int("start_step", start_step, minimum=0)
        _check_int("end_step", end_step, minimum=0)
        if end_step <= start_step:
            raise IPFXValueError(
                f"end_step ({end_step}) must be larger than start_step ({start_step}): GMP prunes between them"
            )
        _check_int("frequency", frequency, minimum=1)
        _check_scope(scope)
        super().__init__(model)
        self.final_sparsity = float(final_sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.start_step = int(start_step)
        self.end_step = int(end_step)
        self.frequency = int(frequency)
        self.scope = scope
        self.allow_empty = bool(allow_empty)
        if self.start_step == 0:
            self._prune_to(self.target_sparsity(0))

    def target_sparsity(self, t: int) -> float:
        """``s_t`` of the cubic schedule (``s_i`` before ``t_0``, ``s_f`` after ``t_end``)."""
        t = min(max(t, self.start_step), self.end_step)
        progress = (t - self.start_step) / (self.end_step - self.start_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** 3

    def is_pruning_step(self, t: int) -> bool:
        """Whether the masks are updated at step ``t``."""
        return self.start_step <= t <= self.end_step and (
            (t - self.start_step) % self.frequency == 0 or t == self.end_step
        )

    def _on_step(self) -> bool:
        if not self.is_pruning_step(self.t):
            return False
        return self._prune_to(self.target_sparsity(self.t))

    def _prune_to(self, sparsity: float) -> bool:
        sizes = [t.numel for t in self.targets]
        if sum(t.kept() for t in self.targets) <= allocation.kept_total(sizes, sparsity):
            return False  # already at least as sparse (e.g. pruned before, or a resumed model)
        keep = allocation.select(self._masked_magnitudes(), sparsity, scope=self.scope, shapes=self._shapes(),
                                 allow_empty=self.allow_empty)
        apply_masks(self.targets, keep)
        return True


# ---------------------------------------------------------------------------------------------------
# IMP
# ---------------------------------------------------------------------------------------------------
class IMP(Schedule):
    """Iterative magnitude pruning with rewinding: the lottery ticket procedure.

    Frankle & Carbin 2019 ("The Lottery Ticket Hypothesis") rewind to the initial weights; Frankle et
    al. 2020 ("Linear Mode Connectivity and the Lottery Ticket Hypothesis") rewind to an early
    training step ``k`` (``rewind_step``). Here:

    * at ``t == rewind_step`` (``k``) every parameter and buffer of the model except the masks is saved:
      the coefficients, and, in IP, the basis, and batch-norm parameters/statistics and biases
      (``k = 0``: at construction, the original lottery ticket);
    * one *training run* is ``k + steps_per_round`` steps; the first ends at ``t = k + steps_per_round``
      and round ``r`` (``r = 1..rounds``) ends at ``t = k + r * steps_per_round``, so that every
      retraining from the rewind point is as long as the first run after it. At the end of round ``r``
      a fraction ``fraction`` of the remaining coefficients is pruned by magnitude
      ``|coeff_j| * ||F_j||``, so that ``round(d_0 (1 - fraction)^r N)`` coefficients are kept
      (``d_0``: the density at construction), and then every saved tensor is restored (rewound);
      pruned coefficients stay zero. If an ``optimizer`` is given its state (momentum, Adam moments)
      is cleared, as training restarts from the checkpoint.

    After the last round the masks no longer change; keep training the rewound ticket. Learning-rate
    schedules are not rewound here: index yours by :attr:`run_position` (the step of the training run
    that step ``t`` replays) and every round replays it from the rewind point.

    Args:
        rounds: number of prune-and-rewind rounds (``>= 1``).
        steps_per_round: training steps of each round, from the rewind point to the next prune.
        fraction: fraction of the remaining coefficients pruned per round, in ``(0, 1)``.
        rewind_step: the step whose values are restored after each round.
        scope: ``"global"`` (as in the papers), ``"layerwise"`` or ``"erk"``.
        optimizer: optional; its state is cleared at every rewind.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        rounds: int,
        steps_per_round: int,
        fraction: float = 0.2,
        rewind_step: int = 0,
        scope: str = "global",
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        _check_int("rounds", rounds, minimum=1)
        _check_int("steps_per_round", steps_per_round, minimum=1)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
            raise IPFXValueError(
                f"fraction must be a number in (0, 1) (the share of remaining coefficients pruned per round), "
                f"got {fraction!r}"
            )
        _check_int("rewind_step", rewind_step, minimum=0)
        _check_scope(scope)
        super().__init__(model)
        self.rounds = int(rounds)
        self.steps_per_round = int(steps_per_round)
        self.fraction = float(fraction)
        self.rewind_step = int(rewind_step)
        self.scope = scope
        self.optimizer = optimizer
        self.initial_density = 1.0 - self.sparsity
        self.checkpoint: dict[str, torch.Tensor] | None = None
        if self.rewind_step == 0:
            self._save()

    @property
    def rounds_done(self) -> int:
        """Completed rounds."""
        return min(max(self.t - self.rewind_step, 0) // self.steps_per_round, self.rounds)

    @property
    def run_position(self) -> int:
        """The step of one training run that the model stands at now: ``t`` before the rewind point,
        then ``k + (t - k) mod steps_per_round``: a rewind sends it back to ``k``. The step to read a
        learning-rate schedule at, so that every round replays it from the rewind point."""
        if self.t < self.rewind_step:
            return self.t
        return self.rewind_step + (self.t - self.rewind_step) % self.steps_per_round

    def target_sparsity(self, r: int) -> float:
        """Sparsity after round ``r``: ``1 - d_0 (1 - fraction)^r``."""
        return 1.0 - self.initial_density * (1.0 - self.fraction) ** r

    def _on_step(self) -> bool:
        if self.t == self.rewind_step:
            self._save()
        since = self.t - self.rewind_step
        if since <= 0 or since % self.steps_per_round or since // self.steps_per_round > self.rounds:
            return False
        r = since // self.steps_per_round
        sparsity = self.target_sparsity(r)
        sizes = [t.numel for t in self.targets]
        changed = sum(t.kept() for t in self.targets) > allocation.kept_total(sizes, sparsity)
        if changed:
            keep = allocation.select(self._masked_magnitudes(), sparsity, scope=self.scope, shapes=self._shapes())
            apply_masks(self.targets, keep)
        self._rewind()
        return changed

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of the model but the masks, by name."""
        net = self._net
        masks = {id(t.mask) for t in self.targets}
        found = dict(net.named_parameters())
        found.update((n, b) for n, b in net.named_buffers() if id(b) not in masks)
        return found

    @torch.no_grad()
    def _save(self) -> None:
        self.checkpoint = {name: v.detach().clone() for name, v in self._tensors().items()}
        distributed.broadcast_(list(self.checkpoint.values()))  # every rank rewinds to rank 0's values

    @torch.no_grad()
    def _rewind(self) -> None:
        if self.checkpoint is None:  # cannot happen: every round ends after the rewind point
            raise RuntimeError("IMP has no checkpoint to rewind to")
        for name, v in self._tensors().items():
            v.copy_(self.checkpoint[name])
        for t in self.targets:
            t.set_mask(t.mask.bool())  # pruned coefficients stay zero
        if self.optimizer is not None:
            self.optimizer.state.clear()

    def _extra_state(self) -> dict[str, Any]:
        ckpt = None if self.checkpoint is None else {k: v.clone() for k, v in self.checkpoint.items()}
        return {"initial_density": self.initial_density, "checkpoint": ckpt}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.initial_density = float(state["initial_density"])
        ckpt = state["checkpoint"]
        if ckpt is None:
            self.checkpoint = None
            return
        own = self._tensors()
        missing = sorted(set(own) - set(ckpt))
        if missing:
            raise IPFXValueError(f"the IMP checkpoint lacks {missing[:5]}: it was saved for another model")
        self.checkpoint = {k: ckpt[k].detach().clone().to(own[k].device) for k in own}


# ---------------------------------------------------------------------------------------------------
# Dynamic sparse training: RigL and SET
# ---------------------------------------------------------------------------------------------------
class _DropGrow(Schedule):
    """Shared machinery of RigL and SET: a fixed-sparsity mask whose connections are swapped.

    Every ``frequency`` steps while ``t < end_step``, per tensor with ``n`` kept coefficients:
    drop the ``k = round(f_t * n)`` kept coefficients of smallest ``|coeff_j| * ||F_j||``, then grow
    ``k`` of the coefficients that are masked after the drop (the just-dropped ones included) with
    the largest growth score. Newly grown coefficients start at zero; a just-dropped coefficient that
    is grown again keeps its value. Per-tensor kept counts, hence the total sparsity, never change.
    If an ``optimizer`` is given, its per-coefficient state (momentum, ...) is zeroed where the mask
    changed, so regrown coefficients also start without momentum.
    """

    def __init__(self, model: nn.Module, sparsity: float, *, end_step: int, frequency: int, scope: str,
                 init: str, seed: int, optimizer: torch.optim.Optimizer | None) -> None:
        _check_sparsity("sparsity", sparsity)
        _check_int("end_step", end_step, minimum=1)
        _check_int("frequency", frequency, minimum=1)
        _check_scope(scope)
        if init not in ("random", "magnitude"):
            raise IPFXValueError(f"init must be 'random' or 'magnitude', got {init!r}")
        super().__init__(model)
        self.requested_sparsity = float(sparsity)
        self.end_step = int(end_step)
        self.frequency = int(frequency)
        self.scope = scope
        self.init = init
        self.optimizer = optimizer
        self.generator = torch.Generator().manual_seed(int(seed))
        self._initial_prune()

    def update_fraction(self, t: int) -> float:
        raise NotImplementedError

    def is_update_step(self, t: int) -> bool:
        """Whether masks are updated at step ``t``: every ``frequency`` steps while ``t < end_step``."""
        return 0 < t < self.end_step and t % self.frequency == 0

    def _initial_prune(self) -> None:
        sizes = [t.numel for t in self.targets]
        if sum(t.kept() for t in self.targets) <= allocation.kept_total(sizes, self.requested_sparsity):
            return  # already this sparse (or sparser): keep the masks as they are
        ctx = scores.ScoreContext(self.model, self.targets, generator=self.generator)
        values = scores.random_scores(ctx) if self.init == "random" else scores.magnitude_scores(ctx)
        keep = allocation.select(exclude_masked(values, self.targets), self.requested_sparsity, scope=self.scope,
                                 shapes=self._shapes())
        apply_masks(self.targets, keep)

    def _grow_scores(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def _on_step(self) -> bool:
        if not self.is_update_step(self.t):
            return False
        fraction = self.update_fraction(self.t)
        grow_scores = self._grow_scores()
        old = [t.mask.bool().clone() for t in self.targets]
        drop_scores = self._masked_magnitudes()
        keep = []
        for mask, drop, grow in zip(old, drop_scores, grow_scores):
            n = int(mask.sum())
            k = min(int(round(fraction * n)), n)
            if k == 0:
                keep.append(mask)
                continue
            remaining = topk_mask(drop, n - k)
            grow = torch.where(remaining, torch.full_like(grow, -math.inf), grow.float())
            keep.append(remaining | topk_mask(grow, k))
        apply_masks(self.targets, keep)
        changed = False
        with torch.no_grad():
            for t, before in zip(self.targets, old):
                now = t.mask.bool()
                grown = now & ~before
                t.coeff.masked_fill_(grown, 0.0)
                if not torch.equal(now, before):
                    changed = True
                    self._reset_optimizer_state(t.coeff, now != before)
        return changed

    def _reset_optimizer_state(self, param: torch.Tensor, where: torch.Tensor) -> None:
        if self.optimizer is None:
            return
        for value in self.optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value.masked_fill_(where, 0)

    def _extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class RigL(_DropGrow):
    """Rigging the Lottery (Evci et al. 2020): dynamic sparse training with gradient-based regrowth.

    At construction, if the model is less sparse than ``sparsity``, it is pruned at random
    (``init="random"``, seeded by ``seed``; or by magnitude) to exactly ``sparsity`` with the given
    allocation (``"erk"`` by default, as in the paper). Then every ``frequency`` steps while
    ``t < end_step``, with the cosine-decayed update fraction

        f_t = alpha / 2 * (1 + cos(pi * t / end_step)),

    each tensor drops the ``k = round(f_t * n)`` of its ``n`` kept coefficients with smallest
    ``|coeff_j| * ||F_j||`` and grows the ``k`` masked coefficients with the largest ``|dL/dcoeff|``.
    That dense gradient is computed on one batch drawn from ``data`` (cycled), with every mask
    temporarily set to ones and the masked coefficients to zero (the function is unchanged), by
    ``torch.autograd.grad`` (parameters' ``.grad``, coefficients, masks and batch-norm statistics are
    restored exactly afterwards); under ``torch.distributed`` it is averaged over ranks. Grown
    coefficients start at zero; a just-dropped coefficient that is grown again keeps its value (as in
    the reference implementation). Sparsity, per tensor and in total, stays constant.

    ``last_gradients`` holds the (all-reduced) dense gradients used at the latest update.

    Args:
        sparsity: in ``[0, 1)``.
        end_step: no updates from this step on (``T_end``; the paper uses 75% of training).
        data: iterable of ``(inputs, targets)`` batches; re-iterated when exhausted. For a resumed run to
            match an uninterrupted one it must yield the same batches in the same order each pass.
        loss_fn: ``loss_fn(outputs, targets)``.
        frequency: steps between updates (``Delta T``).
        alpha: initial update fraction, in ``(0, 1]``.
        scope, init, seed: allocation, method and seed of the initial pruning.
        optimizer: optional; its per-coefficient state is zeroed where masks change.
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        end_step: int,
        data: Iterable | None = None,
        loss_fn: Callable | None = None,
        frequency: int = 100,
        alpha: float = 0.3,
        scope: str = "erk",
        init: str = "random",
        seed: int = 0,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if data is None or loss_fn is None:
            missing = " and ".join(n for n, v in (("data", data), ("loss_fn", loss_fn)) if v is None)
            raise IPFXValueError(
                f"RigL regrows coefficients by the gradient of a loss, so it needs {missing}: "
                "data=<iterable of (inputs, targets)>, loss_fn=<loss_fn(outputs, targets)>"
            )
        _check_fraction("alpha", alpha)
        self.data = data
        self.loss_fn = loss_fn
        self.alpha = float(alpha)
        self._iterator = None
        self._position = 0  # batches drawn from the current pass over `data`
        self.last_gradients: list[torch.Tensor] | None = None
        super().__init__(model, sparsity, end_step=end_step, frequency=frequency, scope=scope, init=init,
                         seed=seed, optimizer=optimizer)

    def update_fraction(self, t: int) -> float:
        """``f_t = alpha / 2 * (1 + cos(pi * t / end_step))``."""
        return self.alpha / 2.0 * (1.0 + math.cos(math.pi * t / self.end_step))

    def _grow_scores(self) -> list[torch.Tensor]:
        inputs, labels = self._next_batch()
        grads = dense_gradients(self._net, self.targets, inputs, labels, self.loss_fn)
        distributed.all_reduce_mean_(grads)
        self.last_gradients = grads
        return [g.abs() for g in grads]

    def _next_batch(self):
        if self._iterator is None:
            self._iterator = iter(self.data)
            for _ in range(self._position):  # resumed: skip what the saved run had drawn
                next(self._iterator)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._iterator = iter(self.data)
            self._position = 0
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise IPFXValueError(
                    "RigL's data yielded no batch; pass a re-iterable of (inputs, targets) (a list, a DataLoader)"
                ) from None
        self._position += 1
        inputs, labels = batch
        return scores._to(inputs, self._net), scores._to(labels, self._net)

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "data_position": self._position}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        super()._load_extra_state(state)
        self._position = int(state["data_position"])
        self._iterator = None


class SET(_DropGrow):
    """Sparse Evolutionary Training (Mocanu et al. 2018): dynamic sparse training with random regrowth.

    Like :class:`RigL` with a constant update fraction ``f_t = zeta`` and growth uniformly at random
    among the coefficients masked after the drop (a seeded generator; its state is in
    ``state_dict()``); grown coefficients start at zero. At construction a model less sparse than
    ``sparsity`` is pruned at random (seed ``seed``) with the given allocation. Updates happen every
    ``frequency`` steps while ``t < end_step``; sparsity stays constant.
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        end_step: int,
        frequency: int = 100,
        zeta: float = 0.3,
        scope: str = "erk",
        init: str = "random",
        seed: int = 0,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        _check_fraction("zeta", zeta)
        self.zeta = float(zeta)
        super().__init__(model, sparsity, end_step=end_step, frequency=frequency, scope=scope, init=init,
                         seed=seed, optimizer=optimizer)

    def update_fraction(self, t: int) -> float:
        """The constant ``zeta``."""
        return self.zeta

    def _grow_scores(self) -> list[torch.Tensor]:
        return [torch.rand(t.coeff.shape, generator=self.generator).to(t.coeff.device) for t in self.targets]


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def dense_gradients(
    model: nn.Module, found: Sequence[Target], inputs, labels, loss_fn: Callable
) -> list[torch.Tensor]:
    """``dL/dcoeff`` at every coefficient, masked ones included, on one batch; the model is unchanged.

    Masks are set to ones and masked coefficients to zero for one forward/backward (``mask * coeff``
    is the same, so is the function), then masks, coefficients, ``.grad`` and buffers (batch-norm
    statistics) are restored exactly. Uses ``torch.autograd.grad``; no ``.grad`` is written.
    """
    masks = [t.mask.clone() for t in found]
    coeffs = [t.coeff.detach().clone() for t in found]
    params = [t.coeff for t in found]
    wanted = [p for p in params if p.requires_grad]
    try:
        with torch.no_grad():
            for t in found:
                t.coeff.mul_(t.mask.to(t.coeff.dtype))
                t.mask.fill_(1)
        with scores._preserved(model), torch.enable_grad():
            loss = loss_fn(scores._forward(model, inputs), labels)
            got = torch.autograd.grad(loss, wanted, allow_unused=True) if wanted else ()
    finally:
        with torch.no_grad():
            for t, m, c in zip(found, masks, coeffs):
                t.mask.copy_(m)
                t.coeff.copy_(c)
    by_id = {id(p): g for p, g in zip(wanted, got)}
    return [by_id[id(p)].detach().clone() if by_id.get(id(p)) is not None else torch.zeros_like(p.detach())
            for p in params]


def _unwrap(model: nn.Module) -> nn.Module:
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def _check_sparsity(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise IPFXValueError(f"{name} must be a number in [0, 1) (a fraction of masked coefficients), got {value!r}")


def _check_fraction(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise IPFXValueError(f"{name} must be a number in (0, 1] (a fraction of kept coefficients), got {value!r}")


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise IPFXValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_scope(scope) -> None:
    if scope not in allocation.SCOPES:
        raise IPFXValueError(f"unknown scope {scope!r}; use one of {', '.join(map(repr, allocation.SCOPES))}")
