"""Passes of :func:`ipfx.lower` over a whole transformed model (each graph, then the parametrized weights).

* :class:`SettleFirstCallChecks`: graphs traced without example inputs are checked on first calls no more
  (:mod:`ipfx.capture.first_call`); what the transformed model settled on stays;
* :class:`LowerGraphs`: in every graph holding coefficient weights (a ModeSwitch's two graphs at once, on
  its combined graph), :class:`~.lower_fused.LowerFused` (target ``"fused"``) then
  :class:`~.lower_dense.LowerDense`, which folds whatever was not fused;
* :class:`FoldParametrized`: every module in the parametrized form (:mod:`ipfx.form.parametrize`) gets its
  own class back with ``weight = compose(coeff, mask, basis)`` folded (tied modules share one folded
  parameter). Untraced code reads these weights, so they are folded for either target; so are the
  fallbacks of guarded graphs (:mod:`ipfx.capture.guards`).

Postcondition of the pair: no coefficient weight is left.
"""

from __future__ import annotations

import warnings

import torch.fx as fx
import torch.nn as nn

from ..errors import user_stacklevel
from ..capture.first_call import CHECK, USE_FORWARD
from ..capture.guards import FALLBACK, PATTERN
from ..capture.modes import ModeSwitch, graphs_of
from ..form.parametrize import is_parametrized, unparametrize
from ..form.reparam import BasisWeight
from .lower_dense import LowerDense
from .manager import Pass, PassOutcome


class LowerGraphs(Pass):
    name = "lower graphs"

    def __init__(self, target: str, graphs: list) -> None:
        self.target = target
        self.graphs = graphs  # the GraphModules / ModeSwitches holding coefficient weights

    def _lower(self, gm: fx.GraphModule) -> None:
        if self.target == "fused":
            from .lower_fused import LowerFused  # imports the custom ops on first use

            LowerFused()(gm)
        LowerDense()(gm)

    def call(self, model: nn.Module) -> PassOutcome:
        for holder in self.graphs:
            if isinstance(holder, ModeSwitch):
                holder.apply(self._lower)  # both modes' graphs at once
            else:
                self._lower(holder)
        return PassOutcome(model, bool(self.graphs), len(self.graphs))


def _fallbacks(model: nn.Module) -> list[nn.Module]:
    graphs = [gm for m in model.modules() if isinstance(m, (ModeSwitch, fx.GraphModule)) for gm in graphs_of(m)]
    return [gm.meta[FALLBACK] for gm in graphs if FALLBACK in gm.meta]


class SettleFirstCallChecks(Pass):
    """A lowered graph is checked no more: it runs what the transformed model settled on.

    Without example inputs each traced graph is checked against its own forward on first calls
    (:mod:`ipfx.capture.first_call`). A lowered model holds the graph's folded or sparse tensors and the forward's
    folded copy, which no longer share storage (``load_state_dict`` reaches the graph only), so a check
    after lowering could compare against stale weights. Parts that were found to differ keep running their
    forward; parts that were checked keep the graph; parts never called before lowering keep the graph
    unchecked, and a warning says so (call the model once, or transform with example inputs, first).
    """

    name = "settle first-call checks"

    def call(self, model: nn.Module) -> PassOutcome:
        unchecked = []
        for m in model.modules():
            for gm in graphs_of(m) if isinstance(m, (ModeSwitch, fx.GraphModule)) else ():
                if CHECK not in gm.meta or USE_FORWARD in gm.meta:
                    continue
                if not gm.meta.pop(CHECK):
                    unchecked.append(type(gm).__name__)
                if PATTERN not in gm.meta:
                    gm.meta.pop(FALLBACK, None)
        if unchecked:
            warnings.warn(
                f"ipfx.lower: {len(unchecked)} graph(s) traced without example inputs ({', '.join(sorted(set(unchecked))[:4])}) "
                "were never called, so never checked against their own forward; the lowered model runs them "
                "unchecked. Call the transformed model once on real inputs before lowering, or transform it "
                "with example_inputs=...", stacklevel=user_stacklevel())
        return PassOutcome(model, bool(unchecked), unchecked)


class FoldParametrized(Pass):
    name = "fold parametrized weights"

    def call(self, model: nn.Module) -> PassOutcome:
        folded: dict = {}
        names = []
        for name, module in model.named_modules(remove_duplicate=False):
            if is_parametrized(module):  # a module listed twice is converted once
                unparametrize(module, folded)
                names.append(name)
        for fallback in _fallbacks(model):  # what guarded graphs run for other call patterns (ipfx.capture.guards)
            for module in fallback.modules(remove_duplicate=False):
                if is_parametrized(module):
                    unparametrize(module, folded)
        return PassOutcome(model, bool(names), names)

    def ensures(self, model: nn.Module) -> None:
        left = [name for name, m in model.named_modules() if isinstance(m, BasisWeight)]
        if left:  # every BasisWeight sits in a graph or is parametrized, so this means a bug
            raise RuntimeError(f"ipfx.lower left coefficient weights behind: {left}")
