"""``nn.MultiheadAttention`` with its projection weights as graph inputs.

torch.fx keeps ``nn.MultiheadAttention`` as a leaf, and its forward reads ``in_proj_weight`` and
``out_proj.weight`` itself, so a plain trace never sees those weights. The tracer instead records a call
of :class:`AttentionKernels` (the same module's configuration and non-kernel tensors) that takes the
projection weights as *arguments*::

    call_module(attn, (query, key, value))  ==>  call_module(attn, (query, key, value, W_in, W_out[, W_q, W_k, W_v]))

with ``W_* = get_attr(...)``. The weights are then ordinary linear kernels that the rewrite pass turns
into coefficient subgraphs. :class:`AttentionKernels` runs ``nn.MultiheadAttention.forward`` itself on a
stand-in holding the passed weights, so the computation (fast path and masks included) is the original
one; its ``training`` flag is live. Dense lowering puts an ``nn.MultiheadAttention`` back
(:func:`restore_attention`), holding the folded weights.
"""

from __future__ import annotations

import types

import torch.fx as fx
import torch.nn as nn

from ..form.reparam import adopt_attributes

#: Positions of the kernel arguments in an AttentionKernels call: in_proj, out_proj, q/k/v projections.
KERNEL_POSITIONS = (3, 4, 5, 6, 7)
_CONFIG = ("embed_dim", "kdim", "vdim", "num_heads", "dropout", "batch_first", "add_zero_attn", "head_dim",
           "_qkv_same_embed_dim")
_FORWARD_KWARGS = ("key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


class AttentionKernels(nn.Module):
    """An ``nn.MultiheadAttention`` whose projection weights arrive as forward arguments."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        for name in _CONFIG:
            setattr(self, name, getattr(mha, name))
        adopt_attributes(self, mha)
        self.training = mha.training

    def forward(self, query, key, value, in_proj_weight, out_proj_weight, q_proj_weight=None, k_proj_weight=None,
                v_proj_weight=None, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        stand_in = types.SimpleNamespace(
            **{name: getattr(self, name) for name in _CONFIG},
            training=self.training,
            in_proj_weight=in_proj_weight, q_proj_weight=q_proj_weight, k_proj_weight=k_proj_weight,
            v_proj_weight=v_proj_weight, in_proj_bias=self._parameters.get("in_proj_bias"),
            bias_k=self._parameters.get("bias_k"), bias_v=self._parameters.get("bias_v"),
            out_proj=types.SimpleNamespace(weight=out_proj_weight, bias=self.out_proj._parameters.get("bias")),
        )
        stand_in.merge_masks = types.MethodType(nn.MultiheadAttention.merge_masks, stand_in)
        return nn.MultiheadAttention.forward(stand_in, query, key, value, key_padding_mask, need_weights,
                                             attn_mask, average_attn_weights, is_causal)


def attention_call(tracer: fx.Tracer, path: str, mha: nn.MultiheadAttention, args, kwargs):
    """Record ``mha(*args, **kwargs)`` as a call of :class:`AttentionKernels` with the weights as inputs."""
    names = dict(zip(("query", "key", "value"), args))
    names.update(kwargs)
    extra = list(args[3:])
    for name in _FORWARD_KWARGS:  # positional extras of MultiheadAttention.forward
        if extra:
            names[name] = extra.pop(0)
    query, key, value = (names.pop(n) for n in ("query", "key", "value"))

    def weight(attr: str):
        owner, _, leaf = attr.rpartition(".")
        module = mha.get_submodule(owner) if owner else mha
        if module._parameters.get(leaf) is None:
            return None
        return tracer.create_proxy("get_attr", f"{path}.{attr}", (), {})

    inputs = (query, key, value, weight("in_proj_weight"), weight("out_proj.weight"), weight("q_proj_weight"),
              weight("k_proj_weight"), weight("v_proj_weight"))
    return tracer.create_proxy("call_module", path, inputs, names)


def install_attention_kernels(gm: fx.GraphModule, paths) -> None:
    """Swap the recorded ``nn.MultiheadAttention`` modules for their :class:`AttentionKernels`."""
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = gm.get_submodule(parent_path) if parent_path else gm
        setattr(parent, name, AttentionKernels(getattr(parent, name)))


def restore_attention(gm: fx.GraphModule) -> bool:
    """Dense lowering: every AttentionKernels whose weights are plain tensors again becomes an
    ``nn.MultiheadAttention`` called with ``(query, key, value)`` (the graph of a plain trace)."""
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if is_attention_call(gm, node):
            calls.setdefault(node.target, []).append(node)
    changed = False
    for path, nodes in calls.items():  # a module called more than once is rebuilt once
        weights = [w for node in nodes for w in node.args[3:8]]
        if not all(w is None or (isinstance(w, fx.Node) and w.op == "get_attr") for w in weights):
            continue  # still in coefficient form
        parent_path, _, name = path.rpartition(".")
        setattr(gm.get_submodule(parent_path) if parent_path else gm, name, _rebuild(gm.get_submodule(path)))
        for node in nodes:
            node.args = tuple(node.args[:3])
        for w in dict.fromkeys(weights):  # a weight node read by several calls is erased once
            if isinstance(w, fx.Node) and not w.users:
                gm.graph.erase_node(w)
        changed = True
    return changed


def _rebuild(kernels: AttentionKernels) -> nn.MultiheadAttention:
    params = kernels._parameters
    reference = params.get("in_proj_weight", params.get("q_proj_weight"))
    mha = nn.MultiheadAttention(kernels.embed_dim, kernels.num_heads, dropout=kernels.dropout,
                                bias=params.get("in_proj_bias") is not None,
                                add_bias_kv=params.get("bias_k") is not None, add_zero_attn=kernels.add_zero_attn,
                                kdim=kernels.kdim, vdim=kernels.vdim, batch_first=kernels.batch_first,
                                device="meta", dtype=reference.dtype if reference is not None else None)
    for name in list(mha._parameters):
        mha._parameters[name] = params.get(name)
    for name, p in kernels.out_proj._parameters.items():
        mha.out_proj._parameters[name] = p
    mha.training = kernels.training
    mha.out_proj.training = kernels.out_proj.training
    return mha


def is_attention_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    try:
        return isinstance(gm.get_submodule(node.target), AttentionKernels)
    except AttributeError:
        return False


__all__ = ["AttentionKernels", "KERNEL_POSITIONS", "attention_call", "install_attention_kernels",
           "restore_attention", "is_attention_call"]
