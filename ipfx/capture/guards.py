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
   share the graph's coefficients (:mod:`ipfx.form.parametrize`), so both paths compute the same function
   of the same trained tensors.

Forwards with ``*args``/``**kwargs`` are traced as before (no pattern): their optional arguments
cannot be named.

torch.export specialises the same way, and more: an exported graph takes exactly the arguments of the
example call, in its layout (positional or keyword), and fixes every non-tensor argument's value. A
Hugging Face classifier exported with ``labels`` computes the loss and needs ``labels`` on every call;
exported without, it has no ``labels`` input. The export front end therefore records the example call
(:class:`ExampleCall`): which arguments were given (not left at their default) and, for each, its form
(a tensor, or a structure of tensors and constants, the constants by value). A call that gives the same
arguments in the same forms runs the graph, rearranged into the example's layout; any other call runs the
fallback, as above. Forwards with ``**kwargs`` are covered (the extra names are arguments like any other).

Either kind of graph reports the original forward's signature (:func:`sign`), so ``inspect.signature``,
torch.export's ``dynamic_shapes`` and a trainer that picks dataset columns by the forward's argument names
see the model's arguments, ``labels=None`` included.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
import weakref
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from . import first_call, replaced
from ..errors import user_stacklevel

PATTERN = "ipfx_call_pattern"  # GraphModule.meta key
FALLBACK = "ipfx_fallback"  # GraphModule.meta key: the module whose forward runs for other patterns
SIGNATURE = "ipfx_signature"  # GraphModule.meta key: the captured forward's signature, kept without a fallback
NO_FALLBACK = "ipfx_no_fallback"  # GraphModule.meta key: why a guarded graph has no fallback (for its error)


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

    def bind(self, args: tuple, kwargs: dict) -> dict | None:
        """The call's arguments by name; None where it is not a call of this signature."""
        bound = dict(zip(self.names, args))
        bound.update(kwargs)
        return bound if len(args) <= len(self.names) and not set(bound) - set(self.names) else None

    def graph_call(self, bound: dict) -> tuple[list, dict]:
        return self.positional(bound), {}

    def describe(self, bound: dict) -> str:
        return ", ".join(f"{n}={'None' if bound.get(n) is None else 'given'}" for n in self.names
                         if n in self.none | self.present)

    def __str__(self) -> str:
        parts = [f"{n}=None" for n in self.names if n in self.none]
        parts += [f"{n} given" for n in self.names if n in self.present]
        return ", ".join(parts)


_CONSTANTS = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device)
_TENSOR = "<tensor>"


def _form(value) -> tuple | None:
    """What an exported graph fixes about an argument: its pytree structure, tensors as such and every
    other leaf by value; None where a leaf is neither a tensor nor a plain constant (not recordable)."""
    leaves, spec = tree_flatten(value)
    if any(not isinstance(leaf, (torch.Tensor, *_CONSTANTS)) for leaf in leaves):
        return None
    return (str(spec), tuple(_TENSOR if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves))


@dataclasses.dataclass(frozen=True)
class ExampleCall:
    """The call a graph was exported with (module docstring): the forward's named parameters, the layout
    the graph takes (its first ``positional`` names positionally, then ``keywords``), the form of every
    argument given, and the value the example had for the layout's other arguments (``None`` or the
    default), which the graph receives whenever a call leaves them out too."""

    names: tuple[str, ...]
    var_keyword: bool  # the forward has **kwargs: other names are arguments too
    defaults: tuple  # (name, default) of every named parameter with a default
    positional: int
    keywords: tuple[str, ...]
    given: tuple  # (name, form) of the example's given arguments
    filled: tuple  # (name, value) of the layout's arguments the example left at None or the default

    def as_tuple(self) -> tuple:
        return ("export", self.names, self.var_keyword, self.defaults, self.positional, self.keywords,
                self.given, self.filled)

    @classmethod
    def record(cls, forward, args: tuple, kwargs: dict) -> "ExampleCall | None":
        """The example call of ``forward`` (a bound method); None where it cannot be recorded (``*args``
        beyond the named parameters, keyword-only parameters, an argument that is neither tensors nor
        plain constants)."""
        try:
            params = list(inspect.signature(forward).parameters.values())
        except (TypeError, ValueError):
            return None
        kinds = {p.kind for p in params}
        if kinds - {inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_KEYWORD}:
            return None
        named = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        names = tuple(p.name for p in named)
        defaults = tuple((p.name, p.default) for p in named if p.default is not inspect.Parameter.empty)
        if len(args) > len(names):
            return None
        pattern = cls(names, inspect.Parameter.VAR_KEYWORD in kinds, defaults, len(args), tuple(kwargs), (), ())
        bound = pattern.bind(args, kwargs)
        if bound is None:
            return None
        given = pattern._given(bound)
        if given is None:
            return None
        layout = names[: len(args)] + tuple(kwargs)
        filled = tuple((n, bound[n]) for n in layout if n not in given)
        return dataclasses.replace(pattern, given=tuple(given.items()), filled=filled)

    @classmethod
    def of(cls, value: tuple) -> "ExampleCall":
        return cls(*value[1:])

    @functools.cached_property
    def _defaults(self) -> dict:
        return dict(self.defaults)

    @functools.cached_property
    def _given_forms(self) -> dict:
        return dict(self.given)

    def bind(self, args: tuple, kwargs: dict) -> dict | None:
        bound = dict(zip(self.names, args))
        if len(args) > len(self.names) or set(bound) & set(kwargs):
            return None
        bound.update(kwargs)
        if not self.var_keyword and set(bound) - set(self.names):
            return None
        return bound

    def _given(self, bound: dict) -> dict | None:
        """Name -> form of the arguments ``bound`` gives: not left at the default (``None`` counts as left
        out for a parameter whose default is ``None`` and for a ``**kwargs`` name)."""
        defaults = self._defaults
        given = {}
        for name, value in bound.items():
            if name in defaults:
                default, form = defaults[name], _form(value)
                if value is default or (type(value) is type(default) and form is not None
                                        and _TENSOR not in form[1] and form == _form(default)):
                    continue
            elif name not in self.names and value is None:
                continue
            form = _form(value)
            if form is None:
                return None
            given[name] = form
        return given

    def matches(self, bound: dict) -> bool:
        return self._given(bound) == self._given_forms

    def graph_call(self, bound: dict) -> tuple[list, dict]:
        given, filled = self._given_forms, dict(self.filled)
        value = lambda n: bound[n] if n in given else filled[n]  # noqa: E731
        return [value(n) for n in self.names[: self.positional]], {k: value(k) for k in self.keywords}

    def describe(self, bound: dict) -> str:
        given = self._given(bound)
        return f"({', '.join(given)}) given" if given else "no argument given"

    def __str__(self) -> str:
        return f"({', '.join(n for n, _ in self.given)}) given" if self.given else "no argument given"


def pattern_of(value: tuple) -> CallPattern | ExampleCall:
    """The pattern stored on a graph (``meta[PATTERN]``), of either kind."""
    return ExampleCall.of(value) if value and value[0] == "export" else CallPattern.of(value)


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


def signature_of(gm) -> inspect.Signature | None:
    """The signature of the forward ``gm`` was captured from (its fallback's, or the one kept when the
    fallback was dropped), or None without either."""
    meta = gm.__dict__.get("meta", {})
    if meta.get(SIGNATURE) is not None:
        return meta[SIGNATURE]
    fallback = meta.get(FALLBACK)
    if fallback is None:
        return None
    try:
        return inspect.signature(fallback.forward)
    except (TypeError, ValueError):
        return None


def sign(gm) -> None:
    """Make ``gm.forward`` report the captured forward's signature (module docstring). The generated
    ``forward`` lives on the graph module's own class (torch.fx makes one per instance) and is replaced by
    every recompile, so this runs again after each (:class:`ipfx.capture.source_attributes.CapturedGraphModule`)."""
    signature = signature_of(gm)
    forward = type(gm).__dict__.get("forward")
    if signature is None or forward is None:
        return
    own = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = signature.replace(parameters=[own, *signature.parameters.values()])


def follow_forms(graphs) -> None:
    """After ``Module._apply`` (``.to()``, ``.cuda()``, ``.half()``): the fallbacks of ``graphs``, kept outside
    the module tree, read the graphs' converted tensors again (:func:`ipfx.form.parametrize.follow_form`), and
    their buffers the graph's at the same paths (shared at capture: a fallback's batch-norm statistics or counter
    stayed unconverted, and its updates no longer reached the transformed model's state)."""
    from ..form.parametrize import follow_form

    for gm in graphs:
        fallback = gm.meta.get(FALLBACK)
        if fallback is not None:
            for module in fallback.modules():
                follow_form(module)
            for path, _ in list(fallback.named_buffers(remove_duplicate=False)):
                try:
                    first_call.rebind_buffer(fallback, path, gm.get_buffer(path))
                except AttributeError:  # (the graph holds no buffer there)
                    continue


def guarded_call(gm, call, args: tuple, kwargs: dict) -> Any:
    """Run ``call`` (the graph) when the arguments match its pattern, else the fallback (module docstring);
    where the graph was traced without example inputs, checked on first calls (:mod:`ipfx.capture.first_call`)."""
    fallback = gm.meta.get(FALLBACK)
    stored = gm.meta.get(PATTERN)
    graph_call = lambda: call(*args, **kwargs)  # noqa: E731
    if stored is not None:
        pattern = _parsed(gm, stored)
        bound = pattern.bind(args, kwargs)
        if bound is not None:
            if pattern.matches(bound):
                graph_args, graph_kwargs = pattern.graph_call(bound)
                graph_call = lambda: call(*graph_args, **graph_kwargs)  # noqa: E731
            else:
                return _other_pattern(gm, pattern, bound, fallback, args, kwargs)
        # else: not a call of this signature; let the graph say what is wrong
    if fallback is not None and first_call.CHECK in gm.meta:
        return first_call.checked_call(gm, graph_call, fallback, args, kwargs)
    try:
        return graph_call()
    except Exception as exc:  # a module replaced since capture: say so (ipfx.capture.replaced)
        problem = replaced.changed_after_capture(gm)
        if problem is None:
            raise
        raise replaced.replaced_error(gm, problem) from exc


_PARSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # graph -> (stored tuple, its pattern)


def _parsed(gm, stored: tuple) -> CallPattern | ExampleCall:
    """The pattern stored on ``gm``, parsed once per graph. Kept beside the graph, not on it: a saved graph
    holds the plain tuple only, and loads without ipfx."""
    cached = _PARSED.get(gm)
    if cached is None or cached[0] is not stored:
        cached = _PARSED[gm] = (stored, pattern_of(stored))
    return cached[1]


def _other_pattern(gm, pattern, bound: dict, fallback, args: tuple, kwargs: dict) -> Any:
    given = pattern.describe(bound)
    if fallback is None:
        why = gm.meta.get(NO_FALLBACK) or "transform the model with example inputs of this call (example_inputs=...)"
        raise RuntimeError(
            f"this graph of {type(gm).__name__} was captured with {pattern} but called with {given}, and it has "
            f"no fallback; {why}")
    if not gm.__dict__.get("_ipfx_warned"):
        gm.__dict__["_ipfx_warned"] = True
        warnings.warn(
            f"{type(gm).__name__} was captured with {pattern} but is called with {given}: running its own forward "
            "(same coefficients, no graph) for such calls. To capture this call pattern, transform with "
            "example_inputs of it", stacklevel=user_stacklevel())
    replaced.check_unchanged(gm)
    first_call.sync_training(fallback, gm)
    return fallback(*args, **kwargs)
