"""Passes of :func:`ipfx.lower` over a whole transformed model (each graph, then the parametrized weights).

* :class:`LowerGraphs`: in every graph holding coefficient weights (a ModeSwitch's two graphs at once, on
  its combined graph), :class:`~.lower_fused.LowerFused` (target ``"fused"``) then
  :class:`~.lower_dense.LowerDense`, which folds whatever was not fused;
* :class:`FoldParametrized`: every module in the parametrized form (:mod:`ipfx.parametrize`) gets its
  own class back with ``weight = compose(coeff, mask, basis)`` folded (tied modules share one folded
  parameter). Untraced code reads these weights, so they are folded for either target; so are the
  fallbacks of guarded graphs (:mod:`ipfx.guards`).

Postcondition of the pair: no coefficient weight is left.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ..guards import FALLBACK
from ..modes import ModeSwitch, graphs_of
from ..parametrize import is_parametrized, unparametrize
from ..reparam import BasisWeight
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


class FoldParametrized(Pass):
    name = "fold parametrized weights"

    def call(self, model: nn.Module) -> PassOutcome:
        folded: dict = {}
        names = []
        for name, module in model.named_modules(remove_duplicate=False):
            if is_parametrized(module):  # a module listed twice is converted once
                unparametrize(module, folded)
                names.append(name)
        for fallback in _fallbacks(model):  # what guarded graphs run for other call patterns (ipfx.guards)
            for module in fallback.modules(remove_duplicate=False):
                if is_parametrized(module):
                    unparametrize(module, folded)
        return PassOutcome(model, bool(names), names)

    def ensures(self, model: nn.Module) -> None:
        left = [name for name, m in model.named_modules() if isinstance(m, BasisWeight)]
        if left:  # every BasisWeight sits in a graph or is parametrized, so this means a bug
            raise RuntimeError(f"ipfx.lower left coefficient weights behind: {left}")
