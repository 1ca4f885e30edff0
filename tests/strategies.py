"""Hypothesis strategies and small reference models shared by the ipfx test-suite.

Import from test files as ``from strategies import ...`` (``tests/conftest.py`` puts ``tests/`` on the path).

Everything here is deliberately tiny (at most 8 channels, a few pixels per side) so that one example runs in
milliseconds on a CPU. Every module is built with weights drawn from its own ``torch.Generator`` seeded by a
drawn integer: nothing here reads or advances torch's global random state, so tests stay order independent.

Contents
--------
Single convolutions
    :class:`ConvConfig`, :func:`conv_configs`      one whole (transposed) convolution plus a valid input
    :class:`FunctionalConv`, :class:`FunctionalLinear`, :func:`functional_conv_models`
                                                    kernels held as raw parameters (``w``, ``kernel``, ...)
Whole graphs
    :class:`GraphRecipe`, :func:`graph_recipes`     a drawn recipe for a small CNN
    :class:`RecipeNet`, :func:`random_graph_models` the module interpreting a recipe (fx-traceable)
Named reference models
    :class:`WSConv2d`, :class:`TwiceUsedConv`, :class:`FunctionalConvNet`, :class:`TinyResNet`,
    :class:`SameEvenConv`, :data:`NAMED_MODELS`, :func:`named_models`
Masks and sparsities
    :func:`masks_like`, :func:`sparsities`, :func:`seeds`
Helpers
    :func:`seeded_init_`, :class:`ModelCase`, :class:`ConvIntoTracer`, :func:`trace_into_convs`

Torch restrictions that the strategies respect (found by trying):

* ``padding='same'`` raises for strided convolutions, and transposed convolutions accept neither ``'same'``
  nor ``'valid'``; transposed convolutions accept only ``padding_mode='zeros'``.
* ``padding_mode='reflect'`` needs every pad *strictly* smaller than the input size in that dimension;
  ``'circular'`` needs every pad ``<=`` the input size ("wrapping around more than once" otherwise);
  ``'replicate'`` accepts any pad.
* With ``padding='same'`` and a non-zeros padding mode an even total padding ``d*(k-1)`` is split
  ``total//2`` before and the rest after (the extra element goes to the end).
* ``output_padding`` must be smaller than ``max(stride, dilation)`` in each dimension.
* A transposed convolution's output size ``(L-1)*s - 2*p + d*(k-1) + op + 1`` must be at least 1, so large
  paddings need a long enough input.
* ``padding='same'`` with an even kernel emits a ``UserWarning`` (torch pads a copy of the input).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, NamedTuple, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

__all__ = [
    "MAX_CHANNELS",
    "MAX_SPATIAL",
    "PADDING_MODES",
    "ConvConfig",
    "conv_configs",
    "FunctionalConv",
    "FunctionalLinear",
    "functional_conv_models",
    "ModelCase",
    "GraphRecipe",
    "RecipeNet",
    "graph_recipes",
    "random_graph_models",
    "WSConv2d",
    "TwiceUsedConv",
    "FunctionalConvNet",
    "BasicBlock",
    "TinyResNet",
    "SameEvenConv",
    "NAMED_MODELS",
    "named_models",
    "masks_like",
    "sparsities",
    "seeds",
    "seeded_init_",
    "ConvIntoTracer",
    "trace_into_convs",
]

#: Largest channel count any strategy draws.
MAX_CHANNELS = 8
#: Largest input size per spatial dimension, by number of spatial dimensions.
MAX_SPATIAL = {1: 12, 2: 9, 3: 5}
_MAX_KERNEL = {1: 5, 2: 4, 3: 3}
_MAX_STRIDE = {1: 3, 2: 3, 3: 2}
_MAX_DILATION = {1: 3, 2: 3, 3: 2}
_MAX_PAD = {1: 3, 2: 2, 3: 2}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_F_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_F_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def seeds() -> st.SearchStrategy[int]:
    """Seeds for weights and inputs (shrinks towards 0)."""
    return st.integers(min_value=0, max_value=2**16 - 1)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _uniform(shape: Sequence[int], gen: torch.Generator, low: float, high: float) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=gen, dtype=torch.float64) * (high - low) + low


@torch.no_grad()
def seeded_init_(module: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter and batch-norm statistic of ``module`` from a generator seeded by ``seed``.

    Values are drawn in float64 and then cast, so the same seed gives (nearly) the same model in any dtype.
    Weight-like tensors (two or more dims) get variance ``1/fan_in`` so activations stay of order one;
    batch-norm scales and running variances lie in [0.5, 1.5]; biases and running means in [-0.2, 0.2].
    Returns ``module``.
    """
    gen = _generator(seed)
    for _, mod in module.named_modules():
        is_bn = isinstance(mod, nn.modules.batchnorm._NormBase)
        for name, p in mod.named_parameters(recurse=False):
            if is_bn and name == "weight":
                val = _uniform(p.shape, gen, 0.5, 1.5)
            elif p.dim() >= 2:
                fan_in = max(1, p.numel() // p.shape[0])
                bound = math.sqrt(3.0 / fan_in)
                val = _uniform(p.shape, gen, -bound, bound)
            else:
                val = _uniform(p.shape, gen, -0.2, 0.2)
            p.copy_(val)
        if is_bn and getattr(mod, "running_mean", None) is not None:
            mod.running_mean.copy_(_uniform(mod.running_mean.shape, gen, -0.2, 0.2))
            mod.running_var.copy_(_uniform(mod.running_var.shape, gen, 0.5, 1.5))
    return module


def _build_quietly(factory, *args, **kwargs) -> nn.Module:
    """Construct a module without advancing torch's global RNG (its default init is overwritten anyway)."""
    with torch.random.fork_rng(devices=[]):
        return factory(*args, **kwargs)


def _seeded_input(shape: Sequence[int], seed: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=_generator(seed), dtype=torch.float64).to(dtype)


def _tup(v: Any, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _fmt(t: tuple) -> str:
    return str(t[0]) if len(set(t)) == 1 else "(" + ",".join(str(v) for v in t) + ")"


# --------------------------------------------------------------------------------------------------------------
# One convolution
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, repr=False)
class ConvConfig:
    """One whole convolution and a valid input for it.

    ``padding`` is exactly what is passed to torch: an int, a per-dim tuple, ``'same'`` or ``'valid'``.
    ``output_padding`` is all zeros for non-transposed convolutions. ``seed`` seeds the weights.
    """

    dims: int
    transposed: bool
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple
    stride: tuple
    dilation: tuple
    padding: Any
    padding_mode: str
    bias: bool
    output_padding: tuple
    batch: int
    input_size: tuple
    seed: int = 0

    # ---- derived facts -----------------------------------------------------------------------------------
    @property
    def module_class(self) -> type:
        return (_CONV_T if self.transposed else _CONV)[self.dims]

    @property
    def kernel_numel(self) -> int:
        """K, the number of kernel elements (1 for a 1x1 conv)."""
        return math.prod(self.kernel_size)

    @property
    def weight_shape(self) -> tuple:
        if self.transposed:
            return (self.in_channels, self.out_channels // self.groups, *self.kernel_size)
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def input_shape(self) -> tuple:
        return (self.batch, self.in_channels, *self.input_size)

    @property
    def pads(self) -> tuple:
        """Per spatial dim ``(before, after)`` zero/mode padding actually applied (non-transposed meaning)."""
        if self.padding == "valid":
            return ((0, 0),) * self.dims
        if self.padding == "same":
            out = []
            for k, d in zip(self.kernel_size, self.dilation):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return tuple(out)
        return tuple((p, p) for p in _tup(self.padding, self.dims))

    @property
    def output_size(self) -> tuple:
        out = []
        for i in range(self.dims):
            L, k, s, d = self.input_size[i], self.kernel_size[i], self.stride[i], self.dilation[i]
            lo, hi = self.pads[i]
            if self.transposed:
                out.append((L - 1) * s - 2 * lo + d * (k - 1) + self.output_padding[i] + 1)
            else:
                out.append((L + lo + hi - d * (k - 1) - 1) // s + 1)
        return tuple(out)

    @property
    def output_shape(self) -> tuple:
        return (self.batch, self.out_channels, *self.output_size)

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    def module_kwargs(self) -> dict:
        """Keyword arguments for :attr:`module_class`."""
        kw = dict(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias,
            padding_mode=self.padding_mode,
        )
        if self.transposed:
            kw["output_padding"] = self.output_padding
        return kw

    # ---- factories ---------------------------------------------------------------------------------------
    def build(self, dtype: torch.dtype = torch.float64, seed: int | None = None) -> nn.Module:
        """The ``nn.Conv{d}d`` / ``nn.ConvTranspose{d}d`` with weights seeded by ``seed`` (default: ``self.seed``)."""
        module = _build_quietly(self.module_class, **self.module_kwargs()).to(dtype)
        return seeded_init_(module, self.seed if seed is None else seed)

    def example_input(self, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return _seeded_input(self.input_shape, seed, dtype)

    def build_functional(
        self, dtype: torch.dtype = torch.float64, param_name: str = "w", seed: int | None = None
    ) -> "FunctionalConv":
        """The same convolution as :meth:`build` (same weights), written with ``F.conv*`` and a raw parameter."""
        return FunctionalConv(self, param_name=param_name, dtype=dtype, seed=seed)

    # ---- readable output for hypothesis' falsifying examples -----------------------------------------------
    def __str__(self) -> str:
        parts = [f"{self.in_channels}->{self.out_channels}", f"k={_fmt(self.kernel_size)}"]
        if any(s != 1 for s in self.stride):
            parts.append(f"s={_fmt(self.stride)}")
        if any(d != 1 for d in self.dilation):
            parts.append(f"d={_fmt(self.dilation)}")
        if isinstance(self.padding, str):
            parts.append(f"p={self.padding!r}")
        elif self.padding != 0 and any(p != 0 for p in _tup(self.padding, self.dims)):
            parts.append(f"p={self.padding}")
        if self.padding_mode != "zeros":
            parts.append(f"mode={self.padding_mode}")
        if any(self.output_padding):
            parts.append(f"op={_fmt(self.output_padding)}")
        if self.groups != 1:
            parts.append(f"g={self.groups}" + (" (depthwise)" if self.is_depthwise else ""))
        parts.append(f"bias={self.bias}")
        shape = "x".join(str(v) for v in self.input_shape)
        return f"{self.module_class.__name__}({', '.join(parts)}) on {shape} seed={self.seed}"

    __repr__ = __str__

    def _repr_pretty_(self, p, cycle) -> None:  # hypothesis' printer would otherwise list the dataclass fields
        p.text(str(self))


def _per_dim(draw, dims: int, elem: st.SearchStrategy[int]) -> tuple:
    """A per-dimension tuple: either isotropic or drawn independently per dim (non-square)."""
    if draw(st.booleans()):
        return tuple(draw(elem) for _ in range(dims))
    return (draw(elem),) * dims


@st.composite
def _conv_configs(draw, dims: tuple, transposed, padding_modes: tuple, max_channels: int) -> ConvConfig:
    d = draw(st.sampled_from(dims))
    tr = draw(st.booleans()) if transposed is None else bool(transposed)
    S = MAX_SPATIAL[d]

    # channels and groups
    kind = draw(st.sampled_from(["plain", "grouped", "depthwise"]))
    if kind == "plain":
        groups = 1
        cin = draw(st.integers(1, max_channels))
        cout = draw(st.integers(1, max_channels))
    elif kind == "depthwise":
        cin = cout = groups = draw(st.integers(1, max_channels))
    else:
        groups = draw(st.integers(2, max(2, max_channels // 2)))
        cin = groups * draw(st.integers(1, max(1, max_channels // groups)))
        cout = groups * draw(st.integers(1, max(1, max_channels // groups)))

    kernel = _per_dim(draw, d, st.integers(1, _MAX_KERNEL[d]))
    # stride 1 is what most real convolutions use (and the only stride 'same' allows): draw it more often
    stride = _per_dim(draw, d, st.one_of(st.just(1), st.integers(1, _MAX_STRIDE[d])))
    dil = _per_dim(draw, d, st.integers(1, _MAX_DILATION[d]))
    # keep the dilated kernel extent d*(k-1)+1 within the largest input
    dil = tuple(di if k == 1 else min(di, (S - 1) // (k - 1)) for di, k in zip(dil, kernel))

    if tr:
        mode = "zeros"
        pkinds = ["int", "tuple"]
    else:
        modes = [m for m in PADDING_MODES if m in padding_modes]
        mode = draw(st.sampled_from(modes))
        pkinds = ["int", "tuple", "valid"] + (["same"] if all(s == 1 for s in stride) else [])
    pkind = draw(st.sampled_from(pkinds))
    pmax = _MAX_PAD[d]
    if pkind == "int":
        padding = draw(st.integers(0, pmax))
    elif pkind == "tuple":
        padding = tuple(draw(st.integers(0, pmax)) for _ in range(d))
    else:
        padding = pkind

    if tr:
        output_padding = tuple(draw(st.integers(0, max(s, di) - 1)) for s, di in zip(stride, dil))
    else:
        output_padding = (0,) * d

    partial = ConvConfig(
        d, tr, cin, cout, groups, kernel, stride, dil, padding, mode, False, output_padding, 1, (S,) * d
    )
    sizes = []
    for i in range(d):
        k, s, di = kernel[i], stride[i], dil[i]
        lo, hi = partial.pads[i]
        if tr:
            # (L-1)*s - 2p + d(k-1) + op + 1 >= 1
            short = 2 * lo - di * (k - 1) - output_padding[i]
            lmin = 1 + max(0, -(-short // s))
        else:
            lmin = max(1, di * (k - 1) + 1 - lo - hi)
            if mode == "reflect":
                lmin = max(lmin, max(lo, hi) + 1)
            elif mode == "circular":
                lmin = max(lmin, lo, hi)
        assert lmin <= S, (partial, i, lmin)
        sizes.append(draw(st.integers(lmin, S)))

    return dataclasses.replace(
        partial,
        bias=draw(st.booleans()),
        batch=draw(st.integers(1, 2)),
        input_size=tuple(sizes),
        seed=draw(seeds()),
    )


def conv_configs(
    dims: int | Iterable[int] = (1, 2, 3),
    transposed: bool | None = None,
    padding_modes: Iterable[str] = PADDING_MODES,
    max_channels: int = MAX_CHANNELS,
) -> st.SearchStrategy[ConvConfig]:
    """Strategy for :class:`ConvConfig`: any valid (transposed) 1/2/3-d convolution with a valid input.

    ``dims``: spatial dims to draw from; ``transposed``: None for both, True/False to fix it;
    ``padding_modes``: restrict the padding modes of non-transposed convs (transposed always use 'zeros').
    Shrinks towards a 1-d, non-transposed, single-channel, 1-tap convolution.
    """
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    assert dims and set(dims) <= {1, 2, 3}, dims
    padding_modes = tuple(padding_modes)
    assert "zeros" in padding_modes or transposed is not True
    if transposed is False or transposed is None:
        assert set(padding_modes) & set(PADDING_MODES), padding_modes
    if "zeros" not in padding_modes and transposed is None:
        transposed = False
    return _conv_configs(dims, transposed, padding_modes, max_channels)


# --------------------------------------------------------------------------------------------------------------
# Models returned with an input
# --------------------------------------------------------------------------------------------------------------


class ModelCase(NamedTuple):
    """A ``(module, example_input)`` pair whose repr is short (hypothesis prints it for a failing example)."""

    module: nn.Module
    example_input: torch.Tensor

    def __repr__(self) -> str:
        desc = getattr(self.module, "case_description", None) or type(self.module).__name__
        x = self.example_input
        shape = "x".join(str(v) for v in x.shape)
        return f"ModelCase({desc}; x: {shape} {str(x.dtype).replace('torch.', '')})"

    def _repr_pretty_(self, p, cycle) -> None:  # hypothesis' printer would otherwise print a plain tuple
        p.text(repr(self))


class FunctionalConv(nn.Module):
    """A convolution written with ``F.conv*`` / ``F.conv_transpose*`` and a raw kernel parameter.

    The kernel parameter is registered under ``param_name`` (``"w"``, ``"kernel"``, ... never ``"weight"``),
    the bias (if any) under ``"b"``. Non-zeros padding modes are applied with ``F.pad`` first, as
    ``nn.Conv*`` does. Built from a :class:`ConvConfig`, it holds the same weights as ``config.build()``.
    """

    def __init__(
        self,
        config: ConvConfig,
        param_name: str = "w",
        dtype: torch.dtype = torch.float64,
        seed: int | None = None,
    ):
        super().__init__()
        assert param_name not in ("weight", "b"), param_name
        self.config = config
        self.param_name = param_name
        ref = config.build(dtype=dtype, seed=seed)
        self.register_parameter(param_name, nn.Parameter(ref.weight.detach().clone()))
        self.b = nn.Parameter(ref.bias.detach().clone()) if config.bias else None
        # reversed (last dim first) (before, after) pairs for F.pad
        self._pad = tuple(v for lo_hi in reversed(config.pads) for v in lo_hi)
        self.case_description = f"FunctionalConv[{param_name}] {config}"

    def forward(self, x):
        c = self.config
        w = getattr(self, self.param_name)
        if c.transposed:
            return _F_CONV_T[c.dims](x, w, self.b, c.stride, c.padding, c.output_padding, c.groups, c.dilation)
        if c.padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=c.padding_mode)
            return _F_CONV[c.dims](x, w, self.b, c.stride, 0, c.dilation, c.groups)
        return _F_CONV[c.dims](x, w, self.b, c.stride, c.padding, c.dilation, c.groups)


class FunctionalLinear(nn.Module):
    """``F.linear`` with a raw weight parameter named ``param_name`` and an optional bias ``b``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        param_name: str = "w",
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__()
        assert param_name not in ("weight", "b"), param_name
        self.param_name = param_name
        self.register_parameter(param_name, nn.Parameter(torch.empty(out_features, in_features, dtype=dtype)))
        self.b = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        seeded_init_(self, seed)
        self.case_description = f"FunctionalLinear[{param_name}]({in_features}->{out_features}, bias={bias})"

    def forward(self, x):
        return F.linear(x, getattr(self, self.param_name), self.b)


class _Holder(nn.Module):
    """Puts a module one level down, so its raw parameters are called e.g. ``block.kernel``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.block = inner
        self.case_description = f"Holder(block={inner.case_description})"

    def forward(self, x):
        return self.block(x)


_RAW_PARAM_NAMES = ("w", "kernel", "filt", "k_weights")


@st.composite
def _functional_cases(draw, dims, transposed, dtype) -> ModelCase:
    name = draw(st.sampled_from(_RAW_PARAM_NAMES))
    if draw(st.integers(0, 4)) == 0:  # ~1 in 5: a linear layer
        fin, fout = draw(st.integers(1, 12)), draw(st.integers(1, 8))
        module = FunctionalLinear(fin, fout, bias=draw(st.booleans()), param_name=name, seed=draw(seeds()), dtype=dtype)
        lead = draw(st.sampled_from([(1,), (2,), (2, 3)]))
        x = _seeded_input((*lead, fin), draw(seeds()), dtype)
    else:
        cfg = draw(conv_configs(dims=dims, transposed=transposed))
        module = FunctionalConv(cfg, param_name=name, dtype=dtype)
        x = cfg.example_input(seed=draw(seeds()), dtype=dtype)
    if draw(st.booleans()):
        module = _Holder(module)
    return ModelCase(module, x)


def functional_conv_models(
    dims: int | Iterable[int] = (1, 2, 3), transposed: bool | None = None, dtype: torch.dtype = torch.float64
) -> st.SearchStrategy[ModelCase]:
    """Strategy for ``(module, example_input)`` whose kernel is a raw parameter used by ``F.conv*``/``F.linear``.

    The parameter is named one of ``w``, ``kernel``, ``filt``, ``k_weights``, at the root or (half the time) one
    level down as ``block.<name>``; a conv bias is the parameter ``b``. The conv cases are
    :class:`FunctionalConv` built from :func:`conv_configs`, so all conv shapes and padding modes appear.
    """
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return _functional_cases(dims, transposed, dtype)


# --------------------------------------------------------------------------------------------------------------
# Named reference models
# --------------------------------------------------------------------------------------------------------------


class WSConv2d(nn.Conv2d):
    """Conv2d with weight standardisation: each filter is normalised to zero mean, unit variance over (1,2,3)."""

    eps = 1e-5

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, correction=0)
        w = (w - mean) * torch.rsqrt(var + self.eps)
        return self._conv_forward(x, w, self.bias)


class _Named(nn.Module):
    """Base for the named reference models: seeded weights and an ``example_input`` method."""

    input_shape: tuple = (3, 8, 8)

    def _finish(self, seed: int) -> None:
        seeded_init_(self, seed)

    def example_input(self, batch: int = 2, seed: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
        if dtype is None:
            dtype = next(self.parameters()).dtype
        return _seeded_input((batch, *self.input_shape), seed, dtype)


class TwiceUsedConv(_Named):
    """The same 3x3 conv (``conv``, 3->3 channels) applied twice: ``conv(relu(conv(x)))``, then a 1x1 ``head``."""

    input_shape = (3, 8, 8)

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.head = nn.Conv2d(3, 2, 1)
        self._finish(seed)

    def forward(self, x):
        return self.head(self.conv(F.relu(self.conv(x))))


class FunctionalConvNet(_Named):
    """Root-level raw parameters: conv kernel ``w`` (6,3,3,3) and bias ``b`` for ``F.conv2d``, then ``fc`` Linear.

    ``state_dict`` keys: ``w``, ``b``, ``fc.weight``, ``fc.bias``.
    """

    input_shape = (3, 8, 8)

    def __init__(self, seed: int = 0, num_classes: int = 10):
        super().__init__()
        self.w = nn.Parameter(torch.empty(6, 3, 3, 3))
        self.b = nn.Parameter(torch.empty(6))
        with torch.random.fork_rng(devices=[]):
            self.fc = nn.Linear(6, num_classes)
        self._finish(seed)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w, self.b, padding=1))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class BasicBlock(nn.Module):
    """ResNet basic block (conv-bn-relu-conv-bn + shortcut), torchvision-style names."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class TinyResNet(_Named):
    """A 2-block residual CNN for CIFAR-like 3x16x16 input and 10 classes.

    ``conv1``/``bn1`` stem (3->w), ``layer1.0`` (w->w), ``layer2.0`` (w->2w, stride 2, 1x1 downsample),
    global average pool, ``fc``. Starts in train mode like any module.
    """

    input_shape = (3, 16, 16)

    def __init__(self, num_classes: int = 10, width: int = 8, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.layer1 = nn.Sequential(BasicBlock(width, width))
            self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2))
            self.fc = nn.Linear(2 * width, num_classes)
        self._finish(seed)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class SameEvenConv(_Named):
    """``padding='same'`` with even kernels: conv1 (3->4, k=(2,4)), conv2 (4->4, k=2, dilation (1,3), reflect).

    Input 3x7x7; output keeps the 7x7 size. torch warns about the even-kernel zero-padding copy.
    """

    input_shape = (3, 7, 7)

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            self.conv1 = nn.Conv2d(3, 4, (2, 4), padding="same")
            self.conv2 = nn.Conv2d(4, 4, 2, padding="same", dilation=(1, 3), padding_mode="reflect")
        self._finish(seed)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


#: name -> class of each named reference model; every class takes ``seed=`` and has ``example_input()``.
NAMED_MODELS = {
    "TwiceUsedConv": TwiceUsedConv,
    "FunctionalConvNet": FunctionalConvNet,
    "TinyResNet": TinyResNet,
    "SameEvenConv": SameEvenConv,
}


@st.composite
def named_models(draw, dtype: torch.dtype = torch.float64) -> ModelCase:
    """Strategy over :data:`NAMED_MODELS` with a drawn weight seed, batch 1-2 and input seed."""
    name = draw(st.sampled_from(sorted(NAMED_MODELS)))
    model = NAMED_MODELS[name](seed=draw(seeds())).to(dtype)
    model.case_description = name
    return ModelCase(model, model.example_input(batch=draw(st.integers(1, 2)), seed=draw(seeds()), dtype=dtype))


# --------------------------------------------------------------------------------------------------------------
# Random graphs
# --------------------------------------------------------------------------------------------------------------
#
# A recipe is a tuple of ops (plain Python constants), interpreted by RecipeNet.forward:
#   ("call", name)               self.<name>(x)                     (module from GraphRecipe.modules)
#   ("fconv", pname, stride, p)  F.conv2d(x, self.<pname>, None, stride, p)     (raw parameter)
#   ("relu",)                    F.relu(x)
#   ("pool", "max" | "avg")      2x2 pooling
#   ("add", ops)                 x + run(ops, x)                    (residual; ops preserve the shape)
#   ("cat", ops_a, ops_b)        torch.cat([run(ops_a, x), run(ops_b, x)], 1)
#   ("gap",)                     adaptive average pool to 1x1
#   ("flatten",)                 torch.flatten(x, 1)
# Modules: (name, kind, kwargs) with kind in {"conv", "ws", "convT", "bn", "linear"}.

_MODULE_KINDS = {
    "conv": nn.Conv2d,
    "ws": WSConv2d,
    "convT": nn.ConvTranspose2d,
    "bn": nn.BatchNorm2d,
    "linear": nn.Linear,
}


@dataclasses.dataclass(frozen=True, repr=False)
class GraphRecipe:
    """A drawn small CNN: ops to interpret, modules and raw parameters to create, input shape, weight seed."""

    ops: tuple
    modules: tuple  # ((name, kind, ((kw, value), ...)), ...)
    params: tuple  # ((name, shape), ...)
    input_shape: tuple
    seed: int
    features: frozenset = frozenset()

    def build(self, dtype: torch.dtype = torch.float64, seed: int | None = None, train: bool = False) -> "RecipeNet":
        """The :class:`RecipeNet` (eval mode unless ``train``) with weights seeded by ``seed`` (default ``self.seed``)."""
        net = RecipeNet(self, dtype=dtype, seed=self.seed if seed is None else seed)
        return net.train(train)

    def example_input(self, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return _seeded_input(self.input_shape, seed, dtype)

    def describe(self) -> str:
        specs = {name: (kind, dict(kw)) for name, kind, kw in self.modules}
        shapes = dict(self.params)

        def one(op) -> str:
            tag = op[0]
            if tag == "call":
                kind, kw = specs[op[1]]
                if kind == "bn":
                    return f"{op[1]}:bn"
                if kind == "linear":
                    return f"{op[1]}:linear({kw['in_features']}->{kw['out_features']})"
                extra = []
                for key in ("stride", "padding", "dilation", "groups", "padding_mode"):
                    if key in kw:
                        extra.append(f"{key[0] if key != 'padding_mode' else 'mode'}={kw[key]}")
                return (
                    f"{op[1]}:{kind}({kw['in_channels']}->{kw['out_channels']}, k={kw['kernel_size']}"
                    + "".join(", " + e for e in extra)
                    + ")"
                )
            if tag == "fconv":
                return f"{op[1]}:F.conv2d{tuple(shapes[op[1]])}(s={op[2]}, p={op[3]})"
            if tag == "pool":
                return f"{op[1]}pool"
            if tag == "add":
                return "res[" + seq(op[1]) + "]"
            if tag == "cat":
                return "cat[" + seq(op[1]) + " | " + seq(op[2]) + "]"
            if tag == "mode":
                return "train[" + seq(op[1]) + "] / eval[" + seq(op[2]) + "]"
            if tag == "inplace":
                view_write = " after x[:, :1].mul_" if op[2] else ""
                return "add_[" + seq(op[1]) + "]" + view_write + (" > relu_" if op[3] else "")
            return tag

        def seq(ops) -> str:
            return " > ".join(one(o) for o in ops)

        shape = "x".join(str(v) for v in self.input_shape)
        return f"{seq(self.ops)} on {shape} seed={self.seed}"

    __str__ = describe

    def __repr__(self) -> str:
        return f"GraphRecipe({self.describe()})"

    def _repr_pretty_(self, p, cycle) -> None:  # hypothesis' printer would otherwise list the dataclass fields
        p.text(repr(self))


class RecipeNet(nn.Module):
    """A CNN interpreting a :class:`GraphRecipe`. Branching is on the recipe only, so torch.fx traces it."""

    def __init__(self, recipe: GraphRecipe, dtype: torch.dtype = torch.float64, seed: int = 0):
        super().__init__()
        self.recipe = recipe
        with torch.random.fork_rng(devices=[]):
            for name, kind, kw in recipe.modules:
                self.add_module(name, _MODULE_KINDS[kind](**dict(kw)))
        for name, shape in recipe.params:
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        self.to(dtype)
        seeded_init_(self, seed)
        self.case_description = recipe.describe()

    def forward(self, x):
        return self._run(self.recipe.ops, x)

    def _run(self, ops, x):
        for op in ops:
            tag = op[0]
            if tag == "call":
                x = getattr(self, op[1])(x)
            elif tag == "fconv":
                x = F.conv2d(x, getattr(self, op[1]), None, op[2], op[3])
            elif tag == "relu":
                x = F.relu(x)
            elif tag == "pool":
                x = F.max_pool2d(x, 2) if op[1] == "max" else F.avg_pool2d(x, 2)
            elif tag == "add":
                x = x + self._run(op[1], x)
            elif tag == "cat":
                x = torch.cat([self._run(op[1], x), self._run(op[2], x)], 1)
            elif tag == "mode":  # a different branch in train and in eval mode, like auxiliary heads
                x = self._run(op[1] if self.training else op[2], x)
            elif tag == "inplace":  # in-place writes (fused chains must not move past them): add_, relu_, a view
                x = x * 1.0  # (memory of its own: the caller's input is never written)
                y = self._run(op[1], x)
                if op[2]:
                    x[:, :1].mul_(0.5)  # the block's input changes through a view after the branch read it
                y.add_(x)
                x = F.relu(y, inplace=True) if op[3] else y
            elif tag == "gap":
                x = F.adaptive_avg_pool2d(x, 1)
            elif tag == "flatten":
                x = torch.flatten(x, 1)
            else:  # pragma: no cover - recipes come from graph_recipes()
                raise ValueError(f"unknown recipe op {op!r}")
        return x


class _RecipeBuilder:
    def __init__(self, draw):
        self.draw = draw
        self.modules: list = []
        self.params: list = []
        self.features: set = set()
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def module(self, prefix: str, kind: str, **kw) -> tuple:
        name = self._name(prefix)
        self.modules.append((name, kind, tuple(kw.items())))
        return ("call", name)

    def conv(self, kind: str = "conv", **kw) -> tuple:
        kw.setdefault("bias", self.draw(st.booleans()))
        return self.module("conv" if kind == "conv" else kind.lower(), kind, **kw)

    def layer(self, c: int, c_out: int | None = None) -> tuple[list, int]:
        """One shape-preserving (spatially) conv-like layer from c channels; returns (ops, channels)."""
        draw = self.draw
        kinds = ["conv", "nonsquare", "same_even", "ws", "reflect", "pw", "fconv", "convT", "grouped"]
        if c_out is None or c_out in (c, 2 * c):
            kinds.append("dw")
        kind = draw(st.sampled_from(kinds))
        if kind == "grouped":
            gs = [g for g in range(2, c + 1) if c % g == 0 and (c_out is None or c_out % g == 0)]
            if not gs:
                kind = "conv"
        if kind == "dw":
            c2 = c_out if c_out is not None else c * draw(st.sampled_from([1, 2] if 2 * c <= MAX_CHANNELS else [1]))
        elif kind == "grouped":
            g = draw(st.sampled_from(gs))
            c2 = c_out if c_out is not None else g * draw(st.integers(1, MAX_CHANNELS // g))
        else:
            c2 = c_out if c_out is not None else draw(st.integers(1, MAX_CHANNELS))
        self.features.add(kind)
        if kind == "conv":
            op = self.conv(in_channels=c, out_channels=c2, kernel_size=3, padding=1)
        elif kind == "nonsquare":
            k = draw(st.sampled_from([(1, 3), (3, 1), (1, 5), (5, 3)]))
            op = self.conv(in_channels=c, out_channels=c2, kernel_size=k, padding=(k[0] // 2, k[1] // 2))
        elif kind == "same_even":
            k = draw(st.sampled_from([2, (2, 4), (4, 1)]))
            op = self.conv(in_channels=c, out_channels=c2, kernel_size=k, padding="same")
        elif kind == "ws":
            op = self.conv("ws", in_channels=c, out_channels=c2, kernel_size=3, padding=1)
        elif kind == "reflect":
            op = self.conv(in_channels=c, out_channels=c2, kernel_size=3, padding=1, padding_mode="reflect")
        elif kind == "pw":
            op = self.conv(in_channels=c, out_channels=c2, kernel_size=1)
        elif kind == "convT":
            op = self.conv("convT", in_channels=c, out_channels=c2, kernel_size=3, padding=1)
        elif kind == "grouped":
            op = self.conv(in_channels=c, out_channels=c2, kernel_size=3, padding=1, groups=g)
        elif kind == "dw":
            op = self.conv(in_channels=c, out_channels=c2, kernel_size=3, padding=1, groups=c)
        else:  # fconv
            name = self._name(draw(st.sampled_from(["w", "kernel"])))
            self.params.append((name, (c2, c, 3, 3)))
            op = ("fconv", name, 1, 1)
        return [op], c2

    def bn(self, c: int) -> tuple:
        self.features.add("bn")
        return self.module("bn", "bn", num_features=c)

    def maybe_bn_relu(self, c: int) -> list:
        ops = []
        if self.draw(st.booleans()):
            ops.append(self.bn(c))
        if self.draw(st.booleans()):
            self.features.add("relu")
            ops.append(("relu",))
        return ops


@st.composite
def _graph_recipes(draw, max_blocks: int, first_block: str | None = None) -> GraphRecipe:
    b = _RecipeBuilder(draw)
    batch = draw(st.integers(1, 2))
    h, w = draw(st.integers(8, 12)), draw(st.integers(8, 12))
    c = 3
    in_shape = (batch, c, h, w)
    ops: list = []
    for i in range(draw(st.integers(1, max_blocks))):
        blocks = ["chain", "res", "cat", "twice", "mode", "inverted", "inplace"]  # each holds a conv (as a first block)
        if i > 0 and min(h, w) >= 4:
            blocks.append("down")
        if i > 0 and max(h, w) <= 8:
            blocks.append("up")
        block = first_block if i == 0 and first_block is not None else draw(st.sampled_from(blocks))
        b.features.add(block)
        if block == "chain":
            layer_ops, c = b.layer(c)
            ops += layer_ops + b.maybe_bn_relu(c)
        elif block == "res":
            branch, _ = b.layer(c, c_out=c)
            if draw(st.booleans()):
                more, _ = b.layer(c, c_out=c)
                branch += [("relu",)] + more
            branch += b.maybe_bn_relu(c)
            ops.append(("add", tuple(branch)))
            if draw(st.booleans()):
                ops.append(("relu",))
        elif block == "cat":
            ca = draw(st.integers(1, MAX_CHANNELS - 1))
            cb = draw(st.integers(1, MAX_CHANNELS - ca))
            a, _ = b.layer(c, c_out=ca)
            bb, _ = b.layer(c, c_out=cb)
            ops.append(("cat", tuple(a), tuple(bb)))
            c = ca + cb
        elif block == "inplace":
            branch, _ = b.layer(c, c_out=c)
            branch += b.maybe_bn_relu(c)
            ops.append(("inplace", tuple(branch), draw(st.booleans()), draw(st.booleans())))
        elif block == "mode":
            c2 = draw(st.integers(1, MAX_CHANNELS))
            in_train, _ = b.layer(c, c_out=c2)
            in_eval, _ = b.layer(c, c_out=c2)
            ops.append(("mode", tuple(in_train), tuple(in_eval)))
            c = c2
        elif block == "twice":
            conv = b.conv(in_channels=c, out_channels=c, kernel_size=3, padding=1)
            middle = [("relu",)] + ([b.bn(c)] if draw(st.booleans()) else [])
            ops += [conv] + middle + [conv]
        elif block == "inverted":  # a mobile inverted residual block: 1x1 expand, depthwise 3x3, 1x1 project
            wide = draw(st.integers(max(2, c), MAX_CHANNELS))
            stride = 2 if i > 0 and min(h, w) >= 4 and draw(st.booleans()) else 1
            branch = [b.conv(in_channels=c, out_channels=wide, kernel_size=1)] + b.maybe_bn_relu(wide)
            branch += [b.conv(in_channels=wide, out_channels=wide, kernel_size=3, stride=stride, padding=1,
                              groups=wide)] + b.maybe_bn_relu(wide)
            c2 = c if stride == 1 and draw(st.booleans()) else draw(st.integers(1, MAX_CHANNELS))
            branch.append(b.conv(in_channels=wide, out_channels=c2, kernel_size=1))
            if stride == 1 and c2 == c and draw(st.booleans()):
                ops.append(("add", tuple(branch)))
            else:
                ops += branch
            c = c2
            if stride == 2:
                h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        elif block == "down":
            how = draw(st.sampled_from(["max", "avg", "strided", "strided_dw"]))
            b.features.add("pool" if how in ("max", "avg") else how)
            if how in ("max", "avg"):
                ops.append(("pool", how))
                h, w = h // 2, w // 2
            else:
                c2 = c if how == "strided_dw" else draw(st.integers(1, MAX_CHANNELS))
                groups = c if how == "strided_dw" else 1
                ops.append(b.conv(in_channels=c, out_channels=c2, kernel_size=3, stride=2, padding=1, groups=groups))
                c = c2
                h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        else:  # up
            c2 = draw(st.integers(1, MAX_CHANNELS))
            ops.append(b.conv("convT", in_channels=c, out_channels=c2, kernel_size=2, stride=2))
            b.features.add("convT")
            c, h, w = c2, 2 * h, 2 * w
    head = draw(st.sampled_from(["gap", "flatten"]))
    b.features.update({head, "linear"})
    if head == "gap":
        ops += [("gap",), ("flatten",)]
        feats = c
    else:
        ops.append(("flatten",))
        feats = c * h * w
    ops.append(b.module("fc", "linear", in_features=feats, out_features=draw(st.integers(2, 10))))
    return GraphRecipe(
        ops=tuple(ops),
        modules=tuple(b.modules),
        params=tuple(b.params),
        input_shape=in_shape,
        seed=draw(seeds()),
        features=frozenset(b.features),
    )


def graph_recipes(max_blocks: int = 5, first_block: str | None = None) -> st.SearchStrategy[GraphRecipe]:
    """Strategy for :class:`GraphRecipe`: 1..max_blocks blocks, then a flatten + ``nn.Linear`` head.

    Blocks: conv chain (optional BN/ReLU), residual add, channel concat of two branches, one conv used twice,
    a layer that differs between train and eval mode (``if self.training``, like auxiliary heads), a mobile
    inverted residual block (1x1 expand, depthwise 3x3 of stride 1 or 2, 1x1 project, with or without the add),
    a residual block of in-place writes (``y.add_(x)``, then maybe ``relu_``; maybe ``x`` written through a view
    between the branch and the add),
    downsampling (max/avg pool, strided conv, strided depthwise conv), upsampling ConvTranspose2d(k=2, s=2).
    Layers: 3x3 conv, non-square kernels, padding='same' with even kernels, :class:`WSConv2d`, reflect padding,
    1x1, raw-parameter ``F.conv2d``, ConvTranspose2d(k=3, p=1), grouped, depthwise. Input (1-2, 3, 8-12, 8-12),
    channels <= 8; every BatchNorm sees at least 4 positions per channel, so train mode also works.
    ``recipe.features`` names what a recipe contains (block and layer kinds above, "bn", "relu", "linear", ...).
    ``first_block`` ("chain", "res", "cat", "twice", "mode", "inverted" or "inplace"): the first block's kind,
    else drawn.
    """
    return _graph_recipes(max_blocks, first_block)


def random_graph_models(
    dtype: torch.dtype = torch.float64, max_blocks: int = 5, train: bool = False, first_block: str | None = None
) -> st.SearchStrategy[ModelCase]:
    """Strategy for ``(module, example_input)``: a :class:`RecipeNet` (eval mode unless ``train``) and its input
    (``first_block``: as :func:`graph_recipes`').

    The module keeps its recipe as ``module.recipe`` (rebuild with ``module.recipe.build()``).
    """

    @st.composite
    def cases(draw):
        recipe = draw(graph_recipes(max_blocks, first_block))
        return ModelCase(recipe.build(dtype=dtype, train=train), recipe.example_input(draw(seeds()), dtype=dtype))

    return cases()


# --------------------------------------------------------------------------------------------------------------
# Masks, sparsities, tracing
# --------------------------------------------------------------------------------------------------------------


@st.composite
def masks_like(draw, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A random 0/1 mask of ``tensor``'s shape and device with a drawn number of kept entries.

    The kept count is 0, all, or anything between (exact, chosen positions uniformly at random).
    dtype: ``dtype`` if given, else ``tensor``'s dtype if floating point, else float32.
    """
    n = tensor.numel()
    keep = draw(st.one_of(st.just(n), st.just(0), st.integers(0, n)))
    if dtype is None:
        dtype = tensor.dtype if tensor.dtype.is_floating_point else torch.float32
    flat = torch.zeros(n, dtype=dtype)
    idx = torch.randperm(n, generator=_generator(draw(seeds())))[:keep]
    flat[idx] = 1
    return flat.reshape(tensor.shape).to(tensor.device)


def sparsities(min_value: float = 0.0, max_value: float = 0.99) -> st.SearchStrategy[float]:
    """Target sparsities in [min_value, max_value]; the bounds and 0.5/0.9/0.99 come up often."""
    assert 0.0 <= min_value <= max_value <= 1.0
    special = sorted({v for v in (min_value, 0.5, 0.9, 0.99, max_value) if min_value <= v <= max_value})
    return st.one_of(
        st.sampled_from(special),
        st.floats(min_value=min_value, max_value=max_value, allow_nan=False, allow_infinity=False),
    )


class ConvIntoTracer(torch.fx.Tracer):
    """A tracer that does not stop at ``nn.Conv*`` / ``nn.ConvTranspose*`` / ``nn.Linear``: it traces their
    forward, so the graph shows ``F.conv*`` / ``F.linear`` calls on ``get_attr`` weights."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            return False
        return super().is_leaf_module(m, module_qualified_name)


def trace_into_convs(model: nn.Module, concrete_args: dict | None = None) -> torch.fx.GraphModule:
    """``symbolic_trace`` with :class:`ConvIntoTracer`.

    A bare ``nn.ConvTranspose*d`` as the *root* needs ``concrete_args={"output_size": None}``: otherwise its
    optional ``output_size`` argument becomes a placeholder and ``_output_padding`` branches on it
    (``TraceError``). This is supplied automatically; as a submodule the default ``None`` is used anyway.
    """
    if concrete_args is None and isinstance(model, nn.modules.conv._ConvTransposeNd):
        concrete_args = {"output_size": None}
    graph = ConvIntoTracer().trace(model, concrete_args=concrete_args)
    return torch.fx.GraphModule(model, graph, type(model).__name__)
