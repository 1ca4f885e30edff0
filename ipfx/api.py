"""The public entry points: :func:`transform`, :func:`lower` and the helpers that inspect their result.

:func:`transform` captures the model (:func:`ipfx.capture.pipeline.capture`: torch.export or symbolic
tracing, checked against the model on example inputs), then runs a short list of named passes
(:class:`~ipfx.passes.manager.PassManager`, one contract for all of them):

    rewrite weights (each captured part's kernels -> coeff x mask x basis subgraphs)
      -> parametrize unreached weights (the selected weights no graph reads)
      -> guard fallbacks (the original modules, reading the same coefficients, for call patterns
         of optional arguments that a symbolic graph was not traced with; without example inputs,
         every traced graph is checked against its module on the first call of each kind)

:func:`lower`: settle first-call checks -> lower fused (target ``"fused"``) -> lower dense -> fold
parametrized weights. What the passes skipped comes back as one warning per kind, here at the API boundary.
Inputs are copied first, so the caller's model is never changed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .form.bases import BasisSpec
from .config import TransformConfig
from .errors import IPFXTypeError, IPFXValueError, NotTransformedError, user_stacklevel
from .capture.export import graph_module_of
from .inputs import as_args, as_kwargs
from .capture.modes import ModeSwitch, keep_eval_graphs
from .capture.source_attributes import FROZEN
from .form.parametrize import is_parametrized
from .capture.pipeline import FRONT_ENDS, capture as capture_graphs
from .passes.fold_batch_norm import FoldBatchNorm
from .passes.drop_fallbacks import DropFallbacks
from .passes.drop_unread_state import DropUnreadState
from .passes.fuse_epilogue import FuseEpilogue
from .passes.native_pooling import NativePooling
from .passes.guard_fallbacks import GuardFallbacks
from .passes.lower_dense import LowerDense
from .passes.lower_fused import LowerFused
from .passes.lower_model import FoldParametrized, SettleFirstCallChecks
from .passes.manager import PassManager
from .passes.parametrize_unreached import ParametrizeUnreached
from .passes.rewrite_weights import CoefficientFactory, RewriteWeights
from .form.reparam import BasisWeight, coefficient_weights, is_transformed, qualified_weight_name
from .inference import outside_inference_mode

TARGETS = ("dense", "fused")


def transform_passes(config: TransformConfig, factory: CoefficientFactory, check_first_calls: bool) -> PassManager:
    """The passes :func:`transform` runs on what :func:`ipfx.capture.pipeline.capture` returns, in order."""
    return PassManager([
        RewriteWeights(config, factory),
        ParametrizeUnreached(config, factory),
        GuardFallbacks(check_first_calls=check_first_calls),
    ], sites=_part_sites)


def _part_sites(captured) -> list:
    """The graphs of a captured model for the graph passes: each part's holder and where it sits."""
    return [(part.holder, dict(path=part.path, owners=captured.owners(part.path), inlined=part.inlined,
                               front_end=part.front_end)) for part in captured.parts]


def lower_passes(target: str, graphs: Sequence[fx.GraphModule | ModeSwitch], freeze: bool = False) -> PassManager:
    """The passes :func:`lower` runs on a copy of the transformed model, in order; ``graphs``: those of the
    copy that hold coefficient weights (found once, before any pass folds them). ``freeze``: the graphs are
    eval-mode graphs only, and what eval mode makes constant is folded into the fused ops."""
    sites = [(holder, {}) for holder in graphs]
    fused = [LowerFused()] if target == "fused" else []
    frozen = [FoldBatchNorm(), FuseEpilogue(), DropFallbacks(), NativePooling(), DropUnreadState()]
    frozen = frozen if freeze and target == "fused" else []
    return PassManager([SettleFirstCallChecks(), *fused, LowerDense(), FoldParametrized(), *frozen],
                       sites=lambda model: sites)


@outside_inference_mode
def transform(
    model: nn.Module | torch.export.ExportedProgram,
    *,
    space: str = "ip",
    basis: BasisSpec | None = None,
    train_basis: bool | None = None,
    share_basis: bool = False,
    config: TransformConfig | None = None,
    example_inputs: Any = None,
    example_kwargs: dict | None = None,
    capture: str = "auto",
    leaf_modules: Sequence[str | type] = (),
    inplace: bool = False,
    partial: bool = True,
    dynamic_shapes: Any = None,
) -> nn.Module:
    """Rewrite every conv (and linear) weight of ``model`` into coefficients x mask x basis.

    Each kernel parameter ``P`` becomes ``reshape((mask * coeff) @ basis, P.shape)`` in the captured
    graph (``mask * coeff`` for linear weights and 1x1-type kernels), with ``coeff = P @ inv(basis)``
    and ``mask = 1``, so the result computes what ``model`` computes, in train and eval mode. A selected
    weight that no graph reads (untraced code) is held the same way, composed on every read of
    ``module.weight``.

    Args:
        model: any ``nn.Module``, or a ``torch.export.ExportedProgram`` (captured in one mode: the
            result computes that mode in both).
        space: ``"ip"`` (interspace: an adaptive basis trained with the coefficients) or ``"sp"``
            (the spatial identity basis, frozen: standard pruning through the same code path).
        basis: initial IP basis: ``"dct"`` (default), ``"spatial"``, ``"random"``, a ``(K, K)``
            tensor or a callable ``kernel_size -> (K, K) tensor``.
        train_basis: train the IP basis (default) or keep it fixed.
        share_basis: one basis per kernel shape shared by all layers instead of one per layer.
        config: a :class:`TransformConfig` for finer control (filters, per-name overrides); it
            replaces ``space``/``basis``/``train_basis``/``share_basis``, which must then be left
            at their defaults.
        example_inputs: a tuple of positional arguments (a bare tensor is accepted), as for
            ``torch.export``; with them the model is captured by torch.export in both training modes
            and the capture is checked against the model on them.
        example_kwargs: keyword arguments of the example call (alone, or with ``example_inputs``). Other
            call patterns keep working: a model captured with ``labels=y`` may be called without them
            and the other way round; such calls run the model's own forward on the same coefficients.
        capture: ``"auto"`` (torch.export with example inputs, falling back to symbolic tracing;
            symbolic tracing without), ``"export"`` or ``"symbolic"``.
        leaf_modules: module names or types torch.fx must not trace into (symbolic front end); with
            ``partial`` they are captured on their own.
        inplace: share the model's tensors instead of copying them (saves memory; the original model
            must then not be used for training any more).
        dynamic_shapes: torch.export's own ``dynamic_shapes`` spec for the example call, for users who
            know which sizes vary (``{"x": {0: Dim("batch")}}``). By default every dimension of every
            tensor input is left free where the model allows (``Dim.AUTO``); sizes the model fixes or
            relates stay guarded: a call that breaks them raises an error naming the input and size.
        partial: when torch.fx cannot trace the whole model, trace its largest traceable parts and keep
            the rest as Python code (:mod:`ipfx.capture.partial`; a warning says what was not traced). With
            ``partial=False`` an untraceable model raises :class:`TraceError` naming the module.

    Returns:
        a ``torch.fx.GraphModule`` (or :class:`ModeSwitch`) when the model is captured as a whole, else
        a copy of the model whose captured parts are GraphModules; ``ipfx.rewritten_weights(result)``
        lists what was rewritten and which front end captured it. State dict: ``<prefix>.coeff``,
        ``<prefix>.mask`` and (``K > 1``) ``<prefix>.basis`` per rewritten parameter, where
        ``<prefix>`` is its name without ``.weight``.
    """
    args, kwargs = as_args(example_inputs), as_kwargs(example_kwargs)
    if args is None and kwargs:  # an example given by keyword alone is an example all the same
        args = ()
    if capture not in FRONT_ENDS:
        raise IPFXValueError(f"unknown capture={capture!r}; use one of {', '.join(map(repr, FRONT_ENDS))}")
    if capture == "export" and args is None and not isinstance(model, torch.export.ExportedProgram):
        raise IPFXValueError("capture='export' needs example inputs: pass example_inputs=(x,) (a tuple of the "
                             "forward's positional arguments) and, if any, example_kwargs={...}")
    exported_program = isinstance(model, torch.export.ExportedProgram)
    if exported_program:
        model, capture, args, inplace = graph_module_of(model, "ExportedProgram"), "export", None, False
    _check_module(model, "transform")
    _check_materialized(model)
    if is_transformed(model):
        raise IPFXValueError(
            f"this {type(model).__name__} was already transformed by ipfx (it holds coefficient "
            "weights); use it as it is, or call ipfx.lower(model) first to get a plain model back"
        )
    if config is None:
        config = TransformConfig(space=space, basis=basis, train_basis=train_basis, share_basis=share_basis)
    elif (space, basis, train_basis, share_basis) != ("ip", None, None, False):
        raise IPFXValueError(
            "pass either config=TransformConfig(...) or space/basis/train_basis/share_basis, not both; "
            "put those options into the config"
        )
    work = model if inplace else _copy(model)
    original = dict(work.named_modules())
    factory = CoefficientFactory(config)
    captured = capture_graphs(work, capture, config, args, kwargs, leaf_modules=leaf_modules, partial=partial,
                              reference=None if inplace else model, given_graph=exported_program,
                              dynamic_shapes=dynamic_shapes)
    passes = transform_passes(config, factory, check_first_calls=args is None and not exported_program)
    passes(captured)
    for path, reason in passes.result(GuardFallbacks.name).skipped.items():
        warnings.warn(f"{path}: {reason}; transform with example inputs of each call pattern the model is "
                      "called with", stacklevel=2)
    result, report = captured.model, captured.report
    if captured.fallback:
        warnings.warn(f"torch.export could not capture {type(model).__name__} ({captured.fallback}); "
                      "ipfx.transform captured it by symbolic tracing instead", stacklevel=2)
    if captured.fixed:
        warnings.warn(f"torch.export could not leave every input size of {type(model).__name__} free ({captured.fixed}); "
                      "the transformed model refuses other sizes with an error naming the input. Pass "
                      "dynamic_shapes=... (torch.export's spec) to say which sizes vary", stacklevel=2)
    for note in captured.notes:
        warnings.warn(note, stacklevel=2)
    if not report.whole:
        warnings.warn(f"torch.fx could not trace {type(model).__name__} as a whole; ipfx.transform "
                      f"{report}", stacklevel=2)
    for path, kind, mode, reason in report.one_mode:
        warnings.warn(
            f"torch.fx traced {path or '<root>'} ({kind}) in {mode} mode only: in the other mode its forward "
            f"failed ({reason}). The transformed model computes the {mode}-mode graph in both modes; make that "
            "forward traceable in both modes, or transform it as a leaf (leaf_modules=[...])", stacklevel=2)
    if exported_program:
        warnings.warn("an ExportedProgram holds the graph of one training mode; the transformed model computes "
                      "that mode in train and in eval mode. Pass the nn.Module with example_inputs=... to "
                      "capture both", stacklevel=2)
    _warn_raw_kernels(captured, config)
    _warn_lost_hooks(original, result)
    return result


def _check_materialized(model: nn.Module) -> None:
    """Lazy modules (``nn.LazyConv2d``, ``nn.LazyLinear``) have no weights before their first call: nothing to
    rewrite (without example inputs they stayed dense, silently) or to capture (with them, capture failed
    inside torch). Refused, saying to call the model once first."""
    lazy = [name for name, t in (*model.named_parameters(remove_duplicate=False),
                                 *model.named_buffers(remove_duplicate=False))
            if nn.parameter.is_lazy(t)]
    if lazy:
        raise IPFXValueError(
            f"{type(model).__name__} has lazy modules whose tensors do not exist before the first call "
            f"({', '.join(lazy[:4])}{' ...' if len(lazy) > 4 else ''}): call the model once on an input "
            "(model(x), which sets their sizes) and then ipfx.transform it")


def _warn_raw_kernels(captured, config: TransformConfig) -> None:
    """Kernel-shaped parameters of modules kept as Python code that were not rewritten: raw ones (``self.w``,
    3 dims or more) and the ``weight`` of a module of another type than ``config.module_types`` (transformers'
    ``Conv1D``, a linear layer whose weight torch.export captures as a kernel where example inputs are given).
    Without a graph nobody can tell whether they are kernels, so they stay as they are; say so, and name them,
    rather than leave them dense silently."""
    found = []
    for path, _, _ in captured.report.untraced:
        root = captured.model.get_submodule(path) if path else captured.model
        for name, module in _outside_graphs(root):
            if isinstance(module, BasisWeight):  # rewritten: its coeff is ipfx's, not a dense kernel
                continue
            prefix = f"{path}.{name}".strip(".") if name else path
            for pname, p in module._parameters.items():
                if not isinstance(p, nn.Parameter) or p.dim() < 2:
                    continue
                raw = pname != "weight" and p.dim() >= 3
                foreign = (pname == "weight" and not isinstance(module, config.module_types)
                           and not isinstance(module, _NOT_KERNELS))
                if raw or foreign:
                    found.append(f"{prefix}.{pname}" if prefix else pname)
    if found:
        warnings.warn(
            f"ipfx.transform kept {len(found)} kernel-shaped parameter(s) of untraced Python code dense: "
            f"{', '.join(found[:8])}{f' and {len(found) - 8} more' if len(found) > 8 else ''}. If they are "
            "kernels (F.conv*(x, self.w), transformers' Conv1D), pass example_inputs=... so torch.export can "
            "capture that code, or make it traceable", stacklevel=3)


#: modules whose 2-d ``weight`` is not a kernel (not named by _warn_raw_kernels)
_NOT_KERNELS = (nn.Embedding, nn.EmbeddingBag, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _outside_graphs(root: nn.Module):
    """``(name, module)`` of ``root``'s tree, without the modules inside a captured graph."""
    stack = [("", root)]
    while stack:
        name, module = stack.pop()
        if isinstance(module, fx.GraphModule):
            continue
        yield name, module
        stack.extend((f"{name}.{child}" if name else child, m) for child, m in reversed(module._modules.items())
                     if m is not None)


@outside_inference_mode
def lower(model: nn.Module, target: str = "dense", *, freeze: bool = False) -> nn.Module:
    """Fold the coefficient subgraphs of a transformed model back for deployment.

    ``target="dense"``: every weight is folded once, ``W = reshape((mask * coeff) @ basis)``, and
    standard conv/linear modules are restored; its graphs hold no ipfx module or function and run without
    ipfx (a model with one graph per training mode is held by an :class:`ipfx.ModeSwitch`, ipfx's; its state
    dict loads into the original class). ``target="fused"``: each convolution whose weight feeds nothing but convolutions
    becomes a sparse IP convolution storing only the kept coefficients and the basis
    (``torch.ops.ipfx.ip_conv``), linear layers a sparse linear; the others are folded as for
    ``"dense"``. Outputs equal the transformed model's up to float rounding. ``model`` is not changed.

    ``freeze=True`` (deployment, ``target="fused"``): the result computes the model's *eval-mode* function
    only (whatever mode ``model`` is in), in eval mode, and folds what that makes constant: every eval-mode batch norm after a fused
    convolution into its coefficients and bias, then a following residual ``add`` and activation (relu,
    relu6, silu, gelu, hardswish) into the op's epilogue, applied while each output tile is in cache. It
    keeps no train-mode graph, and its ``.train()`` raises (a train-mode call would compute eval mode): lower
    without ``freeze`` for a model that is still to be trained or calibrated. Nor does it keep a graph's fallback (the module's
    own forward, with a dense copy of every weight, for calls of another pattern of optional arguments:
    :mod:`ipfx.passes.drop_fallbacks`): call it as it was captured; such a call raises.
    """
    _check_module(model, "lower")
    if target not in TARGETS:
        raise IPFXValueError(f"unknown lowering target {target!r}; use one of {', '.join(map(repr, TARGETS))}")
    if not isinstance(freeze, bool):
        raise IPFXTypeError(f"freeze must be True or False, got {freeze!r}")
    if freeze and target != "fused":
        raise IPFXValueError("freeze=True folds batch norms into the fused ops: use it with target='fused' (a dense "
                             "lowering is plain torch: torch.ao.quantization.fuse_modules or an exporter folds those)")
    _graphs_holding_weights(model)  # raises NotTransformedError before any copy is made
    out = _copy(model)
    if freeze:
        out = keep_eval_graphs(out)
    passes = lower_passes(target, _graphs_holding_weights(out), freeze)
    passes(out)
    if freeze:  # .train() now raises rather than compute eval mode silently (CapturedGraphModule.train)
        for module in out.modules():
            if isinstance(module, fx.GraphModule):
                module.meta[FROZEN] = True
    unchecked = passes.result(SettleFirstCallChecks.name).skipped
    if unchecked:
        warnings.warn(
            f"ipfx.lower: {len(unchecked)} graph(s) traced without example inputs ({', '.join(sorted(unchecked)[:4])}) "
            "were never called, so never checked against their own forward; the lowered model runs them "
            "unchecked. Call the transformed model once on real inputs before lowering, or transform it "
            "with example_inputs=...", stacklevel=user_stacklevel())
    dense = passes.result(LowerFused.name).skipped if target == "fused" else {}
    if dense:
        listed = ", ".join(f"{p} ({r})" for p, r in list(dense.items())[:6])
        warnings.warn(f"lower(target='fused') kept {len(dense)} weight(s) dense: {listed}",
                      stacklevel=user_stacklevel())
    return out


@dataclasses.dataclass(frozen=True)
class WeightInfo:
    """One rewritten weight, as listed by :func:`rewritten_weights`."""

    name: str  # the original parameter's qualified name
    prefix: str  # where its coeff/mask/basis live
    shape: tuple[int, ...]
    kind: str  # "conv", "conv_transpose" or "linear"
    space: str  # "ip" or "sp"
    basis: str  # "dct", "spatial", "random", "custom" or "none" (SP form)
    trains_basis: bool
    kept: int
    total: int
    capture: str = "symbolic"  # "export", "symbolic" or "parametrized" (no graph reads it)

    def __str__(self) -> str:
        basis = self.basis + ("" if self.trains_basis or self.basis == "none" else " (fixed)")
        return (f"{self.name:40s} {str(self.shape):22s} {self.kind:14s} {self.space:3s} {basis:16s} "
                f"{self.kept}/{self.total}")


def rewritten_weights(model: nn.Module) -> list[WeightInfo]:
    """Every weight ``model`` holds in coefficient form, with its shape, space and kept count; a weight whose
    module is registered under two paths is listed under both, as in the state dict."""
    _check_module(model, "rewritten_weights")
    return [
        WeightInfo(qualified_weight_name(prefix, m), prefix, m.weight_shape, m.kind, m.space, m.basis_init, m.trains_basis,
                   m.kept(), m.mask.numel(), m.capture or "symbolic")
        for prefix, m in coefficient_weights(model)
    ]


def sparsity(model: nn.Module) -> float:
    """Fraction of masked coefficients over every prunable tensor of a transformed model."""
    _check_module(model, "sparsity")
    weights = [m for _, m in coefficient_weights(model, each_once=True)]  # tied aliases once
    if not weights:
        raise NotTransformedError(_not_transformed(model, "sparsity"))
    total = sum(m.mask.numel() for m in weights)
    kept = sum(int(torch.count_nonzero(m.mask)) for m in weights)
    return 1.0 - kept / total


# -- helpers --------------------------------------------------------------------------------------
def _graphs_holding_weights(model: nn.Module) -> list[fx.GraphModule | ModeSwitch]:
    """The GraphModules (or ModeSwitches) that directly hold the model's BasisWeights (usually the model)."""
    holders: dict[int, fx.GraphModule | ModeSwitch] = {}
    found = False

    def visit(module: nn.Module, graph: fx.GraphModule | ModeSwitch | None) -> None:
        nonlocal found
        if isinstance(module, (fx.GraphModule, ModeSwitch)):
            graph = module
        for child in module.children():
            if is_parametrized(child):
                found = True
                visit(child, graph)
            elif isinstance(child, BasisWeight):
                found = True
                if graph is None:
                    raise NotTransformedError(
                        f"{type(child).__name__} {child.weight_name!r} is not inside a traced graph; "
                        "only models returned by ipfx.transform (or modules containing them) can be lowered"
                    )
                holders[id(graph)] = graph
            else:
                visit(child, graph)

    if is_parametrized(model):
        found = True
    visit(model, None)
    if not found:
        raise NotTransformedError(_not_transformed(model, "lower"))
    return list(holders.values())


def _not_transformed(model: nn.Module, what: str) -> str:
    return (f"ipfx.{what} needs a model returned by ipfx.transform, but this {type(model).__name__} holds "
            "no coefficient weights: it was never transformed, or it was already lowered. "
            "Call ipfx.transform(model) first.")


def _check_module(model, what: str) -> None:
    if isinstance(model, type) and issubclass(model, nn.Module):
        raise IPFXTypeError(f"ipfx.{what} takes a model instance, got the class {model.__name__}; "
                            f"call ipfx.{what}({model.__name__}(...))")
    if not isinstance(model, nn.Module):
        raise IPFXTypeError(f"ipfx.{what} takes a torch.nn.Module, got {type(model).__name__}")


def _copy(model: nn.Module) -> nn.Module:
    try:
        with _old_weight_norms_set_aside(model) as recompute:
            result = copy.deepcopy(model)
        recompute(result)
        return result
    except Exception as exc:
        raise IPFXTypeError(
            f"could not copy {type(model).__name__} ({type(exc).__name__}: {exc}); ipfx copies the model "
            "so the original stays untouched. Make it deep-copyable, or pass inplace=True to transform"
        ) from exc


@contextlib.contextmanager
def _old_weight_norms_set_aside(model: nn.Module):
    """Let ``copy.deepcopy`` copy a model using the deprecated hook-based ``torch.nn.utils.weight_norm``.

    Its forward pre-hook stores the normalised weight as a plain tensor attribute computed from ``g`` and
    ``v`` (not a leaf, so torch refuses to deep-copy it). The attributes are taken off for the copy and put
    back; the caller recomputes them on the copy (they are a function of the copied ``g`` and ``v``)."""
    from torch.nn.utils.weight_norm import WeightNorm

    held = [(m, hook.name, m.__dict__.pop(hook.name)) for m in model.modules()
            for hook in m._forward_pre_hooks.values() if isinstance(hook, WeightNorm) and hook.name in m.__dict__]

    def recompute(copied: nn.Module) -> None:
        for m in copied.modules():
            for hook in m._forward_pre_hooks.values():
                if isinstance(hook, WeightNorm) and hook.name not in m.__dict__ and hook.name not in m._parameters:
                    with torch.no_grad():
                        setattr(m, hook.name, hook.compute_weight(m))

    try:
        yield recompute
    finally:
        for m, name, value in held:
            m.__dict__[name] = value


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _warn_lost_hooks(original: dict[str, nn.Module], result: nn.Module) -> None:
    """Hooks live on module objects; a module that is traced through is no longer called as one."""
    kept = {id(m) for m in result.modules()}
    lost = [f"{name or '<root>'} ({getattr(m, 'original_class', type(m)).__name__})" for name, m in original.items()
            if id(m) not in kept and any(getattr(m, h, None) for h in _HOOKS)]
    if lost:
        warnings.warn(
            f"hooks registered on {', '.join(lost)} will not run in the transformed model: ipfx traces "
            "through these modules (their weights become coefficient subgraphs); register the hooks on the "
            "transformed model's modules instead, or exclude the modules' weights with TransformConfig(exclude=...)",
            stacklevel=3,
        )
