"""A Hugging Face ``Trainer`` callback that trains the Trainer's model in coefficient form.

The Trainer builds its optimizer inside ``trainer.train()``, before any callback event that could still
change the model (``on_train_begin`` already sees the optimizer), and ``on_init_end`` does not get the
Trainer. So the model is transformed by attaching the callback to the built Trainer, before ``train()``::

    from transformers import Trainer, TrainingArguments
    from ipfx.integrations.transformers import prepare

    trainer = Trainer(model=model, args=TrainingArguments(...), train_dataset=...)
    callback = prepare(trainer, space="ip", schedule="gmp", sparsity=0.9, lower="dense")
    trainer.train()                       # the optimizer is built on the coefficients
    callback.lowered                      # plain convolutions, trained weights folded

``prepare(trainer, **options)`` is ``IPFXTrainerCallback(**options).attach(trainer)``: it replaces
``trainer.model`` by ``ipfx.transform(trainer.model, ...)`` (a model that is already transformed is
kept) and registers the callback. ``on_train_begin`` checks that the optimizer holds the coefficients,
prunes at initialisation and builds the schedule with the optimizer; ``on_step_end`` steps the schedule
once per optimizer step (``state.global_step``) and, on logging steps, logs ``sparsity`` with
``trainer.log`` (so ``state.log_history`` and every ``report_to`` integration receive it);
``on_train_end`` keeps ``ipfx.lower(...)`` as ``.lowered``.

Pruning methods that need data (SNIP, GraSP) and RigL take ``data`` (``(inputs, targets)`` batches)
and ``loss_fn(outputs, targets)`` from the options: a Trainer's batches are dicts, which ``ipfx.prune``
does not guess how to split. A model called with keyword arguments (``model(pixel_values=...,
labels=...)``) is best transformed with ``example_kwargs`` of that call, so the traced graph takes the
arguments the Trainer passes; the transformed model keeps the forward's signature, so the Trainer's
``remove_unused_columns`` keeps the columns it names (``labels`` included), and calls without ``labels``
(evaluation, the lowered model) run too (:mod:`ipfx.capture.guards`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch.nn as nn

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("ipfx.integrations.transformers needs Hugging Face transformers and accelerate: "
                      "pip install 'ipfx[hf]'") from exc

from ..errors import IPFXTypeError, IPFXValueError
from ._core import Plan, check_optimizers_see_coefficients, is_transformed

__all__ = ["IPFXTrainerCallback", "prepare"]

_HINT = ("Attach the callback with ipfx.integrations.transformers.prepare(trainer, ...) (or "
         "callback.attach(trainer)) before trainer.train(), and do not pass optimizers=(...) to the Trainer: "
         "it builds its optimizer in train(), after the model is transformed")


class IPFXTrainerCallback(TrainerCallback):
    """Transform, prune, log and lower the model of a ``transformers.Trainer``.

    Options as for :class:`ipfx.integrations.lightning.IPFXCallback` (``space``, ``example_inputs``,
    ``example_kwargs``, ``transform_kwargs``, ``prune``, ``sparsity``, ``data``, ``loss_fn``,
    ``prune_kwargs``, ``schedule``, ``schedule_kwargs``, ``lower``); GMP's ``end_step`` defaults to
    the Trainer's ``max_steps``, RigL/SET's to 75% of it. ``log_name`` is the logged key.
    """

    def __init__(
        self,
        *,
        space: str = "ip",
        example_inputs: Any = None,
        example_kwargs: dict | None = None,
        transform_kwargs: dict | None = None,
        prune: str | None = None,
        sparsity: float | None = None,
        data: Iterable | None = None,
        loss_fn: Callable | None = None,
        prune_kwargs: dict | None = None,
        schedule: Any = None,
        schedule_kwargs: dict | None = None,
        lower: str | None = None,
        log_name: str = "sparsity",
    ) -> None:
        self.plan = Plan(owner="IPFXTrainerCallback", space=space, example_inputs=example_inputs,
                         example_kwargs=example_kwargs, transform_kwargs=transform_kwargs, prune=prune,
                         sparsity=sparsity, data=data, loss_fn=loss_fn, prune_kwargs=prune_kwargs,
                         schedule=schedule, schedule_kwargs=schedule_kwargs, lower=lower)
        self.log_name = log_name
        self.trainer: Trainer | None = None
        self.lowered: nn.Module | None = None

    def attach(self, trainer: Trainer) -> "IPFXTrainerCallback":
        """Transform ``trainer.model`` in place of the original and register this callback; returns self."""
        if not isinstance(trainer, Trainer):
            raise IPFXTypeError(f"IPFXTrainerCallback.attach takes a transformers.Trainer, got {type(trainer).__name__}")
        if self.trainer is not None and self.trainer is not trainer:
            raise IPFXValueError("this IPFXTrainerCallback is already attached to another Trainer; make one per Trainer")
        if getattr(trainer, "optimizer", None) is not None:
            raise IPFXValueError("IPFXTrainerCallback: this Trainer already holds an optimizer (optimizers=(...) or "
                                 "a finished train()), built on the parameters of the untransformed model. " + _HINT)
        model = trainer.model
        if not isinstance(model, nn.Module):
            raise IPFXValueError("IPFXTrainerCallback: the Trainer has no model (model_init is not supported: "
                                 "build the model and pass model=... to the Trainer)")
        if not is_transformed(model):
            device = next(model.parameters()).device if next(model.parameters(), None) is not None else None
            model = self.plan.transform(model)
            if device is not None:
                model = model.to(device)
            trainer.model = trainer.model_wrapped = model
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # -- events ---------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.trainer is None:
            raise IPFXValueError("IPFXTrainerCallback was given to the Trainer but not attached to it, so the model "
                                 "was not transformed. " + _HINT)
        net = self.trainer.model
        if not is_transformed(net):
            raise IPFXValueError("IPFXTrainerCallback: trainer.model holds no coefficient weights any more "
                                 "(it was replaced after attach). " + _HINT)
        optimizer = optimizer if optimizer is not None else self.trainer.optimizer
        check_optimizers_see_coefficients(net, [optimizer] if optimizer is not None else [], "IPFXTrainerCallback",
                                          _HINT)
        if state.global_step == 0:
            self.plan.prune_at_init(net)
        self.plan.build_schedule(net, optimizer, state.max_steps or None)
        self.plan.step_to(state.global_step)
        self.plan.refresh()
        self._log(net)

    def on_step_end(self, args, state, control, **kwargs):
        net = self.trainer.model
        self.plan.step_to(state.global_step)
        if control.should_log:
            self._log(net)

    def on_train_end(self, args, state, control, **kwargs):
        self.lowered = self.plan.lower(self.trainer.model)

    def _log(self, net: nn.Module) -> None:
        self.trainer.log({self.log_name: self.plan.sparsity_of(net)})

    # -- checkpoints ----------------------------------------------------------------------------------
    @property
    def schedule(self):
        """The running ``ipfx.pruning`` schedule (``None`` before training starts or without one)."""
        return self.plan.schedule

    @property
    def prune_report(self):
        """The :class:`ipfx.PruneReport` of the pruning at initialisation, if any."""
        return self.plan.prune_report


def prepare(trainer: Trainer, **options: Any) -> IPFXTrainerCallback:
    """Transform ``trainer.model`` and register an :class:`IPFXTrainerCallback` built with ``options``."""
    return IPFXTrainerCallback(**options).attach(trainer)
