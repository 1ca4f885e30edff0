"""A PyTorch Lightning callback that trains a LightningModule's network in coefficient form.

    import lightning.pytorch as pl
    from ipfx.integrations.lightning import IPFXCallback

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = make_cnn()                  # the network ipfx rewrites: `attribute="model"`
        def configure_optimizers(self):              # runs after the callback's setup(): sees coefficients
            return torch.optim.SGD(self.parameters(), lr=0.1)
        ...

    callback = IPFXCallback("model", space="ip", prune="snip", sparsity=0.9, loss_fn=F.cross_entropy,
                            lower="dense")
    pl.Trainer(callbacks=[callback], max_epochs=5).fit(Classifier(), loader)
    callback.lowered                                 # plain convolutions, trained weights folded

Hooks: ``setup`` replaces ``pl_module.<attribute>`` by ``ipfx.transform(...)`` of it (before Lightning
calls ``configure_optimizers``; the attribute must exist by then, so build it in ``__init__`` or
``setup``, not in ``configure_model``). ``on_train_start`` checks that the optimizers hold the
coefficients, prunes at initialisation (SNIP/GraSP data default to the train dataloader's first
batches, which must be ``(inputs, targets)``) and builds the schedule, given the optimizer (IMP, RigL
and SET reset its state where they change masks). ``on_train_batch_end`` steps the schedule once per
optimizer step taken (``trainer.global_step``, so gradient accumulation is counted right) and logs
``ipfx/sparsity`` with ``pl_module.log``. ``on_fit_end`` keeps ``ipfx.lower(...)`` as ``.lowered``. The
schedule's state is saved in Lightning checkpoints and restored on resume; a resumed run is not pruned
at initialisation again.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch.nn as nn

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("ipfx.integrations.lightning needs PyTorch Lightning: pip install 'ipfx[lightning]' "
                      "(or pip install lightning)") from exc

from ..errors import IPFXTypeError, IPFXValueError
from ..pruning.scores import DATA_DRIVEN
from ._core import Plan, check_optimizers_see_coefficients

__all__ = ["IPFXCallback"]


class IPFXCallback(pl.Callback):
    """Transform, prune, log and lower the network held by ``pl_module.<attribute>``.

    Args:
        attribute: name of the LightningModule attribute holding the network (``"model"``); a dotted
            path (``"backbone.encoder"``) reaches into submodules.
        space: ``"ip"`` (adaptive basis) or ``"sp"`` (standard pruning).
        example_inputs, example_kwargs: example call of the network, for torch.export capture; by
            default ``pl_module.example_input_array`` when set, else symbolic tracing.
        transform_kwargs: more keyword arguments for :func:`ipfx.transform` (``basis``, ``config``, ...).
        prune, sparsity: one-shot pruning at the start of training (``"random"``, ``"magnitude"``,
            ``"snip"``, ``"grasp"``, ``"synflow"``) to this sparsity; ``sparsity`` is also the target of a
            schedule given by name.
        data, loss_fn, prune_kwargs: for :func:`ipfx.prune` (and RigL's regrowth gradients); ``data``
            defaults to the train dataloader.
        schedule, schedule_kwargs: ``"gmp"``, ``"imp"``, ``"rigl"``, ``"set"`` or an
            ``ipfx.pruning.Schedule`` subclass, built with ``schedule_kwargs`` (GMP's ``end_step``
            defaults to the trainer's total steps, RigL/SET's to 75% of them), or a callable
            ``(model, optimizer) -> Schedule``.
        lower: ``None``, ``"dense"`` or ``"fused"``: the lowering kept as ``.lowered`` at the end of fit.
        log_name: the logged key, ``"ipfx/sparsity"``.
    """

    def __init__(
        self,
        attribute: str = "model",
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
        log_name: str = "ipfx/sparsity",
    ) -> None:
        super().__init__()
        if not isinstance(attribute, str) or not attribute:
            raise IPFXTypeError(f"IPFXCallback: attribute must be the name of the LightningModule attribute that "
                                f"holds the network (e.g. 'model'), got {attribute!r}")
        self.attribute = attribute
        self.log_name = log_name
        self.plan = Plan(owner="IPFXCallback", space=space, example_inputs=example_inputs,
                         example_kwargs=example_kwargs, transform_kwargs=transform_kwargs, prune=prune,
                         sparsity=sparsity, data=data, loss_fn=loss_fn, prune_kwargs=prune_kwargs,
                         schedule=schedule, schedule_kwargs=schedule_kwargs, lower=lower)
        self.lowered: nn.Module | None = None
        self._pending_state: dict | None = None

    # -- the network ----------------------------------------------------------------------------------
    def network(self, pl_module: pl.LightningModule) -> nn.Module:
        """``pl_module.<attribute>``, with a clear error when it is missing or not a module."""
        owner, name = self._owner(pl_module)
        value = getattr(owner, name, None)
        if not isinstance(value, nn.Module):
            children = ", ".join(n for n, _ in pl_module.named_children()) or "none"
            what = "has no attribute" if value is None else f"holds a {type(value).__name__}, not an nn.Module, in"
            raise IPFXValueError(
                f"IPFXCallback(attribute={self.attribute!r}): {type(pl_module).__name__} {what} {self.attribute!r} "
                f"at setup (its child modules: {children}); pass attribute=<the name of the network to prune>, "
                "and create it in __init__ or setup (configure_model runs after the callback's setup)")
        return value

    def _owner(self, pl_module):
        *path, name = self.attribute.split(".")
        owner = pl_module
        for part in path:
            owner = getattr(owner, part, None)
            if owner is None:
                raise IPFXValueError(f"IPFXCallback(attribute={self.attribute!r}): {type(pl_module).__name__} has "
                                     f"no {part!r} on the way to {self.attribute!r}")
        return owner, name

    # -- hooks ----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        net = self.network(pl_module)
        transformed = self.plan.transform(net, getattr(pl_module, "example_input_array", None))
        if transformed is not net:
            owner, name = self._owner(pl_module)
            setattr(owner, name, transformed)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = self.network(pl_module)
        check_optimizers_see_coefficients(
            net, trainer.optimizers, "IPFXCallback",
            "Build the optimizer in configure_optimizers from self.parameters() (or self."
            f"{self.attribute}.parameters()), which Lightning calls after the callback's setup()")
        data = self.plan.data
        if data is None and (self.plan.prune in DATA_DRIVEN or self.plan.schedule_spec in ("rigl", "RigL")):
            data = trainer.train_dataloader
        if trainer.global_step == 0 and self._pending_state is None:
            self.plan.prune_at_init(net, data)
        total = trainer.estimated_stepping_batches
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.plan.build_schedule(net, optimizer, int(total) if total != float("inf") else None, data)
        if self._pending_state is not None and self.plan.schedule is not None:
            self.plan.schedule.load_state_dict(self._pending_state)
            self._pending_state = None
        self.plan.step_to(trainer.global_step)
        self.plan.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        net = self.network(pl_module)
        self.plan.step_to(trainer.global_step)
        pl_module.log(self.log_name, self.plan.sparsity_of(net), on_step=True, on_epoch=False, prog_bar=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lowered = self.plan.lower(self.network(pl_module))

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        schedule = self.plan.schedule
        return {"schedule": schedule.state_dict()} if schedule is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("schedule") is not None:
            self._pending_state = state_dict["schedule"]

    @property
    def schedule(self):
        """The running ``ipfx.pruning`` schedule (``None`` before training starts or without one)."""
        return self.plan.schedule

    @property
    def prune_report(self):
        """The :class:`ipfx.PruneReport` of the pruning at initialisation, if any."""
        return self.plan.prune_report
