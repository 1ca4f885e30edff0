"""Pass (``ipfx.lower(..., freeze=True)``): a frozen graph holds only the state it reads.

Folding a batch norm into the convolution before it (:mod:`.fold_batch_norm`) leaves the batch norm's
module behind, with its weight, bias and statistics: read by nothing, yet saved with the model, and, in a
``torch.export`` program of it (``ipfx.deploy.save_program``), lifted into inputs that the loaded program
fetches on every call (a getattr chain each: 422 reads per call of a frozen mobilenet_v3_large, 230 of them
dead). This pass deletes every submodule its graph neither calls nor reads an attribute of
(``torch.fx.GraphModule.delete_all_unused_submodules``). It returns early for a graph that can still run a
Python forward (a fallback, or the first-call forward of :mod:`ipfx.capture.first_call`): that forward may
read any of them.
"""

from __future__ import annotations

import torch.nn as nn

from ..capture.first_call import USE_FORWARD
from ..capture.guards import FALLBACK
from ..capture.modes import graphs_in
from .manager import Pass, PassResult


class DropUnreadState(Pass):
    """Delete the submodules no node of a frozen graph uses (module docstring). Changed: the deleted modules'
    paths."""

    name = "drop unread state"

    def run(self, model: nn.Module) -> PassResult:
        result = PassResult()
        for path, gm in graphs_in(model):
            if FALLBACK in gm.meta or USE_FORWARD in gm.meta:
                continue
            before = {name for name, _ in gm.named_modules() if name}
            gm.delete_all_unused_submodules()
            after = {name for name, _ in gm.named_modules() if name}
            prefix = f"{path}." if path else ""
            result.changed.extend(prefix + name for name in sorted(before - after))
        return result
