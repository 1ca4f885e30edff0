"""Pass: give every selected weight that no captured graph reads the parametrized coefficient form.

After the rewrite, a conv/linear ``weight`` parameter still in the model's module tree is one that no
graph reads as a kernel: its module is kept as Python code (partial tracing), is called as a leaf, or
the weight is not used in forward at all. Each one the config selects is converted in place by
:func:`ipfx.parametrize.parametrize_weight` (reading ``module.weight`` composes it), so that a weight is
left dense only because the config says so. A weight tied to other modules (an embedding sharing its
matrix with the output layer) is converted in every module holding it, all with the same
coefficients, so the tie holds. Postcondition: no selected weight is left.
"""

from __future__ import annotations

import torch.nn as nn

from ..config import TransformConfig
from ..parametrize import parametrize_tied, weight_holders
from ..reparam import BasisWeight
from .manager import Pass, PassOutcome


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "conv_transpose"
    return "conv"


class ParametrizeUnreached(Pass):
    name = "parametrize unreached weights"

    def __init__(self, config: TransformConfig, factory) -> None:
        self.config = config
        self.factory = factory

    def selected(self, captured) -> list[tuple[str, nn.Module, str, object]]:
        """(weight name, module in the result, kind, settings) of every selected weight still a parameter."""
        found = []
        for path, module in captured.model.named_modules(remove_duplicate=True):
            if isinstance(module, BasisWeight):
                continue
            weight = module._parameters.get("weight")
            original = captured.original.get(path)
            if (not isinstance(weight, nn.Parameter) or isinstance(weight, nn.parameter.UninitializedParameter)
                    or original is None or not isinstance(original, self.config.module_types)
                    or original._parameters.get("weight") is not weight):
                continue
            kind = _kind(original)
            kernel = () if kind == "linear" else tuple(weight.shape[2:])
            name = f"{path}.weight" if path else "weight"
            settings = self.config.settings_for(name, type(original), kernel, kind == "linear")
            if settings is not None:
                found.append((name, module, kind, settings))
        return found

    def call(self, captured) -> PassOutcome:
        converted = []
        holders = weight_holders(captured.model.modules())
        for name, module, kind, settings in self.selected(captured):
            if "weight" not in module._parameters:
                continue  # converted already, as a tied alias of an earlier one
            weight = module._parameters["weight"]
            form = self.factory.make(weight, name, kind, settings)
            form.capture = "parametrized"
            parametrize_tied(holders, weight, form)
            converted.append(name)
        return PassOutcome(captured, bool(converted), converted)

    def ensures(self, captured) -> None:
        left = [name for name, _, _, _ in self.selected(captured)]
        if left:  # every selected weight is a parameter of some module, so this means a bug
            raise RuntimeError(f"ipfx.transform left selected weights dense: {left}")
