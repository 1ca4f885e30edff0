"""Coefficient form for weights that no traced graph reaches, with ``torch.nn.utils.parametrize`` semantics.

A conv/linear weight can be read by code that no capture turned into a graph: a module kept as Python
by partial tracing (its forward does ``F.conv2d(x, self.weight)``), a leaf module, a weight read by
untraced outer code. Such a weight must still be held as ``coeff x mask x basis``, or pruning would
silently skip it. :func:`parametrize_weight` converts the module that owns it in place:

* its ``weight`` parameter is replaced by ``coeff`` (a parameter), ``mask`` (a persistent buffer) and,
  for ``K > 1``, ``basis``, registered on the module itself, so the state dict reads
  ``<prefix>.coeff``/``.mask``/``.basis`` as for a rewritten weight;
* the module's class becomes a subclass of :class:`ParametrizedWeight` (itself a
  :class:`~ipfx.form.reparam.BasisWeight`) and of its own class, keeping the own ``forward``: reading
  ``module.weight`` computes ``compose(coeff, mask, basis)`` on every read
  (:func:`ipfx.form.compose.compose_weight`), as a registered parametrization would, so the module's own
  code and any other reader run unchanged and gradients reach the coefficients.

Since the module *is* a ``BasisWeight``, pruning, ``ipfx.sparsity`` and ``ipfx.rewritten_weights`` see
it like every other coefficient weight. :func:`unparametrize` folds it back (dense lowering).
Function preservation: at conversion ``coeff = W @ inv(basis)`` and ``mask = 1``, so the composed weight
equals ``W`` up to float rounding.
"""

from __future__ import annotations

import torch.nn as nn

from .reparam import STATE_NAMES, BasisWeight

_CLASSES: dict[tuple[type, str], type] = {}
_FORM = "_ipfx_form"  # a converted module's form, where it shares another module's tensors
_COPIED = "_ipfx_copied"  # the plain attributes a conversion copied from the form, taken away when folded


class ParametrizedWeight(BasisWeight):
    """Mixin base of the converted classes (module docstring); never instantiated directly."""

    original_attr = "weight"  # the owner's parameter that became coefficients

    def forward(self, *args, **kwargs):  # replaced by the owner's own forward in every subclass
        raise NotImplementedError

    def extra_repr(self) -> str:
        own = self.original_class.extra_repr(self)
        return f"{own}, coefficient weight: {BasisWeight.extra_repr(self)}"

    def __reduce_ex__(self, protocol):
        # the generated class cannot be found by name: rebuild it from the owner's class
        return (_rebuild, (self.original_class, self.__getstate__(), self.original_attr))


def parametrized_class(cls: type, attr: str = "weight") -> type:
    """The class of a converted ``cls`` module whose parameter ``attr`` became coefficients (made once per
    class and name). Where ``attr`` is not ``weight`` (``nn.MultiheadAttention.in_proj_weight``), reading
    ``attr`` composes the weight too."""
    if issubclass(cls, ParametrizedWeight):
        return cls
    if (cls, attr) not in _CLASSES:
        members = {"forward": cls.forward, "original_class": cls, "original_attr": attr, "__module__": __name__}
        if attr != "weight":
            members[attr] = property(BasisWeight.compose, doc=f"The composed {attr} (module docstring).")
            members["weight"] = _OWN_WEIGHT  # the owner's own ``weight``, if it has one, stays its own
        _CLASSES[cls, attr] = type(f"Coefficient{cls.__name__}", (ParametrizedWeight, cls), members)
    return _CLASSES[cls, attr]


def _own_weight(self):
    try:
        return self.__dict__["weight"]
    except KeyError:
        raise AttributeError("weight") from None


def _set_own_weight(self, value) -> None:
    self.__dict__["weight"] = value


#: ``weight`` of a converted module whose coefficients replaced another parameter: a plain attribute, as
#: the owner had it (the deprecated hook-based weight norm composes ``weight`` from ``weight_g`` and the
#: converted ``weight_v`` and sets it before every call).
_OWN_WEIGHT = property(_own_weight, _set_own_weight)


def _rebuild(cls: type, state: dict, attr: str = "weight") -> nn.Module:
    module = parametrized_class(cls, attr).__new__(parametrized_class(cls, attr))
    module.__setstate__(state)
    return module


def parametrize_weight(owner: nn.Module, form: BasisWeight, attr: str = "weight") -> nn.Module:
    """Convert ``owner`` (holding parameter ``attr``, ``weight`` but for an attention layer's
    ``in_proj_weight``) to hold ``form``'s coefficients (module docstring).

    ``form`` is the :class:`BasisWeight` the rewrite pass would have installed for this weight; its
    state moves onto ``owner``. Returns ``owner``, converted.
    """
    clash = [n for n in STATE_NAMES if n in owner._parameters or n in owner._buffers or n in owner._modules]
    if clash:
        raise ValueError(f"{type(owner).__name__} already has attribute(s) {clash}")
    del owner._parameters[attr]
    owner.__class__ = parametrized_class(type(owner), attr)
    copied = [name for name in vars(form) if not name.startswith("_") and name != "training"]
    added = tuple(name for name in copied if name not in owner.__dict__)  # what unparametrize takes away again
    for name in copied:
        owner.__dict__[name] = form.__dict__[name]
    owner.__dict__[_COPIED] = added
    owner.register_parameter("coeff", form.coeff)
    owner.register_buffer("mask", form.mask, persistent=True)
    if isinstance(form.basis, nn.Parameter):
        owner.register_parameter("basis", form.basis)
    elif form.basis is not None:
        owner.register_buffer("basis", form.basis, persistent=True)
    else:
        owner.__dict__["basis"] = None
    if form is not owner:
        owner.__dict__[_FORM] = form
    return owner


def follow_form(module: nn.Module) -> None:
    """Point a converted module's ``coeff``/``mask``/``basis`` at its form's tensors again.

    ``Module.to``/``.cuda``/``.half`` replace buffers (``mask``) with new tensors, in the modules they
    visit only; a module converted to share a graph's form but kept outside the module tree (a guarded
    graph's fallback, :mod:`ipfx.capture.guards`) would keep the old ones, in the old dtype or device.
    """
    form = module.__dict__.get(_FORM)
    if form is None:
        return
    for name in STATE_NAMES:
        for store in ("_parameters", "_buffers"):
            table = getattr(form, store)
            if name in table:
                getattr(module, store)[name] = table[name]


def weight_holders(modules) -> dict[int, list[nn.Module]]:
    """Modules holding each ``weight`` parameter, by the parameter's id (more than one: a tie)."""
    holders: dict[int, list[nn.Module]] = {}
    for module in {id(m): m for m in modules}.values():  # a module listed twice (held under two paths) once
        weight = module._parameters.get("weight")
        if isinstance(weight, nn.Parameter):
            holders.setdefault(id(weight), []).append(module)
    return holders


def parametrize_tied(holders: dict[int, list[nn.Module]], weight: nn.Parameter, form: BasisWeight) -> None:
    """:func:`parametrize_weight` every module holding ``weight``, all with ``form``'s one set of tensors."""
    for holder in holders[id(weight)]:
        parametrize_weight(holder, form)


def unparametrize(module: ParametrizedWeight, folded: dict | None = None) -> nn.Module:
    """Fold ``module`` back into its own class holding a plain ``weight`` parameter (dense lowering).

    ``folded`` (by ``id(coeff)``) makes modules that share coefficients (a tie) share the folded weight.
    """
    folded = {} if folded is None else folded
    key = id(module.coeff)
    if key not in folded:
        folded[key] = nn.Parameter(module.fold(), requires_grad=module.coeff.requires_grad)
    weight = folded[key]
    for name in STATE_NAMES:
        module._parameters.pop(name, None)
        module._buffers.pop(name, None)
        module.__dict__.pop(name, None)
    for name in (*module.__dict__.get(_COPIED, ()), _COPIED, _FORM):
        module.__dict__.pop(name, None)
    attr = module.original_attr
    module.__class__ = module.original_class
    module.register_parameter(attr, weight)
    return module


def is_parametrized(module: nn.Module) -> bool:
    return isinstance(module, ParametrizedWeight)


__all__ = ["ParametrizedWeight", "parametrize_weight", "parametrize_tied", "weight_holders", "unparametrize",
           "is_parametrized", "follow_form"]
