"""Saliency scores on coefficients: one function per method, "higher is kept".

Every score is computed on ``coeff`` (never on the composed weight), so a method is the same for SP
and IP: only the basis differs. Scores of coefficients that are already masked are set to ``-inf`` by
the caller. Scoring never changes the model: gradients, batch-norm statistics and parameters are
restored afterwards (SynFlow works on a copy).

* random: i.i.d. uniform.
* magnitude: ``|coeff_j| * ||F_j||``, i.e. ``|coeff|`` after rescaling every basis row ``F_j`` to unit
  norm (function-preserving), so magnitudes compare across layers and bases.
* snip (Lee et al. 2019): ``|coeff * dL/dcoeff|``, gradients summed over the batches used.
* grasp (Wang et al. 2020): GraSP removes the largest ``-coeff * (H g)``; as a keep-score that is
  ``coeff * (H g)``, with ``g`` the loss gradient and ``H g`` its Hessian-vector product, logits divided by
  a temperature (200 in the paper).
* synflow (Tanaka et al. 2020): data-free and iterative: in double precision, with absolute values
  of all parameters, batch norm in eval mode and an all-ones input, ``R = sum(model(1))`` and the score
  is ``coeff * dR/dcoeff``; pruning follows the exponential schedule ``density_k = density^(k/n)``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from ..inputs import is_shape
from ..errors import IPFXValueError
from . import distributed
from .targets import Target, targets as find_targets


@dataclasses.dataclass
class ScoreContext:
    model: nn.Module
    targets: list[Target]
    data: Iterable | None = None
    loss_fn: Callable | None = None
    batches: int = 1
    example_inputs: Any = None
    generator: torch.Generator | None = None
    temperature: float = 200.0
    # averages gradient-type tensors over ranks (torch.distributed), so every rank scores with all the data
    reduce: Callable[[Sequence[torch.Tensor]], None] = distributed.all_reduce_mean_


def random_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    return [torch.rand(t.coeff.shape, generator=ctx.generator).to(t.coeff.device) for t in ctx.targets]


def magnitude_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    return [(t.coeff.detach().abs() * _row_norms(t)).float() for t in ctx.targets]


def snip_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    params = [t.coeff for t in ctx.targets]
    grads = [torch.zeros_like(p) for p in params]
    with _preserved(ctx.model):
        for inputs, labels in _batches(ctx):
            loss = _loss(ctx, _forward(ctx.model, inputs), labels)
            for g, d in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
                if d is not None:
                    g.add_(d)
    ctx.reduce(grads)
    return [(p.detach() * g).abs().float() for p, g in zip(params, grads)]


def grasp_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    params = [t.coeff for t in ctx.targets]
    batches = list(_batches(ctx))
    with _preserved(ctx.model):
        g = [torch.zeros_like(p) for p in params]
        for inputs, labels in batches:
            loss = _loss(ctx, _forward(ctx.model, inputs) / ctx.temperature, labels)
            for acc, d in zip(g, torch.autograd.grad(loss, params, allow_unused=True)):
                if d is not None:
                    acc.add_(d)
        ctx.reduce(g)
        hg = [torch.zeros_like(p) for p in params]
        for inputs, labels in batches:
            loss = _loss(ctx, _forward(ctx.model, inputs) / ctx.temperature, labels)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            z = sum((d * v).sum() for d, v in zip(grads, g) if d is not None)
            for acc, d in zip(hg, torch.autograd.grad(z, params, allow_unused=True)):
                if d is not None:
                    acc.add_(d)
        ctx.reduce(hg)
    return [(p.detach() * h).float() for p, h in zip(params, hg)]


def synflow_scores_of(model: nn.Module, ones: torch.Tensor) -> list[torch.Tensor]:
    """One SynFlow round on ``model`` (already linearised: absolute values, eval mode, float64)."""
    params = [t.coeff for t in find_targets(model)]
    model.zero_grad(set_to_none=True)
    out = _forward(model, ones)
    total = out.sum() if isinstance(out, torch.Tensor) else sum(o.sum() for o in _tensors(out))
    grads = torch.autograd.grad(total, params, allow_unused=True)
    return [(p.detach() * (d if d is not None else torch.zeros_like(p))) for p, d in zip(params, grads)]


@torch.no_grad()
def linearised_copy(model: nn.Module) -> nn.Module:
    """SynFlow's network: a float64 copy in eval mode with every parameter and buffer made absolute.

    Bases are rescaled to unit-norm rows first (function-preserving), so coefficient scores compare
    across layers the way magnitudes do.
    """
    work = copy.deepcopy(model).double().eval()
    for t in find_targets(work):
        t.module.normalize_basis_()
    for p in work.parameters():
        p.abs_()
    masks = {id(t.mask) for t in find_targets(work)}
    for b in work.buffers():
        if b.is_floating_point() and id(b) not in masks:
            b.abs_()
    return work


def example_ones(ctx: ScoreContext) -> torch.Tensor:
    """An all-ones input (batch 1) shaped like ``example_inputs`` (a tensor or a shape) or the data."""
    ex = ctx.example_inputs
    if ex is None and ctx.data is not None:
        ex = next(iter(_batches(ctx)))[0]
    if ex is None:
        raise IPFXValueError(
            "synflow is data-free but needs the input shape: pass example_inputs=<a tensor or its shape>, "
            "or data=..."
        )
    if is_shape(ex):
        shape = tuple(ex)
    elif isinstance(ex, (tuple, list)) and len(ex) == 1 and isinstance(ex[0], torch.Tensor):
        shape = tuple(ex[0].shape)  # example_inputs=(x,): a tuple of positional arguments, as in transform
    elif isinstance(ex, torch.Tensor):
        shape = tuple(ex.shape)
    else:
        raise IPFXValueError(
            "example_inputs must be a tuple with one input tensor (example_inputs=(x,)), a tensor or a shape "
            f"tuple, got {type(ex).__name__}" + (f" of {len(ex)} items" if isinstance(ex, (tuple, list)) else ""))
    return torch.ones((1, *shape[1:]), dtype=torch.float64, device=_device(ctx.model))


# -- helpers ---------------------------------------------------------------------------------------
def _row_norms(t: Target) -> torch.Tensor:
    basis = t.module.basis
    if not t.module.multiplies_basis:
        return torch.ones((), device=t.coeff.device)
    return basis.detach().norm(dim=1)


def _batches(ctx: ScoreContext):
    """The first ``ctx.batches`` ``(inputs, targets)`` pairs of ``ctx.data``; a score from no data at all
    would be all zeros and prune arbitrarily, so none is an error, as is an item that is not a pair."""
    if ctx.data is None:
        raise IPFXValueError("this pruning method scores on data: pass data=<an iterable of (inputs, targets) batches>")
    seen = 0
    for item in itertools.islice(iter(ctx.data), ctx.batches):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise IPFXValueError(
                "data must yield (inputs, targets) pairs, got "
                + (f"a {type(item).__name__} of {len(item)} items" if isinstance(item, (tuple, list))
                   else f"a {type(item).__name__}"))
        seen += 1
        inputs, labels = item
        yield _to(inputs, ctx.model), _to(labels, ctx.model)
    if not seen:
        raise IPFXValueError(
            "data gave no batches to score on (an empty dataset, or a DataLoader with drop_last=True and fewer "
            "samples than one batch); pass data with at least one (inputs, targets) batch")


def _loss(ctx: ScoreContext, output, labels) -> torch.Tensor:
    loss = ctx.loss_fn(output, labels)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise IPFXValueError(f"loss_fn must return one number (a scalar tensor) to score on, got {shape}; "
                             "reduce it (reduction='mean')")
    return loss.reshape(())


def _forward(model: nn.Module, inputs):
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def _to(value, model):
    device = _device(model)
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, model) for v in value)
    return value


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _tensors(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):
        for v in out.values():
            yield from _tensors(v)
    elif isinstance(out, (tuple, list)):
        for v in out:
            yield from _tensors(v)


@contextlib.contextmanager
def _preserved(model: nn.Module):
    """Restore gradients and buffers (batch-norm statistics) changed by scoring passes."""
    grads = {id(p): p.grad for p in model.parameters()}
    masks = {id(t.mask) for t in find_targets(model)}
    buffers = [(b, b.clone()) for b in model.buffers() if id(b) not in masks]
    try:
        yield
    finally:
        for p in model.parameters():
            p.grad = grads.get(id(p))
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


SCORES: dict[str, Callable[[ScoreContext], list[torch.Tensor]]] = {
    "random": random_scores,
    "magnitude": magnitude_scores,
    "snip": snip_scores,
    "grasp": grasp_scores,
}
DATA_DRIVEN = ("snip", "grasp")
