"""Pass: give every selected weight that no captured graph reads the parametrized coefficient form.

After the rewrite, a conv/linear ``weight`` parameter still in the model's module tree is one that no
graph reads as a kernel: its module is kept as Python code (partial tracing), is called as a leaf, or
the weight is not used in forward at all. Each one the config selects is converted in place by
:func:`ipfx.form.parametrize.parametrize_weight` (reading ``module.weight`` composes it), so that a weight is
left dense only because the config says so. So is the packed input projection of an
``nn.MultiheadAttention`` that code reads without calling the layer, and the direction ``weight_v`` of a
module under the deprecated hook-based weight norm (its hook composes the weight from it on every call). A module a graph reads under
another path (a module registered twice) gets the graph's coefficients, not a second set. A weight tied to other modules (an embedding sharing its
matrix with the output layer) is converted in every module holding it, all with the same
coefficients, so the tie holds. Postcondition: no selected weight is left.
"""

from __future__ import annotations

import torch.nn as nn

from ..config import TransformConfig
from ..form.parametrize import is_parametrized, parametrize_tied, parametrize_weight, weight_holders
from ..form.reparam import BasisWeight
from .manager import Pass, PassResult


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

    def selected(self, captured) -> list[tuple[str, nn.Module, str, object, str]]:
        """(weight name, module in the result, kind, settings, parameter name) of every selected weight
        still a parameter: a conv/linear ``weight``, or the packed input projection (``in_proj_weight``) of
        an ``nn.MultiheadAttention`` that code reads directly instead of calling the layer (torchaudio's
        WavLM attention: ``F.linear(x, self.attention.in_proj_weight)``)."""
        found = []
        for path, module in captured.model.named_modules(remove_duplicate=True):
            if isinstance(module, BasisWeight):
                continue
            original = captured.original.get(path)
            if original is None:
                continue
            if isinstance(original, nn.MultiheadAttention):
                attr, kind = "in_proj_weight", "linear"
            elif isinstance(original, self.config.module_types):
                attr, kind = _old_weight_norm(original) or "weight", _kind(original)
                direction = _parametrized_direction(original)
                if direction is not None:  # (torch's weight_norm: its direction, in its ParametrizationList)
                    path, original, attr = f"{path}.parametrizations.weight", direction, "original1"
                    module = module.parametrizations.weight if hasattr(module, "parametrizations") else module
            else:
                continue
            weight = module._parameters.get(attr)
            if (not isinstance(weight, nn.Parameter) or isinstance(weight, nn.parameter.UninitializedParameter)
                    or original._parameters.get(attr) is not weight):
                continue
            kernel = () if kind == "linear" else tuple(weight.shape[2:])
            name = f"{path}.{attr}" if path else attr
            settings = self.config.settings_for(name, type(original), kernel, kind == "linear")
            if settings is not None:
                found.append((name, module, kind, settings, attr))
        return found

    def run(self, captured) -> PassResult:
        converted = []
        holders = weight_holders(captured.model.modules())
        in_graphs = _graph_forms(captured)
        for name, module, kind, settings, attr in self.selected(captured):
            if attr not in module._parameters:
                continue  # converted already, as a tied alias of an earlier one
            weight = module._parameters[attr]
            form = in_graphs.get(id(weight))  # the module is a graph's, under another path: one set of tensors
            if form is None:
                form = self.factory.make(weight, name, kind, settings)
                form.capture = "parametrized"
            if attr == "weight":
                parametrize_tied(holders, weight, form)
            else:
                parametrize_weight(module, form, attr)
            converted.append(name)
        return PassResult(converted)

    def ensures(self, captured) -> None:
        left = [name for name, *_ in self.selected(captured)]
        if left:  # every selected weight is a parameter of some module, so this means a bug
            raise RuntimeError(f"ipfx.transform left selected weights dense: {left}")


def _parametrized_direction(module: nn.Module):
    """The ``ParametrizationList`` of a module under ``torch.nn.utils.parametrizations.weight_norm`` (its
    ``original1``, the direction of the weight's shape, is what becomes coefficients, as when a graph traces
    through it), or None."""
    from torch.nn.utils import parametrize

    if not parametrize.is_parametrized(module, "weight"):
        return None
    plist = module.parametrizations.weight
    direction = plist._parameters.get("original1")
    if len(plist) != 1 or type(plist[0]).__name__ != "_WeightNorm" or not isinstance(direction, nn.Parameter):
        return None
    return plist


def _old_weight_norm(module: nn.Module) -> str | None:
    """The direction ``weight_v`` of a module under the deprecated hook-based ``torch.nn.utils.weight_norm``
    (its ``weight`` is then a tensor the hook recomputes from ``weight_g`` and ``weight_v`` on every call)."""
    from torch.nn.utils.weight_norm import WeightNorm

    names = [hook.name for hook in module._forward_pre_hooks.values() if isinstance(hook, WeightNorm)]
    return "weight_v" if "weight" in names else None


def _graph_forms(captured) -> dict[int, BasisWeight]:
    """The BasisWeight a graph reads for each original ``weight`` parameter, by the parameter's id.

    A module registered under two paths (MONAI's DynUNet) is read by the graph under one of them; under
    the other the result may hold it unrewritten. Converted there with the graph's form, both paths hold
    one set of coefficients, as the model held one weight."""
    forms: dict[int, BasisWeight] = {}
    for path, module in captured.model.named_modules():
        if isinstance(module, BasisWeight) and not is_parametrized(module) and module.weight_name.endswith("weight"):
            original = captured.original.get(path)
            weight = None if original is None else original._parameters.get("weight")
            if isinstance(weight, nn.Parameter) and tuple(weight.shape) == module.weight_shape:
                forms.setdefault(id(weight), module)
    return forms
