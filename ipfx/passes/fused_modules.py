"""Pass (:func:`ipfx.deploy.load_module`): a loaded program's fused op calls become calls of ipfx's modules.

A ``torch.export`` program of a frozen fused model (``ipfx.deploy.save_program``) holds each fused
convolution as ``ipfx::ip_conv(x, values, indices, basis, bias, <geometry>, order, residual, activation)``
with its tensors as attributes of a container module, fetched by a getattr chain on every call, and the op
entered through the dispatcher (~15 us of Python a call). Calling the same tensors through
:class:`~ipfx.ops.SparseIPConv` (``ipfx::sparse_linear``: :class:`~ipfx.ops.SparseLinear`) computes the same
thing: the module's ``forward`` is that op, and in eager inference its plan (the one the op's kernel keeps,
:func:`ipfx.ops.library.conv_plan`). The container is replaced by the module (same state-dict keys), the
call by a ``call_module``. It returns early for a call whose tensors are not attributes read by that call
alone, or whose geometry or activation is not a constant: those stay op calls, which compute the same.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from ..ops import SparseIPConv, SparseLinear
from .manager import GraphPass, GraphSite, PassResult

_CONV_GEOMETRY = ("weight_shape", "stride", "padding", "dilation", "groups", "transposed", "output_padding")


class FusedOpsAsModules(GraphPass):
    """Replace each fused op call on attribute tensors by the module that calls it (module docstring).
    Changed: the modules' paths; skipped: op calls left as they are, with the reason."""

    name = "fused ops as modules"

    def run_graph(self, site: GraphSite) -> PassResult:
        result = PassResult()
        gm = site.gm
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in (torch.ops.ipfx.ip_conv.default,
                                                                  torch.ops.ipfx.sparse_linear.default):
                continue
            args = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
            tensors = {k: args.get(k) for k in ("values", "indices", "basis", "bias")}
            if node.target is torch.ops.ipfx.sparse_linear.default:
                tensors.pop("basis")
            reason, path = _container(gm, node, tensors)
            if reason is not None:
                result.skipped[path or node.name] = reason
                continue
            owner = gm.get_submodule(path)
            stored = {k: None if v is None else getattr(owner, v.target.rsplit(".", 1)[-1]) for k, v in tensors.items()}
            if node.target is torch.ops.ipfx.ip_conv.default:
                if not isinstance(args.get("activation", "none"), str) or not all(
                        isinstance(args[k], (int, bool, list, tuple)) for k in (*_CONV_GEOMETRY, "order")):
                    result.skipped[path] = "its geometry or activation is computed"
                    continue
                module = SparseIPConv(stored["values"], stored["indices"], stored["basis"], stored["bias"],
                                      **{k: args[k] for k in _CONV_GEOMETRY})
                module.activation = args.get("activation", "none")
                call_kwargs = {"order": args["order"]}
                if args.get("residual") is not None:
                    call_kwargs["residual"] = args["residual"]
            else:
                module = SparseLinear(stored["values"], stored["indices"], stored["bias"],
                                      weight_shape=args["weight_shape"])
                call_kwargs = {}
            parent, _, name = path.rpartition(".")
            setattr(gm.get_submodule(parent), name, module)  # (same keys: values, indices, basis, bias)
            with gm.graph.inserting_before(node):
                call = gm.graph.call_module(path, (args["x"],), call_kwargs)
            call.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
            for read in tensors.values():
                if read is not None:
                    gm.graph.erase_node(read)
            result.changed.append(path)
        return result


def _container(gm: fx.GraphModule, node: fx.Node, tensors: dict) -> tuple[str | None, str]:
    """``(None, path)`` where every tensor of the op call is an attribute of the module at ``path`` read by this
    call alone and that module holds nothing else; else ``(reason, path or "")``."""
    reads = [v for v in tensors.values() if v is not None]
    if not all(isinstance(v, fx.Node) and v.op == "get_attr" and set(v.users) == {node} for v in reads):
        return "its tensors are not attributes read by it alone", ""
    paths = {v.target.rpartition(".")[0] for v in reads}
    if len(paths) != 1 or "" in paths:
        return "its tensors are not the attributes of one module", ""
    (path,) = paths
    owner = gm.get_submodule(path)
    held = {*owner._parameters, *owner._buffers, *owner._modules}
    if held != {v.target.rpartition(".")[2] for v in reads} or type(owner) is not torch.nn.Module:
        return "its module holds more than the op's tensors", path
    if any(n.op in ("call_module", "get_attr") and n.target.startswith(path + ".") and n not in reads
           for n in gm.graph.nodes) or any(n.op == "call_module" and n.target == path for n in gm.graph.nodes):
        return "its module is used by other nodes", path
    return None, path
