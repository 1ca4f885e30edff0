"""Pass: fold every compose subgraph into a constant dense weight and restore ordinary modules.

Folding relies on nothing but evaluation: the subgraph ``reshape((mask * coeff) @ basis)`` has no
graph inputs, so its value ``W`` is a constant of the trained model and ``get_attr(P)`` holding ``W``
computes the same thing. ``P`` gets its original name (``<prefix>.weight``, or the original name of a
parameter called otherwise), so the lowered state_dict reads like the original model's.

Restoring modules: where the transform traced *through* a standard ``nn.ConvNd``/``nn.Linear``, its
inlined call ``[pad(x) ->] conv(x, P, bias, <the module's own geometry>)`` is replaced by
``call_module`` of a rebuilt module of the original type holding ``P`` and the bias. The graph is then
what a plain ``torch.fx`` trace of the original model gives. A call that does not match the module's
own geometry (the weight was used elsewhere by hand) stays functional, which is still correct.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ..capture.attention import restore_attention
from ..capture.source_attributes import replace_module, set_submodule
from ..form.reparam import STATE_NAMES, BasisWeight, adopt_attributes
from .manager import GraphPass, GraphSite, PassResult
from .restore_modules import restore_module_calls
from .subgraphs import ComposeSubgraph, compose_subgraphs, erase_nodes


class LowerDense(GraphPass):
    """Fold every compose subgraph into a dense weight. Changed: the prefixes folded (and
    ``nn.MultiheadAttention`` calls restored)."""

    name = "lower dense"

    def run_graph(self, site: GraphSite) -> PassResult:
        changed = []
        for sub in compose_subgraphs(site.gm):
            fold_subgraph(site.gm, sub)
            changed.append(sub.prefix)
        if restore_attention(site.gm):
            changed.append("attention calls")
        return PassResult(changed)


def fold_subgraph(gm: fx.GraphModule, sub: ComposeSubgraph) -> None:
    """Replace one compose subgraph by ``get_attr`` of the folded weight (module docstring)."""
    module = sub.module
    weight = nn.Parameter(module.fold(), requires_grad=module.coeff.requires_grad)
    param_name = module.weight_name
    graph = gm.graph
    _replace_module(gm, sub.prefix, param_name, module, weight)
    for path in getattr(module, "tied_names", ()):  # the tied names torch.export left unread: the same weight
        owner_path, _, leaf = path.rpartition(".")
        try:
            owner = gm.get_submodule(owner_path) if owner_path else gm
        except AttributeError:
            continue
        if not hasattr(owner, leaf):
            owner.register_parameter(leaf, weight)
    if sub.output is not None:
        with graph.inserting_before(sub.nodes[0]):
            folded = graph.get_attr(param_name)
        sub.output.replace_all_uses_with(folded)
    erase_nodes(graph, sub.nodes)
    if sub.output is not None:
        if module.source is not None:
            restore_module_calls(gm, sub.prefix, module.source, folded)
        for path, spec in getattr(module, "aliases", {}).items():  # other modules tied to the same weight
            bias = _shell_bias(gm, path)
            set_submodule(gm, path, spec.build(weight, bias))
            restore_module_calls(gm, path, spec, folded)
        if not folded.users:
            graph.erase_node(folded)


def _shell_bias(gm: fx.GraphModule, path: str):
    try:
        return gm.get_submodule(path)._parameters.get("bias")
    except AttributeError:
        return None


def _replace_module(gm, prefix: str, param_name: str, module: BasisWeight, weight: nn.Parameter) -> None:
    parent_path, _, leaf = prefix.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    if param_name == f"{prefix}.weight":
        if module.source is not None:
            new = module.source.build(weight, module._parameters.get("bias"))
        else:
            new = nn.Module()
            new.weight = weight
        adopt_attributes(new, module, skip=STATE_NAMES)
        new.training = module.training  # adopted children keep their own flags
        replace_module(gm, module, new)  # under every name it has (a module registered twice)
        setattr(parent, leaf, new)
    else:  # the parameter had its own name: put it back on the parent
        delattr(parent, leaf)
        parent.register_parameter(leaf, weight)


