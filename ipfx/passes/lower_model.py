"""Passes of :func:`ipfx.lower` over a whole transformed model, around the graph passes
(:class:`~.lower_fused.LowerFused` for target ``"fused"``, then :class:`~.lower_dense.LowerDense`, which
folds whatever was not fused, in every graph holding coefficient weights):

* :class:`SettleFirstCallChecks` (first): graphs traced without example inputs are checked on first calls
  no more (:mod:`ipfx.capture.first_call`); what the transformed model settled on stays;
* :class:`FoldParametrized` (last): every module in the parametrized form (:mod:`ipfx.form.parametrize`) gets its
  own class back with ``weight = compose(coeff, mask, basis)`` folded (tied modules share one folded
  parameter). Untraced code reads these weights, so they are folded for either target; so are the
  fallbacks of guarded graphs (:mod:`ipfx.capture.guards`).

Postcondition of the pair: no coefficient weight is left.
"""

from __future__ import annotations

import torch.nn as nn

from ..capture.first_call import CHECK, USE_FORWARD
from ..capture.guards import FALLBACK, PATTERN
from ..capture.modes import graphs_in
from ..form.parametrize import is_parametrized, unparametrize
from ..form.reparam import BasisWeight
from .manager import Pass, PassResult


def _fallbacks(model: nn.Module) -> list[nn.Module]:
    return [gm.meta[FALLBACK] for _, gm in graphs_in(model) if FALLBACK in gm.meta]


class SettleFirstCallChecks(Pass):
    """A lowered graph is checked no more: it runs what the transformed model settled on.

    Without example inputs each traced graph is checked against its own forward on first calls
    (:mod:`ipfx.capture.first_call`). A lowered model holds the graph's folded or sparse tensors and the forward's
    folded copy, which no longer share storage (``load_state_dict`` reaches the graph only), so a check
    after lowering could compare against stale weights. Parts that were found to differ keep running their
    forward; parts that were checked keep the graph; parts never called before lowering keep the graph
    unchecked: those are its skipped entries (by path in the model), which :func:`ipfx.lower` reports
    (call the model once, or transform with example inputs, first).
    """

    name = "settle first-call checks"

    def run(self, model: nn.Module) -> PassResult:
        result = PassResult()
        for path, gm in graphs_in(model):
            if CHECK not in gm.meta or USE_FORWARD in gm.meta:
                continue
            where = path or f"<{type(gm).__name__}>"
            if gm.meta.pop(CHECK):
                result.changed.append(where)
            else:
                result.skipped[where] = "never called, so never checked against its own forward"
            if PATTERN not in gm.meta:
                gm.meta.pop(FALLBACK, None)
        return result


class FoldParametrized(Pass):
    name = "fold parametrized weights"

    def run(self, model: nn.Module) -> PassResult:
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
        return PassResult(names)

    def ensures(self, model: nn.Module) -> None:
        left = [name for name, m in model.named_modules() if isinstance(m, BasisWeight)]
        if left:  # every BasisWeight sits in a graph or is parametrized, so this means a bug
            raise RuntimeError(f"ipfx.lower left coefficient weights behind: {left}")
