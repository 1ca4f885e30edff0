"""The module that holds one weight in coefficient form.

:class:`BasisWeight` owns, for one original weight parameter ``W`` of shape ``weight_shape``:

* ``coeff`` (``nn.Parameter``): the coefficients, shape ``(w0, w1, K)`` for a kernel with ``K > 1``
  (``w0, w1`` are the first two weight dims), or the weight's own shape in SP form (``K = 1`` kernels
  and linear weights, which have nothing to gain from a basis);
* ``mask`` (persistent buffer, same shape and dtype as ``coeff``, entries 0/1);
* ``basis``: ``(K, K)``, an ``nn.Parameter`` when trained, a buffer when fixed (SP, or IP with
  ``train_basis=False``), ``None`` in SP form.

so that ``W = reshape((mask * coeff) @ basis, weight_shape)`` (``W = mask * coeff`` in SP form).

It sits at the module path of the original weight's owner (``layer1.0.conv1``), so the state_dict
reads ``layer1.0.conv1.coeff``/``.mask``/``.basis`` next to the untouched ``layer1.0.conv1.bias``: the
owner's other attributes (bias, buffers, child modules) are adopted unchanged. The transformed graph
reads ``coeff``, ``mask`` and ``basis`` through ``get_attr`` nodes and composes the weight with
explicit ``mul``/``matmul``/``reshape`` nodes; :meth:`compose` is the same computation in eager form,
used by lowering and by pruning.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import torch
import torch.nn as nn

from .compose import compose_weight


@dataclasses.dataclass(frozen=True)
class ModuleSpec:
    """How to rebuild a standard ``nn.ConvNd``/``nn.Linear`` that the transform traced through.

    Lowering uses it to put back an ordinary module where the original model had one.
    """

    cls: type
    kwargs: tuple[tuple[str, Any], ...]
    training: bool

    @classmethod
    def of(cls, module: nn.Module) -> "ModuleSpec":
        if isinstance(module, nn.Linear):
            kw = dict(in_features=module.in_features, out_features=module.out_features,
                      bias=module.bias is not None)
        else:  # nn.modules.conv._ConvNd
            kw = dict(in_channels=module.in_channels, out_channels=module.out_channels,
                      kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
                      dilation=module.dilation, groups=module.groups, bias=module.bias is not None,
                      padding_mode=module.padding_mode)
            if module.transposed:
                kw["output_padding"] = module.output_padding
        return cls(type(module), tuple(kw.items()), module.training)

    def build(self, weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Module:
        """A fresh module of the original type holding ``weight`` and ``bias`` (no re-initialisation)."""
        module = self.cls(**dict(self.kwargs), device="meta", dtype=weight.dtype)
        module.weight = weight
        module.bias = bias
        module.training = self.training
        return module

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.kwargs).get(key, default)


class BasisWeight(nn.Module):
    """One weight expressed as ``reshape((mask * coeff) @ basis, weight_shape)``.

    Attributes besides the tensors: ``weight_shape``, ``space`` (``"ip"``/``"sp"``), ``basis_init``
    (how the basis was initialised), ``weight_name`` (the original parameter's qualified name),
    ``kind`` (``"conv"``, ``"conv_transpose"`` or ``"linear"``) and ``source`` (a :class:`ModuleSpec`
    when the original owner was a standard torch module, else ``None``).
    """

    def __init__(
        self,
        coeff: torch.Tensor,
        basis: torch.Tensor | None,
        *,
        weight_shape: tuple[int, ...],
        space: str,
        basis_init: str,
        train_basis: bool,
        weight_name: str,
        kind: str,
        source: ModuleSpec | None = None,
        requires_grad: bool = True,
    ) -> None:
        super().__init__()
        self.coeff = nn.Parameter(coeff, requires_grad=requires_grad)
        self.register_buffer("mask", torch.ones_like(coeff), persistent=True)
        if basis is None:
            self.basis = None
        elif isinstance(basis, nn.Parameter) or train_basis:
            self.basis = basis if isinstance(basis, nn.Parameter) else nn.Parameter(basis)
        else:
            self.register_buffer("basis", basis, persistent=True)
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.space = space
        self.basis_init = basis_init
        self.weight_name = weight_name
        self.kind = kind
        self.source = source
        self.memory_format: str | None = None  # "channels_last"/"channels_last_3d" when the weight was so
        self.aliases: dict[str, ModuleSpec] = {}  # other standard modules tied to this weight, by path
        self.tied_names: tuple[str, ...] = ()  # other attribute paths of the graph that held the same parameter
        self.capture: str | None = None  # the front end whose graph reads it ("export", "symbolic", "parametrized")
        self.shared_basis = False  # the basis is one tensor with other layers' (share_basis=True)

    def fold(self) -> torch.Tensor:
        """The composed weight as a plain tensor, in the original weight's memory format."""
        with torch.no_grad():
            weight = self.compose().detach().clone()
        if self.memory_format is not None:
            weight = weight.contiguous(memory_format=getattr(torch, self.memory_format))
        return weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """What would load silently into another function is reported as a load error (as torch reports a shape
        mismatch): a mask of other values than 0 and 1 (a 0.5 or a NaN scales or poisons the weight); a basis
        into the SP form other than its own ``I`` (SP never multiplies by its basis: an IP model's trained basis
        would load and be ignored); into a basis shared by several layers (``share_basis=True``), layers'
        values that differ (each would overwrite the one tensor, the last layer's winning)."""
        problem = self._load_problem(state_dict, prefix, error_msgs)
        if problem is not None:
            error_msgs.append(problem)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _load_problem(self, state_dict, prefix: str, load: list) -> str | None:
        mask = state_dict.get(prefix + "mask")
        if isinstance(mask, torch.Tensor) and mask.shape == self.mask.shape:
            binary = (mask == 0) | (mask == 1)
            if not bool(binary.all()):
                value = mask[~binary].flatten()[0].item()
                return (f"{prefix}mask: a mask holds only 0 (pruned) and 1 (kept), but the state dict's holds "
                        f"{value!r}; load a state dict saved from an ipfx model")
        basis = state_dict.get(prefix + "basis")
        if not isinstance(basis, torch.Tensor) or self.basis is None or basis.shape != self.basis.shape:
            return None
        if not self.multiplies_basis and not torch.equal(basis.to(self.basis), self.basis):
            return (f"{prefix}basis: this weight is in SP form, which computes without a basis, but the state dict "
                    "holds another basis than SP's own (saved from a model in IP form?); load it into a model "
                    "transformed with space='ip' (the same options as the model it was saved from)")
        if getattr(self, "shared_basis", False):
            # torch hands each module only its own keys: the first layer to load this basis in a load leaves its
            # key and value on the tensor (a basis is K x K numbers), and every other layer's must agree with them.
            # A load is told by its list of error messages (`load`: one list for the whole call, held by the tag,
            # so a later load's list is another object)
            first = getattr(self.basis, "_ipfx_loaded", None)
            if first is None or first[0] is not load or first[2].shape != basis.shape:
                self.basis._ipfx_loaded = (load, prefix + "basis", basis.detach().clone())
            elif not torch.equal(basis, first[2]):
                return (f"{prefix}basis: this model shares one basis across layers (share_basis=True), but the "
                        f"state dict holds another basis here than at {first[1]} (saved from a model with a basis "
                        "per layer?); load it into a model transformed with the options it was saved from")
        return None

    # -- the algebra ------------------------------------------------------------------------
    def compose(self) -> torch.Tensor:
        """``W = reshape((mask * coeff) @ basis, weight_shape)``; ``mask * coeff`` in SP form
        (:func:`ipfx.form.compose.compose_weight`, the one definition)."""
        return compose_weight(self.coeff, self.mask, self.basis, self.weight_shape if self.has_basis else None,
                              self.multiplies_basis)

    @property
    def weight(self) -> torch.Tensor:
        """The composed weight, computed on every read (``torch.nn.utils.parametrize`` semantics), so
        untraced code that reads ``owner.weight`` (its value, ``.dtype``, ``.shape``) gets it."""
        return self.compose()

    def forward(self) -> torch.Tensor:
        return self.compose()

    # -- facts ------------------------------------------------------------------------------
    @property
    def has_basis(self) -> bool:
        return self.basis is not None

    @property
    def multiplies_basis(self) -> bool:
        """Whether the composed weight is a product with the basis (not in SP, whose basis is ``I``)."""
        return self.basis is not None and self.space != "sp"

    @property
    def trains_basis(self) -> bool:
        return isinstance(self.basis, nn.Parameter) and self.basis.requires_grad

    def kept(self) -> int:
        """Number of unmasked coefficients."""
        return int(torch.count_nonzero(self.mask))

    def extra_repr(self) -> str:
        form = f"space={self.space}"
        if self.has_basis:
            form += f", basis={self.basis_init}{'' if self.trains_basis else ' (fixed)'}"
        else:
            form += ", no basis"
        return (f"{self.weight_name!r}, weight_shape={self.weight_shape}, {form}, "
                f"kept={self.kept()}/{self.mask.numel()}")

    @torch.no_grad()
    def normalize_basis_(self) -> "BasisWeight":
        """Rescale basis rows to unit norm and their coefficients inversely (``W`` is unchanged).

        ``(c_j s_j) (F_j / s_j) = c_j F_j`` for every row ``j`` with norm ``s_j``, so the composed
        weight is the same while magnitude-type scores become comparable across layers.
        """
        if self.basis is None:
            return self
        norms = self.basis.norm(dim=1)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        self.basis.div_(norms[:, None])
        self.coeff.mul_(norms.to(self.coeff.dtype))
        return self


def qualified_weight_name(path: str, module: BasisWeight) -> str:
    """The original parameter's name in the whole model, from where its BasisWeight sits (``path``).

    ``weight_name`` is relative to the traced graph holding the module, which is a submodule of the
    model when the model was traced in parts; the module sits at the parameter's prefix.
    """
    attr = getattr(module, "original_attr", None)  # a module converted in place (ipfx.form.parametrize)
    if attr is not None and attr != "weight":
        return f"{path}.{attr}" if path else attr
    return f"{path}.weight" if module.weight_name.endswith(".weight") else path


def adopt_attributes(new: nn.Module, old: nn.Module, *, skip=()) -> None:
    """Move ``old``'s parameters, buffers and child modules (but those named in ``skip``) onto ``new``.

    Keeps persistence of buffers, so the state_dict entries of the adopted attributes do not change.
    Names ``new`` already holds are left as they are.
    """
    skip = {skip} if isinstance(skip, str) else set(skip)
    for name, p in old._parameters.items():
        if name not in skip and name not in new._parameters:
            new.register_parameter(name, p)
    for name, b in old._buffers.items():
        if name not in skip and name not in new._buffers:
            new.register_buffer(name, b, persistent=name not in old._non_persistent_buffers_set)
    for name, m in old._modules.items():
        if name not in skip:
            new.add_module(name, m)


#: The attributes a BasisWeight adds; lowering drops them.
STATE_NAMES = ("coeff", "mask", "basis")


def is_transformed(model: nn.Module) -> bool:
    """Whether ``model`` holds coefficient weights (what :func:`ipfx.transform` made of it)."""
    return any(isinstance(m, BasisWeight) for m in model.modules())


def coefficient_weights(model: nn.Module, *, each_once: bool = False) -> Iterator[tuple[str, BasisWeight]]:
    """``(path, module)`` of every :class:`BasisWeight` in ``model``, in module order: under every path that
    holds it (a module registered twice: both, as in the state dict), or with ``each_once`` each set of
    coefficients once (at its first path; modules tied to one weight share their ``coeff``)."""
    seen = set()
    for path, m in model.named_modules(remove_duplicate=each_once):
        if isinstance(m, BasisWeight):
            if each_once and id(m.coeff) in seen:
                continue
            seen.add(id(m.coeff))
            yield path, m
