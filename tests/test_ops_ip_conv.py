"""Tests of the fused IP ops ``ipfx::ip_conv`` / ``ipfx::sparse_linear`` and their modules.

The reference is always the dense computation: ``W = reshape(C @ B, weight_shape)`` followed by
``F.conv{d}d`` / ``F.conv_transpose{d}d`` / ``F.linear``.
"""

from __future__ import annotations

import copy
import io
import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import run_in_threads
from ipfx.errors import IPFXValueError
from ipfx.ops import native, order as order_mod
from ipfx.ops.ip_conv import (
    ORDER_BASIS_FIRST,
    ORDER_COEFF_FIRST,
    ORDER_DENSE,
    SparseIPConv,
    SparseLinear,
    choose_order,
    sparse_coefficients,
)
from ipfx.ops.order import MATVEC_COSTS, ORDER_NATIVE, ORDER_TUNED, cost_terms, folded_nnz, order_costs

ALL_ORDERS = (0, ORDER_TUNED, ORDER_BASIS_FIRST, ORDER_COEFF_FIRST, ORDER_DENSE, ORDER_NATIVE)

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
EXAMPLES = 60


# ----------------------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ConvCase:
    d: int
    transposed: bool
    c_in: int
    c_out: int
    groups: int
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    output_padding: tuple
    spatial: tuple
    batch: int
    sparsity: float
    basis_kind: str  # "none" | "orthogonal" | "random"
    bias: bool
    seed: int

    @property
    def weight_shape(self) -> tuple:
        if self.transposed:
            return (self.c_in, self.c_out // self.groups, *self.kernel)
        return (self.c_out, self.c_in // self.groups, *self.kernel)

    @property
    def K(self) -> int:
        return math.prod(self.kernel)


def _min_input(transposed: bool, k: int, s: int, p: int, dl: int, op: int) -> int:
    """Smallest input length giving a non-empty output."""
    if transposed:  # (L-1)*s - 2p + dl*(k-1) + op + 1 >= 1
        need = 2 * p - dl * (k - 1) - op
        return 1 + max(0, -(-need // s))
    return max(1, dl * (k - 1) + 1 - 2 * p)  # L + 2p >= dl*(k-1) + 1


@st.composite
def conv_cases(draw) -> ConvCase:
    d = draw(st.sampled_from([1, 2, 3]))
    transposed = draw(st.booleans())
    mode = draw(st.sampled_from(["plain", "grouped", "depthwise"]))
    if mode == "plain":
        groups, cin_g, cout_g = 1, draw(st.integers(1, 3)), draw(st.integers(1, 3))
    elif mode == "grouped":
        groups, cin_g, cout_g = draw(st.integers(2, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    else:  # depthwise: groups == c_in, channel multiplier 1 or 2
        groups, cin_g, cout_g = draw(st.integers(1, 4)), 1, draw(st.integers(1, 2))
    kmax = 4 if d < 3 else 3
    kernel = tuple(draw(st.integers(1, kmax)) for _ in range(d))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(d))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(d))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(d))
    if transposed:
        output_padding = tuple(draw(st.integers(0, max(s, dl) - 1)) for s, dl in zip(stride, dilation))
    else:
        output_padding = (0,) * d
    extra = 3 if d < 3 else 2
    spatial = tuple(
        draw(st.integers(m, m + extra))
        for m in (
            _min_input(transposed, k, s, p, dl, op)
            for k, s, p, dl, op in zip(kernel, stride, padding, dilation, output_padding)
        )
    )
    return ConvCase(
        d=d,
        transposed=transposed,
        c_in=groups * cin_g,
        c_out=groups * cout_g,
        groups=groups,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        output_padding=output_padding,
        spatial=spatial,
        batch=draw(st.integers(1, 2)),
        sparsity=draw(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))),
        basis_kind=draw(st.sampled_from(["none", "orthogonal", "random"])),
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@dataclass
class ConvTensors:
    x: torch.Tensor
    coeff: torch.Tensor  # (w0, w1, K), masked
    basis: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]


def make_tensors(case: ConvCase, dtype=torch.float64) -> ConvTensors:
    gen = torch.Generator().manual_seed(case.seed)
    ws = case.weight_shape
    K = case.K
    coeff = torch.randn(ws[0], ws[1], K, generator=gen, dtype=torch.float64)
    keep = torch.rand(coeff.shape, generator=gen, dtype=torch.float64) >= case.sparsity
    coeff = coeff * keep
    if case.basis_kind == "none":
        basis = None
    elif case.basis_kind == "orthogonal":
        basis, _ = torch.linalg.qr(torch.randn(K, K, generator=gen, dtype=torch.float64))
    else:
        basis = torch.randn(K, K, generator=gen, dtype=torch.float64) + 2.0 * torch.eye(K, dtype=torch.float64)
    x = torch.randn(case.batch, case.c_in, *case.spatial, generator=gen, dtype=torch.float64)
    bias = torch.randn(case.c_out, generator=gen, dtype=torch.float64) if case.bias else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return ConvTensors(cast(x), cast(coeff), cast(basis), cast(bias))


def dense_weight(case: ConvCase, t: ConvTensors) -> torch.Tensor:
    c = t.coeff if t.basis is None else t.coeff @ t.basis
    return c.reshape(case.weight_shape)


def dense_conv(case: ConvCase, x, w, bias) -> torch.Tensor:
    if case.transposed:
        return CONV_T[case.d](
            x, w, bias, case.stride, case.padding, case.output_padding, case.groups, case.dilation
        )
    return CONV[case.d](x, w, bias, case.stride, case.padding, case.dilation, case.groups)


def error_scale(case: ConvCase, t: ConvTensors) -> float:
    """max of conv(|x|, |W|) + |bias|: bounds every partial sum, so it is the natural absolute scale."""
    w = dense_weight(case, ConvTensors(t.x.double(), t.coeff.double(), _d(t.basis), _d(t.bias)))
    s = dense_conv(case, t.x.double().abs(), w.abs(), None if t.bias is None else t.bias.double().abs())
    return float(s.max()) if s.numel() else 0.0


def _d(t):
    return None if t is None else t.double()


def op_call(case: ConvCase, t: ConvTensors, order: int) -> torch.Tensor:
    values, indices = sparse_coefficients(t.coeff)
    return torch.ops.ipfx.ip_conv(
        t.x,
        values,
        indices,
        t.basis,
        t.bias,
        list(case.weight_shape),
        list(case.stride),
        list(case.padding),
        list(case.dilation),
        case.groups,
        case.transposed,
        list(case.output_padding),
        order,
    )


def module_for(case: ConvCase, t: ConvTensors) -> SparseIPConv:
    return SparseIPConv.from_coefficients(
        t.coeff,
        t.basis,
        t.bias,
        weight_shape=case.weight_shape,
        stride=case.stride,
        padding=case.padding,
        dilation=case.dilation,
        groups=case.groups,
        transposed=case.transposed,
        output_padding=case.output_padding,
    )


def assert_close(y: torch.Tensor, ref: torch.Tensor, rtol: float, scale: float) -> None:
    assert y.shape == ref.shape, (y.shape, ref.shape)
    assert y.dtype == ref.dtype
    err = float((y.double() - ref.double()).abs().max()) if y.numel() else 0.0
    assert err <= rtol * scale + 1e-30, f"max abs error {err:.3e} > {rtol:.0e} * scale {scale:.3e}"


# ----------------------------------------------------------------------------------------------------------
# property tests: every order equals the dense conv
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=conv_cases())
def test_ip_conv_all_orders_match_dense_float64(case: ConvCase):
    t = make_tensors(case, torch.float64)
    ref = dense_conv(case, t.x, dense_weight(case, t), t.bias)
    scale = error_scale(case, t)
    for order in ALL_ORDERS:
        assert_close(op_call(case, t, order), ref, 1e-10, scale)
    # the module path (order 0) and its dense weight
    m = module_for(case, t)
    with torch.no_grad():
        assert_close(m(t.x), ref, 1e-10, scale)
    assert torch.allclose(m.to_dense_weight(), dense_weight(case, t), rtol=0, atol=1e-12)


@settings(max_examples=EXAMPLES // 2, deadline=None)
@given(case=conv_cases())
def test_ip_conv_all_orders_match_dense_float32(case: ConvCase):
    t = make_tensors(case, torch.float32)
    ref = dense_conv(case, t.x, dense_weight(case, t), t.bias)
    scale = error_scale(case, t)
    for order in ALL_ORDERS:
        assert_close(op_call(case, t, order), ref, 1e-5, scale)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    out_f=st.integers(1, 8),
    in_f=st.integers(1, 8),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    sparsity=st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**31 - 1),
)
def test_sparse_linear_matches_dense(out_f, in_f, lead, sparsity, bias, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    w = (w * (torch.rand(w.shape, generator=gen, dtype=torch.float64) >= sparsity)).to(dtype)
    b = torch.randn(out_f, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    x = torch.randn(*lead, in_f, generator=gen, dtype=torch.float64).to(dtype)
    ref = F.linear(x, w, b)
    m = SparseLinear.from_weight(w, b)
    y = m(x)
    scale = float((x.abs().double() @ w.abs().double().T).max()) + (float(b.abs().max()) if bias else 0.0)
    assert_close(y, ref, 1e-12 if dtype == torch.float64 else 1e-5, scale)
    assert torch.equal(m.to_dense_weight(), w)


# ----------------------------------------------------------------------------------------------------------
# targeted cases
# ----------------------------------------------------------------------------------------------------------


def _case(**kw) -> ConvCase:
    base = dict(
        d=2,
        transposed=False,
        c_in=4,
        c_out=6,
        groups=1,
        kernel=(3, 3),
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        output_padding=(0, 0),
        spatial=(6, 5),
        batch=2,
        sparsity=0.5,
        basis_kind="orthogonal",
        bias=True,
        seed=0,
    )
    base.update(kw)
    return ConvCase(**base)


TARGETED = [
    _case(),
    _case(c_in=4, c_out=4, groups=4),  # depthwise
    _case(c_in=4, c_out=8, groups=4, transposed=True, stride=(2, 2), output_padding=(1, 0)),
    _case(kernel=(1, 1), basis_kind="none", padding=(0, 0), stride=(2, 1)),  # 1x1, K = 1
    _case(kernel=(2, 4), basis_kind="random", dilation=(2, 1), padding=(0, 2)),  # even, non-square
    _case(d=1, kernel=(5,), stride=(2,), padding=(2,), dilation=(1,), output_padding=(0,), spatial=(9,), basis_kind="none"),
    _case(d=3, kernel=(3, 1, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2), output_padding=(0, 0, 0),
          spatial=(4, 5, 3), groups=2, basis_kind="none"),
    _case(sparsity=1.0, bias=False),  # fully masked: exact zeros
    _case(sparsity=0.0, transposed=True, groups=2),
]


@pytest.mark.parametrize("case", TARGETED, ids=range(len(TARGETED)))
@pytest.mark.parametrize("order", ALL_ORDERS)
def test_targeted_cases(case, order):
    t = make_tensors(case)
    ref = dense_conv(case, t.x, dense_weight(case, t), t.bias)
    assert_close(op_call(case, t, order), ref, 1e-10, error_scale(case, t))


def test_fully_masked_without_bias_is_exactly_zero():
    case = _case(sparsity=1.0, bias=False)
    t = make_tensors(case)
    for order in (1, 2, ORDER_NATIVE):
        y = op_call(case, t, order)
        assert torch.count_nonzero(y) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("basis_kind", ["none", "orthogonal"])
def test_half_dtypes(dtype, order, transposed, basis_kind):
    case = _case(transposed=transposed, basis_kind=basis_kind, groups=2)
    t = make_tensors(case, dtype)
    t32 = ConvTensors(*(None if v is None else v.float() for v in (t.x, t.coeff, t.basis, t.bias)))
    ref = dense_conv(case, t32.x, dense_weight(case, t32), t32.bias)
    y = op_call(case, t, order)
    assert y.dtype == dtype
    assert_close(y.float(), ref, 5e-2, error_scale(case, t32))


def test_unbatched_input():
    case = _case(batch=1, transposed=True, stride=(2, 1), output_padding=(1, 0))
    t = make_tensors(case)
    m = module_for(case, t)
    with torch.no_grad():
        assert torch.allclose(m(t.x[0]), m(t.x)[0], rtol=0, atol=1e-12)


def test_int64_indices_and_repeated_indices_are_summed():
    case = _case(basis_kind="none", bias=False)
    t = make_tensors(case)
    values, indices = sparse_coefficients(t.coeff)
    # split every value in two halves stored at the same index, int64
    values2 = torch.cat([values / 2, values / 2])
    indices2 = torch.cat([indices, indices]).long()
    m = SparseIPConv(values2, indices2, None, None, weight_shape=case.weight_shape, padding=1)
    ref = dense_conv(case, t.x, dense_weight(case, t), None)
    for order in (1, 2, ORDER_NATIVE):
        assert_close(m(t.x, order), ref, 1e-10, error_scale(case, t))


def test_inference_only_no_grad_and_plain_forward():
    case = _case()
    t = make_tensors(case)
    m = module_for(case, t).eval()
    with torch.no_grad():
        a = m(t.x)
    b = m(t.x)  # plain eval without no_grad also works
    assert torch.equal(a, b)
    x = t.x.clone().requires_grad_(True)
    y = m(x)
    with pytest.raises(RuntimeError, match="inference-only"):
        y.sum().backward()


def test_an_ops_output_may_be_written_in_place_under_autograd():
    """What follows a fused op may write its output in place (``hardswish(inplace=True)`` after a classifier's
    linear, ``relu_`` after an unbatched conv) with autograd on and an input that requires grad: the forward
    computes what it computes without autograd, and only a backward raises (inference-only). A kernel that returned
    a view of its own result (a 2-d linear output reshaped, an unbatched output squeezed) made torch refuse the
    in-place write on the forward ("... is a view and is being modified inplace")."""
    torch.manual_seed(0)
    w = torch.randn(7, 12) * (torch.rand(7, 12) < 0.5)
    case = _case()
    t = make_tensors(case)
    conv = module_for(case, t).eval()
    calls = [(SparseLinear.from_weight(w, torch.randn(7)).eval(), (5, 12), lambda y: F.hardswish(y, inplace=True))]
    for order in (ORDER_BASIS_FIRST, ORDER_COEFF_FIRST, ORDER_DENSE, ORDER_NATIVE):
        calls.append((lambda x, order=order: conv(x, order), t.x[0].shape, lambda y: y.relu_()))
    for op, shape, write in calls:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = write(op(x))
        y = write(op(x.clone().requires_grad_(True)))
        assert y.requires_grad and torch.equal(y, expected)
        with pytest.raises(RuntimeError, match="inference-only"):
            y.sum().backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_compute_as_closely_as_the_dense_conv(dtype):
    """A float16/bfloat16 input on CPU runs the float32 plan and rounds once (``WIDENED_ON_CPU``): every order's
    output is within twice the dense conv's distance (aten's, in ``dtype``) from the float64 result. Computed
    in ``dtype``, a 64-channel 3x3 layer was several times further off. A residual of another dtype promotes as
    ``+`` does."""
    torch.manual_seed(0)
    case = _case(c_in=64, c_out=32, bias=True)
    t = make_tensors(case)
    m = module_for(case, t).eval()
    x = torch.randn(2, 64, 12, 12)
    weight = m.to_dense_weight().double()
    truth = F.conv2d(x.double(), weight, m.bias.double(), padding=1)
    dense = F.conv2d(x.to(dtype), weight.to(dtype), m.bias.to(dtype), padding=1)
    allowed = 2 * float((dense.double() - truth).abs().max())
    wide = m.to(dtype)
    with torch.no_grad():
        for order in (ORDER_BASIS_FIRST, ORDER_COEFF_FIRST, ORDER_DENSE, ORDER_NATIVE):
            y = wide(x.to(dtype), order)
            assert y.dtype == dtype and float((y.double() - truth).abs().max()) <= allowed, order
        residual = torch.randn(2, 32, 12, 12)
        y = wide(x.to(dtype), residual=residual)
        assert y.dtype == torch.float32 and torch.allclose(y.double(), truth + residual.double(), atol=allowed)
        lin = SparseLinear.from_weight(torch.randn(16, 256) * (torch.rand(16, 256) < 0.5)).eval()
        xl = torch.randn(4, 256)
        exact = xl.double() @ lin.to_dense_weight().double().t()
        dense_l = F.linear(xl.to(dtype), lin.to_dense_weight().to(dtype))
        got = lin.to(dtype)(xl.to(dtype))
        assert got.dtype == dtype
        assert float((got.double() - exact).abs().max()) <= 2 * float((dense_l.double() - exact).abs().max())


# constants for hand computation: (t0, basis, maps, sparse, dense, dense_grouped, io, taps, rows, runs) ns per unit
UNIT = {1: (1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0), 2: (1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        3: (2.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0), 4: (0.0, 0.5, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 1.0, 0.5)}


def test_cost_model_hand_computed_cases():
    # 3x3, 64 -> 64 at 10x10 (P = 100), nnz = 1843 (95%): MACs of the orders by the module docstring
    kw = dict(c_in=64, c_out=64, K=9, nnz=1843, p_in=100, p_out=100)
    costs = order_costs(constants=UNIT, **kw)
    assert costs[1] == 1 + 64 * 81 * 100 + 1843 * 100  # basis c_in K K P + sparse nnz P
    assert costs[2] == 1 + 64 * 81 * 100 + 1843 * 100  # c_out K K P + nnz P_in: equal here
    assert costs[3] == 2 + 64 * 64 * 9 * 100  # dense MACs
    assert 4 not in costs  # native only when it may run
    assert choose_order(constants=UNIT, **kw) == 1  # tie between 1 and 2 goes to the lower number
    # native: u = c_in K (1 - (1 - density)^c_out) basis rows are computed
    density = 1843 / (64 * 64 * 9)
    used = 64 * 9 * (1 - (1 - density) ** 64)
    native_costs = order_costs(constants=UNIT, native=True, **kw)
    rows = 64 * 2  # 64 output channels x 2 tiles of 64 positions (tile_for(64, 9, 4) == 64)
    runs = 64 * 9 * 2 * (64 // 100 + 1 + 1)  # c_in K rows gathered per tile, 1-d (width = P): 2 segments a tile
    assert native_costs[4] == pytest.approx(0.5 * (used * 9 * 100) + 0.5 * 1843 * 100 + rows + 0.5 * runs, rel=1e-12)
    assert choose_order(constants=UNIT, native=True, **kw) == 4
    # strided: order (b) pays its sparse MACs at the 4x larger input resolution
    strided = dict(kw, p_in=400)
    assert order_costs(constants=UNIT, **strided)[2] == 1 + 64 * 81 * 100 + 1843 * 400
    assert choose_order(constants=UNIT, **strided) == 1
    # few output channels: (b) is cheaper
    narrow = dict(kw, c_out=8, nnz=8 * 64 * 9 // 10)
    assert choose_order(constants=UNIT, **narrow) == 2
    # dense wins when the sparse orders' basis work exceeds the dense MACs (depthwise)
    dw = dict(c_in=64, c_out=64, K=9, nnz=64 * 9, p_in=100, p_out=100, groups=64)
    assert choose_order(constants=UNIT, **dw) == 3
    # a grouped SP conv run directly: one copy of the input, the sparse MACs, a row visit per 64 positions
    dw_direct = dict(dw, nnz=64, identity=True, direct=True)
    assert order_costs(constants=UNIT, native=True, **dw_direct)[4] == 0.5 * 64 * 100 + 64 * 2
    # a grouped conv with a basis run as its folded kernel: the native terms are SP's with the folded kernel's
    # expected nonzeros (K taps for each of the c_out * c_in/groups pairs keeping a coefficient); the others
    # are order (a)'s, (b)'s and the dense conv's as without folding
    density = 29 / (64 * 9)
    assert folded_nnz(64, 64, 9, 29, 64) == round(64 * 9 * (1 - (1 - density) ** 9)) == 214
    folded = cost_terms(**dict(dw, nnz=29, direct=True, folded=True))
    assert folded[4] == cost_terms(**dict(dw, nnz=214, identity=True, direct=True))[4]
    assert {k: v for k, v in folded.items() if k != 4} == {
        k: v for k, v in cost_terms(**dict(dw, nnz=29)).items() if k != 4}
    # with the fitted constants: mobilenet's 240-channel depthwise 3x3 @14 with a basis at 95% runs natively
    # folded (measured 0.22-0.24x the dense conv), where order (a) lost to the dense conv
    ip_dw = dict(c_in=240, c_out=240, K=9, nnz=108, p_in=196, p_out=196, groups=240, width=14, direct=True)
    assert choose_order(native=True, folded=True, **ip_dw) == 4
    assert choose_order(native=True, **dict(ip_dw, direct=False)) == 3
    # a pointwise SP conv on single-position maps: a sparse matrix times the batch's vectors, where the native
    # kernel may run costed by MATVEC_COSTS, native against dense only (ns: a + b nnz / a + c N nnz; d + e W /
    # f + h W + g N W for the W = c_out c_in weights)
    se = dict(c_in=960, c_out=240, K=1, nnz=11520, p_in=1, p_out=1, identity=True, cheap_identity=True)
    (a, b, c), (d, e, f, h, g) = MATVEC_COSTS[4], MATVEC_COSTS[3]
    w = 960 * 240
    assert order_costs(native=True, **se) == {4: a + b * 11520, 3: d + e * w}
    assert order_costs(native=True, batch=32, **se) == {4: a + c * 32 * 11520, 3: f + h * w + g * 32 * w}
    assert order_costs(native=True, itemsize=8, batch=32, **se) == {4: a + 2 * c * 32 * 11520,
                                                                    3: f + 2 * (h * w + g * 32 * w)}
    assert set(order_costs(native=False, **se)) == {1, 2, 3}  # (the general terms where it may not)
    assert 1 in order_costs(native=True, **dict(se, p_in=4, p_out=4))
    # batch multiplies every term but t0; identity with a copy-only basis stage drops the basis term
    assert order_costs(constants=UNIT, batch=2, **kw)[1] == 1 + 2 * (64 * 81 * 100 + 1843 * 100)
    assert order_costs(constants=UNIT, cheap_identity=True, **kw)[1] == 1 + 1843 * 100
    # a maps budget: order (b) of a 7x7 stride-2 stem would need c_out*49 maps at input resolution
    stem = dict(c_in=3, c_out=64, K=49, nnz=3 * 64 * 49, p_in=224 * 224, p_out=112 * 112)
    assert 2 not in order_costs(constants=UNIT, **stem)


def test_the_choice_is_a_pure_function_of_geometry_and_nnz():
    kw = dict(c_in=256, c_out=256, K=9, nnz=5898, p_in=196, p_out=196, batch=1)
    picks = {choose_order(native=True, **kw) for _ in range(20)}
    assert len(picks) == 1
    assert order_costs(native=True, **kw) == order_costs(native=True, **kw)
    # the shipped constants: at 99% the sparse work is ~20x below dense, so the dense order is not picked
    assert picks != {ORDER_DENSE}


@pytest.mark.parametrize("case", [
    _case(),
    _case(basis_kind="none", c_in=8, c_out=8, spatial=(9, 9)),
    _case(transposed=True, groups=2, stride=(2, 1), output_padding=(1, 0)),
    _case(d=1, kernel=(3,), stride=(1,), padding=(1,), dilation=(1,), output_padding=(0,), spatial=(17,)),
], ids=range(4))
def test_auto_order_is_bitwise_deterministic_across_calls_and_fresh_modules(case):
    t = make_tensors(case, torch.float32)
    with torch.no_grad():
        first = module_for(case, t)(t.x)
        for _ in range(3):
            assert torch.equal(module_for(case, t)(t.x), first)  # fresh module
        m = module_for(case, t)
        assert all(torch.equal(m(t.x), first) for _ in range(3))  # same module
        assert torch.equal(op_call(case, t, 0), first)  # through the dispatcher (the op's CPU kernel)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda kw: kw.update(indices=kw["indices"][:-1]), "same length"),
        (lambda kw: kw.update(indices=kw["indices"].clone().fill_(10**6)), "out of range"),
        (lambda kw: kw.update(indices=kw["indices"].float()), "int32 or int64"),
        (lambda kw: kw.update(basis=torch.eye(4, dtype=torch.float64)), r"\(K, K\)"),
        (lambda kw: kw.update(order=7), "order"),
        (lambda kw: kw.update(groups=3), "groups"),
        (lambda kw: kw.update(stride=[1, 1, 1]), "stride"),
        (lambda kw: kw.update(x=kw["x"][:, :3]), "input channels"),
        (lambda kw: kw.update(bias=torch.zeros(2, dtype=torch.float64)), "bias"),
        (lambda kw: kw.update(output_padding=[1, 0]), "output_padding"),
    ],
)
def test_bad_arguments_raise_clear_errors(mutate, match):
    case = _case()
    t = make_tensors(case)
    values, indices = sparse_coefficients(t.coeff)
    kw = dict(
        x=t.x,
        values=values,
        indices=indices,
        basis=t.basis,
        bias=t.bias,
        weight_shape=list(case.weight_shape),
        stride=[1, 1],
        padding=[1, 1],
        dilation=[1, 1],
        groups=1,
        transposed=False,
        output_padding=[0, 0],
        order=0,
    )
    mutate(kw)
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.ipfx.ip_conv(**kw)


# ----------------------------------------------------------------------------------------------------------
# export, serialisation, storage
# ----------------------------------------------------------------------------------------------------------


class _Tiny(torch.nn.Module):
    def __init__(self, conv: SparseIPConv, convt: SparseIPConv, lin: SparseLinear):
        super().__init__()
        self.conv, self.convt, self.lin = conv, convt, lin

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = self.convt(h)
        return self.lin(h.mean(dim=(2, 3)))


def _tiny_model() -> tuple[_Tiny, torch.Tensor]:
    case = _case(c_in=3, c_out=4, stride=(2, 2))
    t = make_tensors(case, torch.float32)
    conv = module_for(case, t)
    case_t = _case(c_in=4, c_out=4, groups=2, transposed=True, stride=(2, 2), output_padding=(1, 1), seed=1)
    tt = make_tensors(case_t, torch.float32)
    convt = module_for(case_t, tt)
    w = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    lin = SparseLinear.from_weight(w * (w.abs() > 0.5), torch.randn(5))
    return _Tiny(conv, convt, lin).eval(), torch.randn(2, 3, 8, 7, generator=torch.Generator().manual_seed(3))


def test_torch_export_captures_ops():
    model, x = _tiny_model()
    with torch.no_grad():
        eager = model(x)
        ep = torch.export.export(model, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("ipfx.ip_conv" in s for s in targets) == 2, targets
    assert any("ipfx.sparse_linear" in s for s in targets), targets
    with torch.no_grad():
        out = ep.module()(x)
    assert torch.allclose(out, eager, rtol=0, atol=1e-6)


def test_torch_export_dynamic_batch():
    model, x = _tiny_model()
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
        x5 = torch.randn(5, 3, 8, 7)
        assert torch.allclose(ep.module()(x5), model(x5), rtol=0, atol=1e-6)


def test_deepcopy_state_dict_and_pickle_round_trips():
    case = _case(transposed=True, groups=2, stride=(2, 1), output_padding=(1, 0))
    t = make_tensors(case, torch.float32)
    m = module_for(case, t).eval()
    with torch.no_grad():
        # a fixed evaluation order: order 0 picks the fastest by timing, equal only up to rounding
        ref = m(t.x, ORDER_BASIS_FIRST)
        # deepcopy
        assert torch.equal(copy.deepcopy(m)(t.x, ORDER_BASIS_FIRST), ref)
        # state_dict into a fresh instance of the same shape but different nnz, strict
        other = make_tensors(_case(**{**case.__dict__, "seed": 7, "sparsity": 0.1}), torch.float32)
        fresh = module_for(case, other)
        assert fresh.nnz != m.nnz
        fresh.load_state_dict(m.state_dict(), strict=True)
        assert fresh.nnz == m.nnz and fresh.indices.dtype == m.indices.dtype
        assert torch.equal(fresh(t.x, ORDER_BASIS_FIRST), ref)
        # whole-module torch.save / torch.load
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert torch.equal(loaded(t.x, ORDER_BASIS_FIRST), ref)
        assert torch.allclose(loaded(t.x), ref, rtol=1e-5, atol=1e-5)
        assert loaded.weight_shape == m.weight_shape and loaded.transposed
    # SparseLinear too
    lin = SparseLinear.from_weight(torch.randn(3, 4) * (torch.rand(3, 4) > 0.5), torch.randn(3))
    x = torch.randn(2, 4)
    fresh_lin = SparseLinear.from_weight(torch.randn(3, 4), None)
    fresh_lin.bias = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    fresh_lin.load_state_dict(lin.state_dict(), strict=True)
    assert torch.equal(fresh_lin(x), lin(x))
    assert torch.equal(copy.deepcopy(lin)(x), lin(x))


def test_storage_is_compact_at_95_percent_sparsity():
    ws = (64, 64, 3, 3)
    gen = torch.Generator().manual_seed(0)
    coeff = torch.randn(64, 64, 9, generator=gen)
    coeff = coeff * (torch.rand(coeff.shape, generator=gen) >= 0.95)
    basis, _ = torch.linalg.qr(torch.randn(9, 9, generator=gen))
    m = SparseIPConv.from_coefficients(coeff, basis, torch.zeros(64), weight_shape=ws, padding=1)
    assert m.indices.dtype == torch.int32
    stored = sum(b.numel() * b.element_size() for b in m.buffers())
    dense = math.prod(ws) * 4
    assert stored < dense / 8, (stored, dense)
    assert "nnz=" in repr(m) and "transposed=False" in repr(m)


def test_tuned_order_is_measured_once_per_storage_and_shape_and_rebuilt_after_changes(monkeypatch):
    import importlib

    module = importlib.import_module("ipfx.ops.ip_conv")

    conv = SparseIPConv.from_coefficients(
        torch.randn(8, 4, 9, dtype=torch.float64) * (torch.rand(8, 4, 9) < 0.3), torch.eye(9, dtype=torch.float64),
        weight_shape=(8, 4, 3, 3), padding=1)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    ref = F.conv2d(x, conv.to_dense_weight(), padding=1)
    with torch.no_grad():
        entry = module._storage_entry(conv.indices)
        assert torch.allclose(conv(x), ref)
        assert "order" not in entry  # order 0 is the cost model: nothing timed
        assert torch.allclose(conv(x, ORDER_TUNED), ref)
        first = entry["order"]
        assert first[1] in (1, 2, 3, 4)
        conv(x, ORDER_TUNED)
        assert entry["order"] is first  # measured once, then reused
        monkeypatch.setenv("IPFX_AUTOTUNE", "1")  # order 0 means tuned now
        conv(x)
        assert entry["order"] is first
        conv.values.mul_(2)  # in place: the cached matrices and the dense weight are stale now
        assert torch.allclose(conv(x), 2 * ref)
        assert entry["order"] is not first
        for order in (1, 2, 3, 4):
            assert torch.allclose(conv(x, order), 2 * ref)


def test_the_modules_eager_inference_path_is_the_registered_op():
    """Under no_grad in eager mode the module skips the dispatcher; results and errors are the op's."""
    case = _case()
    t = make_tensors(case)
    m = module_for(case, t).eval()
    for order in (1, 2, 3, 4):
        with torch.no_grad():
            direct = m(t.x, order)
            via_op = torch.ops.ipfx.ip_conv(t.x, m.values, m.indices, m.basis, m.bias, list(m.weight_shape),
                                            list(m.stride), list(m.padding), list(m.dilation), m.groups,
                                            m.transposed, list(m.output_padding), order)
        assert torch.equal(direct, via_op), order
    wrong = t.x[:, :1]  # one input channel: the geometry is checked for every new input shape
    if t.x.shape[1] != 1:
        with torch.no_grad(), pytest.raises(IPFXValueError, match="channels"):
            m(wrong)
    graph = torch.fx.symbolic_trace(m)  # tracing sees the op, not its implementation
    assert any(n.target in (torch.ops.ipfx.ip_conv, torch.ops.ipfx.ip_conv.default) for n in graph.graph.nodes)


def test_the_op_plans_once_per_storage_and_kind_of_input_for_modules_and_loaded_programs(tmp_path):
    """The op's own kernel keeps one plan per storage and kind of input (what a loaded ``.pt2`` program or a
    graph compiled by ``torch.compile`` calls): the module's eager path and the op share it, another input shape or an
    in-place change of the coefficients plans anew with the right numbers, and the plans do not keep the
    storage alive."""
    import gc
    import weakref
    from unittest import mock

    import ipfx
    from ipfx.ops import library

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 4, 3, 3, generator=gen) * (torch.rand(6, 4, 3, 3, generator=gen) < 0.4)
    m = SparseIPConv.from_coefficients(w.reshape(6, 4, 9), weight_shape=w.shape, bias=torch.randn(6, generator=gen),
                                       padding=1).eval()
    x = torch.randn(2, 4, 7, 7, generator=gen)

    def op(x, order=0):
        return torch.ops.ipfx.ip_conv(x, m.values, m.indices, m.basis, m.bias, list(m.weight_shape), list(m.stride),
                                      list(m.padding), list(m.dilation), m.groups, m.transposed,
                                      list(m.output_padding), order)

    with mock.patch.object(library, "_build_conv_plan", wraps=library._build_conv_plan) as build:
        with torch.no_grad():
            assert torch.allclose(op(x), F.conv2d(x, w, m.bias, padding=1), atol=1e-5)
            op(x)
            assert torch.equal(m(x), op(x))  # the module's eager path: the same plan
            assert build.call_count == 1
            x2 = torch.randn(3, 4, 5, 9, generator=gen)
            assert torch.allclose(op(x2), F.conv2d(x2, w, m.bias, padding=1), atol=1e-5)
            assert build.call_count == 2
            assert len(library._storage_entry(m.indices)["plans"]) == 2
            m.values.mul_(2.0)  # in place: the plans built on the old numbers are stale, and dropped
            assert torch.allclose(op(x), F.conv2d(x, 2 * w, m.bias, padding=1), atol=1e-5)
            assert build.call_count == 3 and len(library._storage_entry(m.indices)["plans"]) == 1
            for order in (1, 2, 4):  # plans that fall back on the op's generic path, which reads the storage
                assert torch.allclose(op(x, order), F.conv2d(x, 2 * w, m.bias, padding=1), atol=1e-5)
        ipfx.deploy.save_program(m, tmp_path / "conv", x)  # the deployment file, loaded: one plan, then reused
        program = ipfx.deploy.load(tmp_path / "conv.pt2").module()
        calls = build.call_count
        with torch.no_grad():
            for _ in range(3):
                assert torch.allclose(program(x2), F.conv2d(x2, 2 * w, m.bias, padding=1), atol=1e-5)
        assert build.call_count == calls + 1
        build.reset_mock()  # (a mock keeps the arguments of its calls)
    storage = weakref.ref(m.indices)
    m = program = None  # (the closure `op` reads m: rebinding, not del)
    gc.collect()
    assert storage() is None  # the plans live beside the storage, never keep it


def test_a_module_reuses_its_last_plan_only_for_a_call_like_the_last(monkeypatch):
    """The module keeps its last plan: a call like the last one plans nothing, and every change the plan depends
    on (input shape and dtype, order, activation, IPFX_AUTOTUNE, the stored tensors changed in place or
    replaced, the geometry attributes, a parametrized bias) gives the numbers of the module as it is now. The
    kept plan is not state: the module pickles and copies after calls, and drops it when its tensors are
    converted."""
    import pickle
    from unittest import mock

    from ipfx.ops import modules

    gen = torch.Generator().manual_seed(11)
    w = torch.randn(6, 4, 3, 3, generator=gen) * (torch.rand(6, 4, 3, 3, generator=gen) < 0.4)
    bias = torch.randn(6, generator=gen)
    m = SparseIPConv.from_coefficients(w.reshape(6, 4, 9), weight_shape=w.shape, bias=bias, padding=1).eval()
    x = torch.randn(2, 4, 7, 7, generator=gen)
    x2 = torch.randn(1, 4, 5, 9, generator=gen)
    monkeypatch.delenv("IPFX_AUTOTUNE", raising=False)

    def close(y, ref):
        return y.dtype == ref.dtype and torch.allclose(y, ref, rtol=1e-5, atol=1e-5)

    with mock.patch.object(modules, "conv_plan", wraps=modules.conv_plan) as planned, torch.no_grad():
        assert close(m(x), F.conv2d(x, w, bias, padding=1))
        assert close(m(x), F.conv2d(x, w, bias, padding=1))
        assert planned.call_count == 1  # the second call: the kept plan
        assert close(m(x2), F.conv2d(x2, w, bias, padding=1)) and close(m(x), F.conv2d(x, w, bias, padding=1))
        assert planned.call_count == 3
        assert close(m(x, ORDER_BASIS_FIRST), F.conv2d(x, w, bias, padding=1)) and planned.call_count == 4
        other = SparseIPConv.from_coefficients(-w.reshape(6, 4, 9), weight_shape=w.shape)
        m.values = other.values.clone()  # replaced (the same indices; in-place version 0 both)
        assert close(m(x, ORDER_BASIS_FIRST), F.conv2d(x, -w, bias, padding=1))
        m.activation = "relu"
        assert close(m(x, ORDER_BASIS_FIRST), F.relu(F.conv2d(x, -w, bias, padding=1)))
        m.activation = "none"
        m.values.mul_(-1.0)
        assert close(m(x), F.conv2d(x, w, bias, padding=1))
        m.values.mul_(-1.0)
        assert close(m(x), F.conv2d(x, -w, bias, padding=1))
        m.bias = torch.nn.Parameter(bias + 1, requires_grad=False)
        assert close(m(x), F.conv2d(x, -w, bias + 1, padding=1))
        m.padding, m.stride = (0, 0), (2, 2)
        assert close(m(x), F.conv2d(x, -w, bias + 1, stride=2))
        m.padding, m.stride = (1, 1), (1, 1)
        calls = planned.call_count
        m(x)
        monkeypatch.setenv("IPFX_AUTOTUNE", "1")  # order 0 means tuned now: a new plan
        assert close(m(x), F.conv2d(x, -w, bias + 1, padding=1))
        assert planned.call_count == calls + 2
        monkeypatch.setenv("IPFX_AUTOTUNE", "0")
        m(x)
        assert planned.call_count == calls + 3
        monkeypatch.delenv("IPFX_AUTOTUNE")
        m.double()
        xd = x.double()
        assert close(m(xd), F.conv2d(xd, -w.double(), (bias + 1).double(), padding=1))
        assert close(m(xd), F.conv2d(xd, -w.double(), (bias + 1).double(), padding=1))
        assert planned.call_count == calls + 4
    copied, loaded = copy.deepcopy(m), pickle.loads(pickle.dumps(m))
    with torch.no_grad():
        assert torch.equal(copied(xd), m(xd)) and torch.equal(loaded(xd), m(xd))
        assert "_last_plan_memo" in m.__dict__
        m.float()
        assert "_last_plan_memo" not in m.__dict__  # (it held the float64 tensors)
        padding = [1, 1]
        m.padding = padding  # a list, then changed in place: the kept plan must not see the new value as the old
        assert close(m(x), F.conv2d(x, -w, bias + 1, padding=1))
        padding[0] = 0
        assert close(m(x), F.conv2d(x, -w, bias + 1, padding=(0, 1)))
        m.padding = (1, 1)
        assert close(m(x), F.conv2d(x, -w, bias + 1, padding=1))
        flipped = SparseIPConv.from_coefficients(w.flip(-1).reshape(6, 4, 9), weight_shape=w.shape)
        m.indices.copy_(flipped.indices)  # the same number kept, at other places: in place
        assert close(m(x), F.conv2d(x, m.to_dense_weight(), bias + 1, padding=1))
        m.compile()  # (nothing compiles until called) torch keeps the compiled call out of copies
        assert "_compiled_call_impl" not in copy.deepcopy(m).__dict__

    class Doubled(torch.nn.Module):
        def forward(self, b):
            return 2 * b

    ip = SparseIPConv.from_coefficients(w.reshape(6, 4, 9), torch.linalg.qr(torch.randn(9, 9, generator=gen))[0],
                                        bias, weight_shape=w.shape, padding=1).eval()
    with torch.no_grad():
        assert close(ip(x), F.conv2d(x, ip.to_dense_weight(), bias, padding=1))
        ip.basis.mul_(2.0)  # in place: twice the weight
        assert close(ip(x), F.conv2d(x, ip.to_dense_weight(), bias, padding=1))
        ip.basis = torch.eye(9)  # replaced
        assert close(ip(x), F.conv2d(x, w, bias, padding=1))
        ip.indices = flipped.indices.clone()  # replaced by other places (in-place version 0 both)
        assert close(ip(x), F.conv2d(x, ip.to_dense_weight(), bias, padding=1))
    torch.nn.utils.parametrize.register_parametrization(ip, "bias", Doubled())
    with torch.no_grad():  # the bias as the parametrization computes it, not the stored original
        assert close(ip(x), F.conv2d(x, ip.to_dense_weight(), 2 * bias, padding=1))

    lin = SparseLinear.from_weight(torch.randn(3, 4, generator=gen) * (torch.rand(3, 4, generator=gen) > 0.5),
                                   torch.randn(3, generator=gen))
    weight, xl = lin.to_dense_weight(), torch.randn(2, 4, generator=gen)
    with mock.patch.object(modules, "sparse_linear_plan", wraps=modules.sparse_linear_plan) as planned, \
            torch.no_grad():
        assert close(lin(xl), F.linear(xl, weight, lin.bias)) and close(lin(xl), F.linear(xl, weight, lin.bias))
        assert planned.call_count == 1
        lin.values.mul_(-1)
        assert close(lin(xl), F.linear(xl, -weight, lin.bias))
        lin.bias = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
        assert close(lin(xl), F.linear(xl, -weight))
        assert close(lin(xl[:1]), F.linear(xl[:1], -weight)) and planned.call_count == 4
    assert torch.equal(pickle.loads(pickle.dumps(lin))(xl), lin(xl))


@pytest.mark.parametrize("order", [0, ORDER_BASIS_FIRST, ORDER_COEFF_FIRST, ORDER_DENSE])
def test_a_tensor_swapped_through_data_is_seen_by_every_kept_plan(order):
    """``t.data = other`` swaps a stored tensor's data and counts no in-place version: every kept plan, folded
    kernel and matrix (keyed on the tensor's state: identity, version and its data, held) is built again, for
    the values, the indices, the basis and the bias, on the module's own path and on a linear's, also where the
    old data was freed first; the numbers are those of the module as it is now (kept on the version alone, they
    stayed the old ones; kept on the data's address alone, a freed block given back looked unchanged)."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(6, 4, 3, 3, generator=gen) * (torch.rand(6, 4, 3, 3, generator=gen) < 0.5)
    basis = torch.linalg.qr(torch.randn(9, 9, generator=gen))[0]
    m = SparseIPConv.from_coefficients(w.reshape(6, 4, 9), weight_shape=w.shape, basis=basis,
                                       bias=torch.randn(6, generator=gen), padding=1).eval()
    x = torch.randn(2, 4, 7, 7, generator=gen)

    def reference():
        dense = torch.zeros(6 * 4 * 9).index_add_(0, m.indices.long(), m.values)
        return F.conv2d(x, (dense.reshape(6, 4, 9) @ m.basis).reshape(w.shape), m.bias, padding=1)

    with torch.no_grad():
        before = m(x, order)
        assert torch.allclose(before, reference(), atol=1e-5)
        for name, swap in [("values", lambda t: t * -2), ("indices", lambda t: t.flip(0)),
                           ("basis", lambda t: t.flip(1)), ("bias", lambda t: t + 1)]:
            t = getattr(m, name)
            t.data = swap(t.data)
            y = m(x, order)
            assert not torch.allclose(y, before), name  # (premise: the swap changes the numbers)
            assert torch.allclose(y, reference(), atol=1e-5), name
            before = y
    lin = SparseLinear.from_weight(torch.randn(5, 8, generator=gen) * (torch.rand(5, 8, generator=gen) < 0.5))
    v = torch.randn(3, 8, generator=gen)
    with torch.no_grad():
        y0 = lin(v)
        lin.values.data = lin.values.data * 3
        assert torch.allclose(lin(v), y0 * 3, atol=1e-5) and not torch.allclose(y0, y0 * 3)
        assert torch.allclose(lin(v), v @ lin.to_dense_weight().T, atol=1e-5)
    big = SparseLinear.from_weight(torch.randn(64, 64, generator=gen) * (torch.rand(64, 64, generator=gen) < 0.5))
    v = torch.randn(3, 64, generator=gen)
    with torch.no_grad():
        for _ in range(10):  # the old data freed first: its block often came back for the new (the kept data's hold)
            big(v)
            n = big.values.numel()
            big.values.data = torch.empty(0)
            big.values.data = torch.randn(n, generator=gen) * 10
            assert torch.allclose(big(v), v @ big.to_dense_weight().T, atol=1e-3)


def test_threads_calling_one_storage_with_more_input_kinds_than_it_keeps_plans_for_get_the_right_numbers():
    """Four threads call one conv (module and op alternately) with twelve input shapes, more than
    ``PLANS_PER_STORAGE``: plans are built, dropped and rebuilt under each other, and every result is the
    conv of its own input."""
    
    from ipfx.ops.library import PLANS_PER_STORAGE

    gen = torch.Generator().manual_seed(5)
    w = torch.randn(8, 4, 3, 3, generator=gen) * (torch.rand(8, 4, 3, 3, generator=gen) < 0.4)
    m = SparseIPConv.from_coefficients(w.reshape(8, 4, 9), weight_shape=w.shape, padding=1).eval()
    xs = [torch.randn(1 + i % 2, 4, 5 + i, 6 + i, generator=gen) for i in range(PLANS_PER_STORAGE + 4)]
    refs = [F.conv2d(x, w, padding=1) for x in xs]
    wrong: list = []

    def work(k: int) -> None:
        try:
            with torch.no_grad():
                for r in range(120):
                    i = (r * 7 + k) % len(xs)
                    y = m(xs[i]) if r % 2 else torch.ops.ipfx.ip_conv(
                        xs[i], m.values, m.indices, None, None, [8, 4, 3, 3], [1, 1], [1, 1], [1, 1], 1, False,
                        [0, 0], 0)
                    if not torch.allclose(y, refs[i], atol=1e-5):
                        wrong.append(i)
        except Exception as exc:  # noqa: BLE001  (reported below, with the thread's input)
            wrong.append(repr(exc))

    run_in_threads(work)
    assert wrong == []


@pytest.mark.parametrize("d", [2, 3])
def test_the_dense_order_keeps_its_weight_in_a_channels_last_inputs_layout(d):
    """torch's CPU conv computes a channels-last input in that layout and converts a weight that is not, a copy
    of the whole dense weight on every call: the dense order keeps its weight in the input's layout (one per
    layout), so a call of the module's plan copies nothing and gives F.conv's numbers and output layout, for
    channels-last and contiguous inputs in turn; the op gives the same numbers."""
    layout = torch.channels_last if d == 2 else torch.channels_last_3d
    spatial = (9, 8) if d == 2 else (5, 6, 4)
    gen = torch.Generator().manual_seed(0)
    coeff = torch.randn(16, 8, 3 ** d, generator=gen)
    m = SparseIPConv.from_coefficients(coeff, None, torch.randn(16, generator=gen), weight_shape=(16, 8) + (3,) * d,
                                       padding=1).eval()
    w = m.to_dense_weight()
    conv = F.conv2d if d == 2 else F.conv3d
    for fmt in (layout, torch.contiguous_format, layout):
        x = torch.randn(2, 8, *spatial, generator=gen).contiguous(memory_format=fmt)
        ref = conv(x, w, m.bias, padding=1)
        with torch.inference_mode():
            m(x, order=ORDER_DENSE)
            with torch.profiler.profile() as prof:
                y = m(x, order=ORDER_DENSE)
        copies = [e.name for e in prof.events() if e.name in ("aten::clone", "aten::copy_", "aten::contiguous")]
        assert copies == [], copies
        assert torch.equal(y, ref) and y.stride() == ref.stride()
        y_op = m(x, order=ORDER_DENSE)  # (autograd on: the op, whose output is contiguous, as its fake kernel's)
        assert torch.equal(y_op, ref) and y_op.is_contiguous()
