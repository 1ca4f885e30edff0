"""What :func:`ipfx.transform` rewrites, and how: kept apart from the passes that do the rewriting.

A :class:`TransformConfig` holds the defaults (space, basis, whether the basis trains, whether layers
share a basis) plus filters and per-name overrides. The rewrite pass asks it one question per weight
it found, :meth:`TransformConfig.settings_for`, and gets back either ``None`` (leave the weight alone)
or the :class:`WeightSettings` to rewrite it with. Passes never hard-code model-specific names.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Any, Iterable, Mapping, Sequence

import torch.nn as nn

from .form.bases import BASIS_NAMES, BasisSpec
from .errors import IPFXTypeError, IPFXValueError

#: Names accepted as ``space=``.
SPACES = ("ip", "sp")

#: Module types whose ``weight`` is rewritten by default (every conv and linear layer).
DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


@dataclasses.dataclass(frozen=True)
class WeightSettings:
    """How one weight is rewritten."""

    space: str  # "ip" or "sp"
    basis: BasisSpec  # "dct", "spatial", "random", a tensor or a callable
    train_basis: bool  # basis is an nn.Parameter (True) or a buffer (False)
    share_basis: bool  # one basis object for every weight with this kernel size and settings


@dataclasses.dataclass
class TransformConfig:
    """Decides which weights :func:`ipfx.transform` rewrites and with which space and basis.

    Args:
        space: ``"ip"`` (adaptive basis, trained jointly with the coefficients) or ``"sp"`` (the
            spatial identity basis, frozen: standard pruning through the same code path).
        basis: initial basis for ``space="ip"``: ``"dct"`` (default), ``"spatial"``, ``"random"``
            (orthogonal), a ``(K, K)`` tensor or a callable ``kernel_size -> tensor``. Must be
            ``None`` or ``"spatial"`` for ``space="sp"``.
        train_basis: whether an IP basis is trained (default ``True``; ``False`` keeps it fixed, e.g.
            a fixed DCT basis). Always ``False`` for SP.
        share_basis: one basis per kernel shape shared by all layers, instead of one per layer.
        module_types: owner module types whose weights are rewritten (default: every conv and
            linear type, and their subclasses). Kernels of functional convolutions held directly
            by other modules are rewritten when ``functional`` is true.
        functional: rewrite parameters used as kernels of functional convolution/linear calls in
            modules that are not of ``module_types`` (e.g. ``F.conv2d(x, self.w)``).
        include: glob patterns (``fnmatch``) or compiled regexes over parameter names
            (``"layer1.0.conv1.weight"``); when given, only matching weights are rewritten.
        exclude: patterns of parameter names never rewritten.
        kernel_sizes: when given, only conv weights with one of these spatial kernel sizes (tuples)
            are rewritten; linear weights are unaffected by this filter.
        include_linear: rewrite ``nn.Linear``/``F.linear`` weights (SP form, for pruning).
        overrides: mapping from a name pattern to a dict of ``space``/``basis``/``train_basis``/
            ``share_basis`` for matching weights; the first matching pattern wins.
        seed: seed for ``basis="random"``.
    """

    space: str = "ip"
    basis: BasisSpec | None = None
    train_basis: bool | None = None
    share_basis: bool = False
    module_types: tuple[type[nn.Module], ...] = DEFAULT_MODULE_TYPES
    functional: bool = True
    include: Sequence[str | re.Pattern] | None = None
    exclude: Sequence[str | re.Pattern] = ()
    kernel_sizes: Iterable[Sequence[int]] | None = None
    include_linear: bool = True
    overrides: Mapping[str | re.Pattern, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        self.module_types = tuple(self.module_types)
        for t in self.module_types:
            if not (isinstance(t, type) and issubclass(t, nn.Module)):
                raise IPFXTypeError(f"module_types must hold nn.Module subclasses, got {t!r}")
        if self.kernel_sizes is not None:
            self.kernel_sizes = frozenset(tuple(int(k) for k in ks) for ks in self.kernel_sizes)
        self.default_settings()  # validates space/basis/train_basis
        for pattern, values in self.overrides.items():
            unknown = set(values) - {f.name for f in dataclasses.fields(WeightSettings)}
            if unknown:
                raise IPFXValueError(
                    f"override {pattern!r} sets unknown option(s) {sorted(unknown)}; "
                    "allowed: space, basis, train_basis, share_basis"
                )
            self._settings(values)

    # -- the one question passes ask ---------------------------------------------------------
    def settings_for(
        self, name: str, owner_type: type[nn.Module] | None, kernel_size: Sequence[int], is_linear: bool
    ) -> WeightSettings | None:
        """Settings for parameter ``name`` or ``None`` if it must be left alone.

        ``owner_type`` is the type of the module holding the parameter; ``kernel_size`` its spatial
        kernel size (``()`` for linear weights).
        """
        if is_linear and not self.include_linear:
            return None
        if owner_type is not None and issubclass(owner_type, self.module_types):
            pass
        elif not self.functional:
            return None
        if self.include is not None and not _matches_any(name, self.include):
            return None
        if _matches_any(name, self.exclude):
            return None
        if self.kernel_sizes is not None and not is_linear and tuple(kernel_size) not in self.kernel_sizes:
            return None
        for pattern, values in self.overrides.items():
            if _matches(name, pattern):
                return self._settings(values)
        return self.default_settings()

    def default_settings(self) -> WeightSettings:
        return self._settings({})

    def _settings(self, values: Mapping[str, Any]) -> WeightSettings:
        space = values.get("space", self.space)
        if space not in SPACES:
            raise IPFXValueError(f"unknown space {space!r}; use 'ip' (interspace) or 'sp' (spatial)")
        basis = values.get("basis", self.basis if "space" not in values else None)
        train = values.get("train_basis", self.train_basis if "space" not in values else None)
        share = values.get("share_basis", self.share_basis)
        if space == "sp":
            if basis not in (None, "spatial"):
                raise IPFXValueError(
                    f"space='sp' always uses the spatial (identity) basis, got basis={_short(basis)}; "
                    "for a fixed non-spatial basis use space='ip', train_basis=False"
                )
            if train:
                raise IPFXValueError(
                    "space='sp' keeps its identity basis frozen; use space='ip' to train a basis"
                )
            return WeightSettings("sp", "spatial", False, bool(share))
        if basis is None:
            basis = "dct"
        if isinstance(basis, str) and basis not in BASIS_NAMES:
            raise IPFXValueError(
                f"unknown basis {basis!r}; use one of {', '.join(map(repr, BASIS_NAMES))}, "
                "a (K, K) tensor, or a callable kernel_size -> (K, K) tensor"
            )
        return WeightSettings("ip", basis, True if train is None else bool(train), bool(share))


def _matches(name: str, pattern: str | re.Pattern) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _matches_any(name: str, patterns: Iterable[str | re.Pattern]) -> bool:
    return any(_matches(name, p) for p in patterns)


def _short(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    return type(value).__name__
