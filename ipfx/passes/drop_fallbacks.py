"""Pass (``ipfx.lower(..., freeze=True)``): guarded graphs keep no fallback.

A guarded graph (:mod:`ipfx.capture.guards`) runs its module's own forward for calls of another pattern
of optional arguments. After lowering, that fallback holds the model's weights folded dense: beside a
fused graph that stores only the kept coefficients, a second, dense copy of every weight (a frozen
resnet18 at 95% pickled to 52 MB, its state 5 MB). The frozen form is the deployment form, called the
way it was captured, so it keeps the graph alone: the captured forward's signature stays on the graph
(``inspect.signature``, ``torch.export``'s ``dynamic_shapes`` read it), and a call of another pattern
raises, saying how to keep the fallback (lower without ``freeze``). It returns early for a graph whose
first call (traced without example inputs) found it computing something else: that part runs its forward
(:mod:`ipfx.capture.first_call`), so the forward is the computation, not a fallback, and stays.
"""

from __future__ import annotations

import torch.nn as nn

from ..capture.first_call import USE_FORWARD
from ..capture.guards import FALLBACK, NO_FALLBACK, SIGNATURE, sign, signature_of
from ..capture.modes import graphs_in
from .manager import Pass, PassResult

REASON = ("the model was lowered with freeze=True, which keeps no fallback (a dense copy of every weight); "
          "call it as it was captured, or lower it without freeze=True to keep one")


class DropFallbacks(Pass):
    """Drop every graph's fallback, keeping its signature (module docstring). Changed: the graphs' paths."""

    name = "drop fallbacks"

    def run(self, model: nn.Module) -> PassResult:
        result = PassResult()
        for path, gm in graphs_in(model):
            if FALLBACK not in gm.meta or USE_FORWARD in gm.meta:
                continue
            gm.meta[SIGNATURE] = signature_of(gm)
            del gm.meta[FALLBACK]
            gm.meta[NO_FALLBACK] = REASON
            sign(gm)
            result.changed.append(path or f"<{type(gm).__name__}>")
        return result

    def ensures(self, model: nn.Module) -> None:
        left = [path for path, gm in graphs_in(model) if FALLBACK in gm.meta and USE_FORWARD not in gm.meta]
        if left:
            raise RuntimeError(f"ipfx.lower(freeze=True) left fallbacks behind: {left}")
