"""The prunable tensors of a transformed model: one :class:`Target` per coefficient tensor.

Pruning never looks at weights: it reads ``coeff`` and writes ``mask`` of each
:class:`~ipfx.form.reparam.BasisWeight`, so SP and IP are pruned by the same code, differing only in the
basis that turns coefficients into weights.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..errors import NotTransformedError
from ..form.reparam import BasisWeight, coefficient_weights, qualified_weight_name


@dataclasses.dataclass
class Target:
    """One prunable coefficient tensor."""

    name: str  # the original weight's name, e.g. "layer1.0.conv1.weight"
    module: BasisWeight

    @property
    def coeff(self) -> nn.Parameter:
        return self.module.coeff

    @property
    def mask(self) -> torch.Tensor:
        return self.module.mask

    @property
    def numel(self) -> int:
        return self.mask.numel()

    def kept(self) -> int:
        return int(torch.count_nonzero(self.mask))

    @torch.no_grad()
    def set_mask(self, keep: torch.Tensor) -> None:
        """Install a boolean keep-mask and zero the coefficients it removes.

        Zeroing is not needed for correctness (masked entries never reach the weight: their gradient is
        zero and the mask multiplies them out), but it keeps the stored coefficients meaningful at the
        moment of pruning. An optimizer's leftover momentum can still move a masked coefficient later;
        schedules that regrow coefficients zero them again when they come back.
        """
        self.mask.copy_(keep.to(self.mask.dtype))
        self.coeff.mul_(self.mask.to(self.coeff.dtype))


def targets(model: nn.Module, what: str = "prune") -> list[Target]:
    """Every BasisWeight of ``model`` in module order; raises if there is none."""
    found = [Target(qualified_weight_name(path, m), m) for path, m in coefficient_weights(model, each_once=True)]
    if not found:
        raise NotTransformedError(
            f"ipfx.{what} needs a model returned by ipfx.transform, but this {type(model).__name__} holds no "
            "coefficient weights: it was never transformed, or it was already lowered. "
            "Call ipfx.transform(model) first."
        )
    return found
