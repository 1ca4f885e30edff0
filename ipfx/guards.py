"""Guards for what symbolic tracing specialises: which optional arguments are ``None``.

torch.fx runs ``forward`` on proxies, so ``if mask is None`` is decided at trace time: a placeholder for
an optional argument is never ``None``, and a graph traced with it present computes the wrong branch
(or crashes) when the caller leaves it out, and the other way round. Symbolic capture therefore

1. traces each forward with a *call pattern*: its arguments that are ``None`` become concrete ``None``
   (``concrete_args``), the others placeholders. The pattern is the one seen on the example inputs when
   they are given (:func:`record_patterns`: any argument passed ``None``, with a default or without),
   else "every optional argument left at its default ``None``" (how most callers call);
2. records the pattern on the graph (:class:`CallPattern`), and checks every call against it
   (:func:`guarded_call`): a call that matches runs the graph; one that does not runs the module's own
   forward instead, with one warning per graph. That fallback is the original module, whose weights
   share the graph's coefficients (:mod:`ipfx.parametrize`), so both paths compute the same function
   of the same trained tensors.

Forwards with ``*args``/``**kwargs`` are traced as before (no pattern): their optional arguments
cannot be named.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any

import torch.nn as nn

from . import first_call

PATTERN = "ipfx_call_pattern"  # GraphModule.meta key
FALLBACK = "ipfx_fallback"  # GraphModule.meta key: the module whose forward runs for other patterns


@dataclasses.dataclass(frozen=True)
class CallPattern:
    """The forward's parameters, in order, and which optional ones the graph assumes ``None`` or present.

    Stored on the graph as a plain tuple (:meth:`as_tuple`), so a saved graph needs no ipfx class.
    """

    names: tuple[str, ...]
    none: frozenset[str]  # traced as concrete None
    present: frozenset[str]  # optional, traced as placeholders (a value was given)
    defaults: tuple = ()  # (name, default) of the other parameters with defaults

    def as_tuple(self) -> tuple:
        return (self.names, tuple(sorted(self.none)), tuple(sorted(self.present)), self.defaults)

    @classmethod
    def of(cls, value: tuple) -> "CallPattern":
        names, none, present, defaults = value
        return cls(tuple(names), frozenset(none), frozenset(present), tuple(defaults))

    def positional(self, bound: dict) -> list:
        """The call as positional arguments (the traced signature renames specialised ones: mask -> mask_1)."""
        defaults = dict(self.defaults)
        used = [i for i, n in enumerate(self.names) if n in bound or n in self.none]
        last = used[-1] if used else -1
        return [bound[n] if n in bound else (None if n in self.none else defaults[n]) for n in self.names[: last + 1]]

    def matches(self, bound: dict) -> bool:
        return (all(bound.get(n) is None for n in self.none)
                and all(bound.get(n) is not None for n in self.present))

    def __str__(self) -> str:
        parts = [f"{n}=None" for n in self.names if n in self.none]
        parts += [f"{n} given" for n in self.names if n in self.present]
        return ", ".join(parts)


def optional_parameters(module: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...], tuple] | None:
    """(all parameter names, the ones whose default is ``None``, (name, default) of the others with a
    default) of ``module.forward``; None when the signature has ``*args``/``**kwargs`` or keyword-only
    parameters."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None
    params = list(signature.parameters.values())
    if any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
        return None
    empty = inspect.Parameter.empty
    return (tuple(p.name for p in params), tuple(p.name for p in params if p.default is None),
            tuple((p.name, p.default) for p in params if p.default is not empty and p.default is not None))


def pattern_for(module: nn.Module, observed: frozenset[str] | None) -> CallPattern | None:
    """The pattern to trace ``module`` with; ``observed``: its arguments that were ``None`` on the example
    inputs, whether or not their default is ``None`` (``forward(x, length)`` called with ``length=None``:
    traced as the constant ``None``, not as a placeholder the code would compute with). Without an
    observation every argument whose default is ``None`` is assumed ``None``."""
    found = optional_parameters(module)
    if found is None:
        return None
    names, optional, defaults = found
    none = frozenset(optional) if observed is None else frozenset(names) & observed
    if not none and not optional:
        return None
    return CallPattern(names, none, frozenset(optional) - none, defaults)


def record_patterns(model: nn.Module, run) -> dict[str, frozenset[str]]:
    """Per module path, the arguments that were ``None`` in its first call during ``run()`` that returned.

    Recorded when the forward returns, not when it starts: a caller that tries one signature and falls back
    to another (``try: layer(x, lengths=l) except TypeError: layer(x)``) makes a first call that fails
    before the forward runs, and that is not how the module is used.
    """
    seen: dict[str, frozenset[str]] = {}
    hooks = []
    for path, module in model.named_modules():
        found = optional_parameters(module)
        if found is None:
            continue
        names = found[0]

        def hook(m, args, kwargs, output, path=path, names=names):
            if path not in seen:
                bound = dict(zip(names, args))
                bound.update(kwargs)
                seen[path] = frozenset(n for n in names if bound.get(n) is None)

        hooks.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def follow_forms(graphs) -> None:
    """After ``Module._apply`` (``.to()``, ``.cuda()``, ``.half()``): the fallbacks of ``graphs``, kept outside
    the module tree, read the graphs' converted tensors again (:func:`ipfx.parametrize.follow_form`)."""
    from .parametrize import follow_form

    for gm in graphs:
        fallback = gm.meta.get(FALLBACK)
        if fallback is not None:
            for module in fallback.modules():
                follow_form(module)


def guarded_call(gm, call, args: tuple, kwargs: dict) -> Any:
    """Run ``call`` (the graph) when the arguments match its pattern, else the fallback (module docstring);
    where the graph was traced without example inputs, checked on first calls (:mod:`ipfx.first_call`)."""
    fallback = gm.meta.get(FALLBACK)
    stored = gm.meta.get(PATTERN)
    graph_call = lambda: call(*args, **kwargs)  # noqa: E731
    if stored is not None:
        pattern = CallPattern.of(stored)
        bound = dict(zip(pattern.names, args))
        bound.update(kwargs)
        if len(args) <= len(pattern.names) and not set(bound) - set(pattern.names):
            if pattern.matches(bound):
                graph_call = lambda: call(*pattern.positional(bound))  # noqa: E731
            else:
                return _other_pattern(gm, pattern, bound, fallback, args, kwargs)
        # else: not a call of this signature; let the graph say what is wrong
    if fallback is not None and first_call.CHECK in gm.meta:
        return first_call.checked_call(gm, graph_call, fallback, args, kwargs)
    return graph_call()


def _other_pattern(gm, pattern: CallPattern, bound: dict, fallback, args: tuple, kwargs: dict) -> Any:
    given = ", ".join(f"{n}={'None' if bound.get(n) is None else 'given'}" for n in pattern.names
                      if n in pattern.none | pattern.present)
    if fallback is None:
        raise RuntimeError(
            f"this graph of {type(gm).__name__} was traced with {pattern} but called with {given}, and it has "
            "no fallback; transform the model with example inputs of this call (example_inputs=...)")
    if not gm.__dict__.get("_ipfx_warned"):
        gm.__dict__["_ipfx_warned"] = True
        warnings.warn(
            f"{type(gm).__name__} was traced with {pattern} but is called with {given}: running its own forward "
            "(same coefficients, no graph) for such calls. To capture this call pattern, transform with "
            "example_inputs of it", stacklevel=4)
    first_call.sync_training(fallback, gm)
    return fallback(*args, **kwargs)
