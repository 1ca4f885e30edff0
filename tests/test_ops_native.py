"""The native CPU kernel of the fused ops (``ipfx.ops.native``) against the pure-torch path.

Both paths run in every session: the native kernel is built once (cached in torch's extension directory;
about 15 s on 2 cores the first time) and the torch orders need nothing. Where no compiler is present the
native tests are skipped after checking that the fallback warns once and computes the same numbers.
"""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.multiprocessing.reductions import StorageWeakRef

from helpers import run_in_threads
from ipfx.form.bases import dct_basis
from ipfx.ops import SparseIPConv, SparseLinear, native
from ipfx.ops.epilogue import ACTIVATIONS
from ipfx.ops.library import _run_sparse_linear
from ipfx.ops.order import ORDER_BASIS_FIRST, ORDER_NATIVE
from test_ops_ip_conv import (
    ConvCase,
    _case,
    assert_close,
    conv_cases,
    dense_conv,
    dense_weight,
    error_scale,
    make_tensors,
    module_for,
    op_call,
)

needs_native = pytest.mark.skipif(not native.available(), reason="the native kernel could not be built here")


@needs_native
@settings(max_examples=80, deadline=None)
@given(case=conv_cases(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_native_agrees_with_the_torch_path(case: ConvCase, dtype):
    """1/2/3-d, transposed, groups, stride, dilation, padding, output padding, odd sizes, nnz = 0, empty rows."""
    t = make_tensors(case, dtype)
    scale = error_scale(case, t)
    torch_path = op_call(case, t, ORDER_BASIS_FIRST)
    native_path = op_call(case, t, ORDER_NATIVE)
    assert_close(native_path, torch_path, 1e-10 if dtype == torch.float64 else 1e-5, scale)
    assert_close(native_path, dense_conv(case, t.x, dense_weight(case, t), t.bias),
                 1e-10 if dtype == torch.float64 else 1e-5, scale)


@needs_native
@settings(max_examples=60, deadline=None)
@given(case=conv_cases(), dtype=st.sampled_from([torch.float64, torch.float32]), direct=st.booleans())
def test_both_native_sp_paths_agree_with_the_dense_conv(case: ConvCase, dtype, direct):
    """SP runs as a direct sparse convolution or through the gather by a size rule (ipfx.ops.native.direct_applies);
    each path is forced here on every SP geometry, strided and grouped ones included (the direct path lays the
    padded input out by stride phases)."""
    if case.basis_kind != "none" or case.transposed:
        return
    t = make_tensors(case, dtype)
    with mock.patch.object(native, "direct_applies", lambda *args: direct):
        y = op_call(case, t, ORDER_NATIVE)
    assert_close(y, dense_conv(case, t.x, dense_weight(case, t), t.bias),
                 1e-10 if dtype == torch.float64 else 1e-5, error_scale(case, t))


@needs_native
@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("kernel, dtype", [(1, torch.float32), (3, torch.float32), (3, torch.float64)])
@pytest.mark.parametrize("light", [False, True], ids=["rows-0-to-19", "rows-0-to-3"])
def test_every_row_length_sums_right_on_both_sp_paths(kernel, dtype, direct, light):
    """Output channel o keeps o coefficients (0 to 19): every remainder of a CSR row over the kernel's
    accumulator chains (1 to 8 of them), on a map read in place (no padding), whose last tile reads past the
    input's end and takes a zero-padded copy there. Light rows (o mod 4 coefficients) on a map of 27 tiles:
    the direct path's units of eight tiles of one channel, the last unit short. Against the dense conv in
    float64."""
    torch.manual_seed(0)
    c_in, c_out = 20, 20
    weight = torch.zeros(c_out, c_in, kernel, kernel, dtype=torch.float64)
    for o in range(c_out):
        flat = weight[o].view(-1)
        kept = o % 4 if light else o
        flat[torch.randperm(flat.numel())[:kept]] = torch.randn(kept, dtype=torch.float64)
    bias = torch.randn(c_out, dtype=torch.float64)
    x = torch.randn(2, c_in, *((45 + kernel - 1, 37 + kernel - 1) if light else (9, 13)), dtype=torch.float64)
    module = SparseIPConv.from_coefficients(weight.reshape(c_out, c_in, -1).to(dtype), None, bias.to(dtype),
                                            weight_shape=weight.shape)
    with mock.patch.object(native, "direct_applies", lambda *args: direct), torch.no_grad():
        y = module(x.to(dtype), order=ORDER_NATIVE)
    expected = F.conv2d(x, weight, bias)
    assert y.dtype == dtype and y.shape == expected.shape
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert torch.allclose(y.double(), expected, rtol=tol, atol=tol), (y.double() - expected).abs().max()
    assert torch.equal(y[:, 0], bias[0].to(dtype).expand_as(y[:, 0]))  # an empty row: the bias alone


@needs_native
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("kept", [1, 12], ids=["light-rows", "heavy-rows"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_rows_that_keep_nothing_write_act_of_bias_plus_residual_on_the_direct_path(kernel, kept, activation):
    """Output channels without kept coefficients are written without their tiles' accumulation
    (csrc/ip_conv.cpp: fill_tiles): act(bias + residual) at every position of a padded 3x3 map (runs with gaps
    between rows) and of a 1x1 one (runs continued across tiles), in units of one tile and of eight (light
    rows), every activation; the other channels' conv is unchanged. Against float64."""
    torch.manual_seed(0)
    c_in, c_out = 16, 12
    weight = torch.zeros(c_out, c_in, kernel, kernel, dtype=torch.float64)
    for o in range(1, c_out, 2):  # even channels keep nothing
        flat = weight[o].view(-1)
        flat[torch.randperm(flat.numel())[:kept]] = torch.randn(kept, dtype=torch.float64)
    bias = torch.randn(c_out, dtype=torch.float64)
    x = torch.randn(2, c_in, 29, 23, dtype=torch.float64)
    residual = torch.randn(2, c_out, 29, 23, dtype=torch.float64)
    pad = kernel // 2
    module = SparseIPConv.from_coefficients(weight.reshape(c_out, c_in, -1).float(), None, bias.float(),
                                            weight_shape=weight.shape, padding=pad)
    with mock.patch.object(native, "direct_applies", lambda *args: True):
        y = torch.ops.ipfx.ip_conv(x.float(), module.values, module.indices, None, module.bias, list(weight.shape),
                                   [1, 1], [pad, pad], [1, 1], 1, False, [0, 0], ORDER_NATIVE, residual.float(),
                                   activation)
    expected = ACTIVATIONS[activation][1](F.conv2d(x, weight, bias, padding=pad) + residual)
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5), (y.double() - expected).abs().max()
    if activation not in ("silu", "gelu"):  # (whose last bits differ from torch's: checked above)
        empty = ACTIVATIONS[activation][1]((bias.float()[0::2, None, None] + 0.0) + residual.float()[:, 0::2])
        assert torch.equal(y[:, 0::2], empty)  # the numbers channel() writes there: act((0 + b) + res)


@needs_native
@pytest.mark.parametrize("c_in, size, batch, density", [
    (64, (56, 56), 5, 0.1),  # 0.9 MiB a sample's copy: chunks of 2, 2, 1
    (128, (28, 28), 9, 0.2),  # 0.5 MiB: chunks of 4, 4, 1
])
def test_the_direct_paths_copy_by_chunks_of_samples_computes_each_sample_alone(c_in, size, batch, density):
    """The direct path lays the padded input out a chunk of samples at a time (csrc/ip_conv.cpp: kCopyChunkBytes,
    2 MiB), the last chunk short: every sample of the batch gets the conv of its own input, bit for bit what it
    gets alone (batch 1, one chunk), with its own residual in the epilogue; and the float64 conv's numbers."""
    torch.manual_seed(0)
    c_out = 24
    weight = torch.randn(c_out, c_in, 3, 3) * (torch.rand(c_out, c_in, 3, 3) < density)
    bias = torch.randn(c_out)
    module = SparseIPConv.from_coefficients(weight.reshape(c_out, c_in, -1), None, bias, weight_shape=weight.shape,
                                            padding=1)
    module.activation = "relu"
    x = torch.randn(batch, c_in, *size)
    residual = torch.randn(batch, c_out, *size)
    sample = c_in * ((size[0] + 2) * (size[1] + 2) + 64 + 16) * 4  # a sample's copy (DirectPlan: stride_c)
    chunk = max(1, 2**21 // sample)
    assert -(-batch // chunk) >= 3 and batch % chunk != 0  # the premise: three chunks or more, the last short
    with mock.patch.object(native, "direct_applies", lambda *args: True), torch.no_grad():
        y = module(x, order=ORDER_NATIVE, residual=residual)
        alone = [module(x[n:n + 1], order=ORDER_NATIVE, residual=residual[n:n + 1]) for n in range(batch)]
    for n in range(batch):
        assert torch.equal(y[n:n + 1], alone[n]), n
    expected = torch.relu(F.conv2d(x.double(), weight.double(), bias.double(), padding=1) + residual.double())
    tol = 2e-6 * float(expected.abs().max())
    assert torch.allclose(y.double(), expected, rtol=0, atol=tol), (y.double() - expected).abs().max()


@needs_native
@pytest.mark.parametrize("kernel, stride, padding, size", [
    (3, 1, 1, (12, 9)), (3, 2, 1, (13, 10)), (7, 2, 3, (23, 19)), (5, 3, 2, (17, 16)), (1, 2, 0, (9, 9)),
    (3, 1, 1, (56, 56)), (3, 2, 1, (57, 55))])  # (copies of 64 KiB and more: from the kernel's recycled blocks)
def test_the_direct_path_zeroes_the_padding_of_reused_memory(kernel, stride, padding, size):
    """The direct path lays the input out padded (and split by stride phases) in memory it does not clear
    first: it writes zeros where the padding, the phases' gaps and the slack are. Memory just freed full of
    NaN, of the copy's size, comes back to it here (from the C library, or from the kernel's recycled blocks: a
    native max pool's NaN output of that size, dropped); the result must still be the conv's."""
    torch.manual_seed(0)
    c_in, c_out, batch = 3, 5, 2
    weight = torch.randn(c_out, c_in, kernel, kernel) * (torch.rand(c_out, c_in, kernel, kernel) < 0.5)
    x = torch.randn(batch, c_in, *size)
    module = SparseIPConv.from_coefficients(weight.reshape(c_out, c_in, -1), None, torch.randn(c_out),
                                            weight_shape=weight.shape, stride=stride, padding=padding)
    phases = [-(-(n + 2 * padding) // stride) for n in size]
    numbers = batch * c_in * (stride * stride * phases[0] * phases[1] + 64 + 16)  # the copy (DirectPlan)
    expected = F.conv2d(x, weight, module.bias, stride, padding)
    with mock.patch.object(native, "direct_applies", lambda *args: True), torch.no_grad():
        for _ in range(3):
            poison = torch.full((numbers,), float("nan"))
            recycled = native.max_pool2d(poison.view(1, 1, 1, -1), (1, 1), (1, 1), (0, 0), (1, 1), (1, numbers))
            assert recycled.isnan().all()
            del poison, recycled
            y = module(x, order=ORDER_NATIVE)
            assert not y.isnan().any()
            assert torch.allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel, stride, out_spatial, nnz, expected", [
    ((7, 7), (2, 2), (112, 112), 500, True),  # a 7x7/2 stem: 12 taps read each input number
    ((3, 3), (2, 2), (28, 28), 5000, False),  # 3x3/2: 2.25 taps per phase
    ((1, 1), (2, 2), (28, 28), 5000, False),  # 1x1/2: three phases of four copied for nothing
    ((3, 3), (1, 1), (56, 56), 5000, True),  # stride 1, a large map
    ((3, 3), (1, 1), (7, 7), 5000, True),  # stride 1, a small map, 3x3 at 86% (since the offsets per shape)
    ((3, 3), (1, 1), (7, 7), 10000, False),  # 3x3 at 73%
    ((3, 3), (1, 1), (7, 7), 100, True),  # stride 1, a small map at 99.6%
    ((3, 3), (1, 1), (14, 14), 700, True),  # stride 1, a small map at 98%
    ((1, 1), (1, 1), (14, 14), 120, True),  # 1x1, 64 -> 64 at 97.1%
    ((1, 1), (1, 1), (14, 14), 130, False),  # 1x1, 64 -> 64 at 96.8%
    ((1, 1), (1, 1), (14, 14), 50, False),  # 1x1, 64 -> 128 at 99.4%: more output channels than input ones
])
def test_the_direct_path_rule(kernel, stride, out_spatial, nnz, expected):
    """Which SP convolutions the native kernel runs directly (ipfx.ops.native.direct_applies, its measurements)."""
    K = kernel[0] * kernel[1]
    g = {"transposed": False, "groups": 1, "stride": stride, "K": K, "c_out": 64, "c_in": 64 if K < 49 else 3,
         "kernel": kernel, "dilation": (1, 1)}
    if nnz == 50:
        g["c_out"] = 128
    with mock.patch.object(native, "vector_bytes", return_value=64):  # (expansions: the next test)
        assert native.direct_applies(g, nnz, None, out_spatial) is expected
        assert native.direct_applies(g, nnz, torch.eye(K), out_spatial) is False
        assert native.direct_applies({**g, "transposed": True}, nnz, None, out_spatial) is False


@pytest.mark.parametrize("c_in, c_out, out_spatial, nnz, expected", [
    (64, 256, (56, 56), 800, {64: True, 32: False}),  # a 1x1 expansion on a large map
    (16, 64, (112, 112), 50, {64: True, 32: False}),
    (256, 64, (56, 56), 800, {64: True, 32: True}),  # a reduction: direct at either width
    (64, 64, (56, 56), 200, {64: True, 32: True}),
    (64, 128, (14, 14), 50, {64: False, 32: False}),  # a small map: the gather at either width
    (672, 112, (14, 14), 3763, {64: False, 32: True}),  # a reduction read 5.6 times a copied row, 95%
    (960, 160, (7, 7), 7680, {64: False, 32: True}),  # 8 times
    (1024, 256, (14, 14), 13107, {64: False, 32: False}),  # 12.8 times: the gather at either width
])
def test_the_direct_path_rule_for_1x1_expansions_follows_the_vector_width(c_in, c_out, out_spatial, nnz, expected):
    """With 32-byte vectors (AVX2) a 1x1 conv with more outputs than inputs takes the gather at any map size
    (ipfx.ops.native.DIRECT_EXPANSION_MIN_VECTOR_BYTES), and a reduction whose copied rows would each be read
    by few kept coefficients the direct path (DIRECT_MAX_READS_PER_ROW); with 64-byte ones, the rule for every
    1x1 conv."""
    g = {"transposed": False, "groups": 1, "stride": (1, 1), "K": 1, "c_out": c_out, "c_in": c_in,
         "kernel": (1, 1), "dilation": (1, 1)}
    for width, direct in expected.items():
        with mock.patch.object(native, "vector_bytes", return_value=width):
            assert native.direct_applies(g, nnz, None, out_spatial) is direct


@pytest.mark.parametrize("c_in, groups, kernel, stride, out_spatial, expected", [
    (672, 672, (3, 3), (1, 1), (14, 14), True),  # depthwise 14x14: a 16x16 padded plane per group
    (960, 960, (5, 5), (1, 1), (7, 7), True),
    (672, 672, (5, 5), (2, 2), (7, 7), True),  # strided: a 19x19 plane split into its phases
    (72, 72, (3, 3), (1, 1), (56, 56), True),  # 58x58 = 3364 numbers
    (16, 16, (3, 3), (1, 1), (112, 112), False),  # 114x114 = 12996 numbers: past L1, the gather
    (64, 2, (3, 3), (1, 1), (28, 28), False),  # 32 channels of 30x30 per group
    (64, 16, (3, 3), (1, 1), (14, 14), True),  # 4 channels of 16x16 per group
])
def test_the_grouped_direct_path_rule(c_in, groups, kernel, stride, out_spatial, expected):
    """Grouped SP convolutions run directly a group at a time where the group's padded input planes fit
    DIRECT_GROUP_MAX_NUMBERS (ipfx.ops.native.direct_applies)."""
    K = kernel[0] * kernel[1]
    g = {"transposed": False, "groups": groups, "stride": stride, "K": K, "c_out": c_in, "c_in": c_in,
         "kernel": kernel, "dilation": (1, 1)}
    assert native.direct_applies(g, c_in * K // 20, None, out_spatial) is expected
    assert native.direct_applies(g, c_in * K // 20, torch.eye(K), out_spatial) is False


@needs_native
@pytest.mark.parametrize("case", [
    _case(c_in=40, c_out=24, spatial=(23, 31), batch=1),  # few tiles: threads over channels
    _case(c_in=8, c_out=8, spatial=(40, 40), batch=3, basis_kind="none"),  # many tiles: threads over tiles
    _case(c_in=300, c_out=5, spatial=(5, 4), kernel=(3, 3), sparsity=0.9),  # 16-position tiles (large c_in*K)
], ids=range(3))
def test_native_is_bitwise_equal_across_thread_counts(case):
    t = make_tensors(case, torch.float32)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(op_call(case, t, ORDER_NATIVE))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert_close(outs[0], dense_conv(case, t.x, dense_weight(case, t), t.bias), 1e-5, error_scale(case, t))


@needs_native
def test_native_handles_empty_rows_and_no_coefficients():
    case = _case(c_in=6, c_out=5, bias=True, basis_kind="random")
    t = make_tensors(case)
    t.coeff[1] = 0  # output channel 1: an empty CSR row (only the bias)
    t.coeff[:, 2] = 0  # input channel 2 read by nothing (its basis responses are skipped)
    y = op_call(case, t, ORDER_NATIVE)
    assert torch.equal(y[:, 1], t.bias[1].expand_as(y[:, 1]))
    assert_close(y, dense_conv(case, t.x, dense_weight(case, t), t.bias), 1e-10, error_scale(case, t))
    t.coeff.zero_()
    assert torch.equal(op_call(case, t, ORDER_NATIVE), t.bias.reshape(1, -1, 1, 1).expand(2, -1, 6, 5))


@needs_native
@settings(max_examples=40, deadline=None)
@given(out_f=st.integers(1, 40), in_f=st.integers(1, 40), rows=st.integers(0, 70),
       sparsity=st.one_of(st.just(1.0), st.floats(0.0, 1.0)), dtype=st.sampled_from([torch.float64, torch.float32]),
       bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_native_sparse_linear_agrees_with_the_torch_path(out_f, in_f, rows, sparsity, dtype, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen, dtype=dtype)
    w = w * (torch.rand(w.shape, generator=gen) >= sparsity)
    b = torch.randn(out_f, generator=gen, dtype=dtype) if bias else None
    x = torch.randn(rows, in_f, generator=gen, dtype=dtype)
    m = SparseLinear.from_weight(w, b)
    args = (x, m.values, m.indices, m.bias, list(m.weight_shape))
    y_native = _run_sparse_linear(*args, allow_native=True)
    y_torch = _run_sparse_linear(*args, allow_native=False)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    scale = float((x.abs() @ w.abs().T).max()) + (float(b.abs().max()) if bias else 0.0) if rows else 0.0
    assert_close(y_native, y_torch, tol, scale)
    assert_close(m(x), F.linear(x, w, b), tol, scale)


def test_without_a_compiler_the_torch_path_runs_with_one_warning(monkeypatch, tmp_path):
    """A failed build (here: a missing source file) warns once, says how to get the fast path, and the op
    computes the same numbers by the torch orders."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_SOURCE", "/nonexistent/ip_conv.cpp")
    monkeypatch.setattr(native, "library_name", lambda: "ipfx_native_missing")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # leave no build folder behind
    case = _case()
    t = make_tensors(case)
    with pytest.warns(RuntimeWarning, match="ninja") as record:
        y = op_call(case, t, ORDER_NATIVE)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            op_call(case, t, 0)
            with torch.no_grad():
                module_for(case, t)(t.x)
    assert sum("native CPU kernel" in str(w.message) for w in record) == 1
    assert "g++" in str(record[0].message)
    assert not native.available()
    assert_close(y, dense_conv(case, t.x, dense_weight(case, t), t.bias), 1e-10, error_scale(case, t))


def test_ipfx_native_0_turns_the_native_kernel_off(monkeypatch):
    monkeypatch.setenv("IPFX_NATIVE", "0")
    assert not native.available() and not native.supports(torch.zeros(1))
    case = _case(basis_kind="none")
    t = make_tensors(case)
    assert_close(op_call(case, t, ORDER_NATIVE), dense_conv(case, t.x, dense_weight(case, t), t.bias), 1e-10,
                 error_scale(case, t))


def test_half_precision_and_other_inputs_take_the_torch_path():
    assert not native.supports(torch.zeros(1, dtype=torch.bfloat16))
    case = _case()
    t = make_tensors(case, torch.bfloat16)
    m = module_for(case, t)
    with torch.no_grad():
        assert m(t.x, ORDER_NATIVE).dtype == torch.bfloat16


@needs_native
def test_export_still_sees_one_op_when_the_native_kernel_runs():
    case = _case()
    t = make_tensors(case, torch.float32)
    m = module_for(case, t).eval()
    with torch.no_grad():
        ep = torch.export.export(m, (t.x,))
        targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
        assert targets == ["ipfx.ip_conv.default"], targets
        assert torch.equal(ep.module()(t.x), m(t.x))
    assert isinstance(m, SparseIPConv)


def test_torch_compile_sees_one_op_and_runs_the_cpu_kernel():
    """Dynamo traces the module to the custom op (through its fake kernel) and the compiled call runs the CPU
    kernel: the same numbers as eager."""
    case = _case()
    t = make_tensors(case, torch.float32)
    m = module_for(case, t).eval()
    ops = []

    def backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    with torch.no_grad():
        compiled = torch.compile(m, backend=backend, fullgraph=True)
        assert torch.equal(compiled(t.x), m(t.x))
    assert len(ops) == 1 and ops[0].startswith("ipfx.ip_conv"), ops  # dynamo graphs name the overload packet


def test_build_native_command(capsys, monkeypatch):
    from ipfx.cli.main import main

    assert main(["build-native"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("native kernel ") and out.strip().endswith(".so")
    monkeypatch.setenv("IPFX_NATIVE", "0")
    assert main(["build-native"]) == 2
    assert capsys.readouterr().err.strip() == "ipfx build-native: error: IPFX_NATIVE=0 turns the native kernel off; " \
                                             "unset it to build"


@pytest.mark.slow
def test_processes_started_at_once_build_the_kernel_once(tmp_path):
    """A fresh extension directory, two processes: one compiles (and says so in one line), the other waits
    on the lock and loads its library; both then have the kernel."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    code = "import ipfx.ops.native as n; print(n.available())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [out.strip() for out, _ in results] == ["True", "True"], results
    said = [err for _, err in results if "compiling the native CPU kernel once" in err]
    assert len(said) == 1, results


def test_the_cache_key_tells_apart_environments_and_copies_of_the_source(monkeypatch, tmp_path):
    """Two environments sharing the extension folder must not rebuild each other's library: the build file
    names torch's and the source's paths, so the key holds them (and what the code is)."""
    key = native._build_key()
    copy = tmp_path / "ip_conv.cpp"
    copy.write_bytes(open(native._SOURCE, "rb").read())
    monkeypatch.setattr(native, "_SOURCE", str(copy))  # the same source in another clone
    assert native._build_key() != key
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "torch" / "__init__.py"))  # torch installed elsewhere
    moved = native._build_key()
    assert moved not in (key,) and len(moved) == 8
    copy.write_bytes(b"// changed\n" + copy.read_bytes())
    assert native._build_key() != moved  # another source: another build


@needs_native
@pytest.mark.parametrize("d", [1, 2])
def test_a_padded_pointwise_conv_on_single_position_maps_reads_the_padding(d):
    """A 1x1 conv with padding 1 and stride 3 on a one-position map: its one output reads a padding zero, so
    it is the bias alone, not the matrix-vector product (found by hypothesis in a clean run; the native kernel
    took it for one)."""
    torch.manual_seed(0)
    weight = torch.randn(5, 4, *([1] * d), dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64)
    x = torch.randn(2, 4, *([1] * d), dtype=torch.float64)
    module = SparseIPConv.from_coefficients(weight.reshape(5, 4, 1), None, bias, weight_shape=weight.shape,
                                            stride=3, padding=1)
    conv = F.conv1d if d == 1 else F.conv2d
    expected = conv(x, weight, bias, 3, 1)
    with torch.no_grad():
        y = module(x, order=ORDER_NATIVE)
    assert y.shape == expected.shape == (2, 5, *([1] * d))
    assert torch.equal(y, expected) and torch.equal(y, bias.reshape(1, 5, *([1] * d)).expand_as(y))


@needs_native
@pytest.mark.parametrize("batch", [1, 3, 4, 6, 32])
@pytest.mark.parametrize("activation", ["none", "relu", "hardswish"])
def test_a_pointwise_conv_on_single_position_maps_is_a_sparse_matrix_vector_product(batch, activation):
    """A squeeze-excitation's 1x1 convs on 1x1 maps run as a sparse matrix times the batch's vectors (four
    samples per pass over the matrix), with the epilogue; the same numbers as the dense conv, by the module,
    the op and every thread count, and the cost model picks it for so small a matrix at every batch
    (ipfx.ops.order.MATVEC_COSTS)."""
    from ipfx.ops import epilogue
    from ipfx.ops.order import ORDER_AUTO
    from ipfx.ops.storage import _storage_entry

    gen = torch.Generator().manual_seed(batch)
    w = torch.randn(24, 40, 1, 1, generator=gen) * (torch.rand(24, 40, 1, 1, generator=gen) < 0.3)
    w[3] = 0  # an output channel without kept coefficients: bias (and residual) alone
    bias = torch.randn(24, generator=gen)
    m = SparseIPConv.from_coefficients(w.reshape(24, 40, 1), weight_shape=w.shape, bias=bias, stride=2)
    m.activation = activation
    x = torch.randn(batch, 40, 1, 1, generator=gen)
    residual = torch.randn(batch, 24, 1, 1, generator=gen)
    expected = epilogue.apply(F.conv2d(x, w, bias, 2), residual, activation)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.inference_mode():
                outs.append(m(x, ORDER_NATIVE, residual=residual))
        with torch.inference_mode():
            auto = m(x, ORDER_AUTO, residual=residual)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    assert_close(outs[0], expected, 1e-5, float((x.abs().flatten(1) @ w.abs().flatten(1).T).max()) + 5.0)
    assert torch.equal(outs[0][:, 3], epilogue.apply(bias[3] + residual[:, 3], None, activation))
    assert_close(auto, expected, 1e-5, float((x.abs().flatten(1) @ w.abs().flatten(1).T).max()) + 5.0)
    assert _storage_entry(m.indices)["auto"][1] == ORDER_NATIVE  # the cost model's pick, remembered per storage


@pytest.mark.parametrize("batch", [1, 4, 32])
def test_the_matrix_vector_costs_pick_native_for_sparse_matrices_and_dense_for_dense_ones(batch):
    """A squeeze-excitation's pointwise conv on single-position maps is costed as the sparse matrix times the
    batch's vectors against the dense conv (ipfx.ops.order.MATVEC_COSTS), not by 64-position tiles: at 5%
    kept the native kernel is picked, at 50% kept the dense conv, 960 -> 240 at batch 1, 4 and 32 (measured
    there: native 0.52/0.29/0.70x and 1.22/1.98/7.64x the dense conv's time)."""
    from ipfx.ops.order import ORDER_DENSE, choose_order

    def pick(kept: float) -> int:
        return choose_order(native=True, c_in=960, c_out=240, K=1, nnz=int(960 * 240 * kept), p_in=1, p_out=1,
                            batch=batch, identity=True, cheap_identity=True)

    assert pick(0.05) == ORDER_NATIVE and pick(0.5) == ORDER_DENSE


def test_a_sparse_linear_module_plans_once_per_input_shape_and_follows_its_storage():
    """SparseLinear in eager inference runs sparse_linear's implementation planned per input shape and storage:
    the same numbers as the op (which keeps the same plans), a new plan for another shape or an in-place change
    of its values, none carried into a copy."""
    import copy

    from ipfx.ops.storage import _storage_entry

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(30, 20, generator=gen) * (torch.rand(30, 20, generator=gen) < 0.2)
    b = torch.randn(30, generator=gen)
    m = SparseLinear.from_weight(w, b)
    x = torch.randn(1, 20, generator=gen)
    scale = float((x.abs() @ w.abs().T).max()) + float(b.abs().max())
    with torch.no_grad():
        assert_close(m(x), F.linear(x, w, b), 1e-5, scale)
        assert_close(m(x), torch.ops.ipfx.sparse_linear(x, m.values, m.indices, m.bias, [30, 20]), 1e-6, scale)
        x3 = torch.randn(3, 4, 20, generator=gen)
        assert_close(m(x3), F.linear(x3, w, b), 1e-5, 10 * scale)
        m.values.mul_(2.0)
        assert_close(m(x), F.linear(x, 2 * w, b), 1e-5, 2 * scale)
    assert len(_storage_entry(m.indices)["plans"]) == 1  # (1, 20) on the new values: the old ones are dropped
    assert "plans" not in _storage_entry(copy.deepcopy(m).indices)


def _recycled_conv(size=(40, 40)):
    """A 3x3 SP conv whose output (8 x 40 x 40 floats, 50 KiB a sample: 100 KiB at batch 2) and padded input
    copy come from the native kernel's recycled blocks, and an input for it."""
    torch.manual_seed(0)
    weight = torch.randn(8, 4, 3, 3) * (torch.rand(8, 4, 3, 3) < 0.3)
    module = SparseIPConv.from_coefficients(weight.reshape(8, 4, -1), None, torch.randn(8), weight_shape=weight.shape,
                                            padding=1)
    return module, weight, torch.randn(2, 4, *size)


@needs_native
def test_recycled_outputs_are_never_handed_out_while_anything_refers_to_them():
    """The kernel hands a block out again only when nothing but its list refers to it: an output held, a view of
    it, a numpy array over it or its storage object keeps it (the next call of that size gets another block and
    the held numbers stay); dropped, the next call of that size gets it."""
    module, weight, x = _recycled_conv()
    expected = F.conv2d(x, weight, module.bias, padding=1).reshape(-1)
    holds = {  # what keeps the output, and the output's last numbers read back through it
        "tensor": (lambda y: y, lambda h: h.reshape(-1)[-64:]),
        "view": (lambda y: y.view(-1)[5:], lambda h: h[-64:]),
        "numpy": (lambda y: y.numpy(), lambda h: torch.from_numpy(h.reshape(-1)[-64:].copy())),
        "storage": (lambda y: y.untyped_storage(), lambda h: torch.tensor([], dtype=torch.float32).set_(h)[-64:]),
        "weak reference": (lambda y: (StorageWeakRef(y.untyped_storage()), y.reshape(-1)[-64:].clone()),
                           lambda h: h[1]),  # (a weak reference alone does not keep the numbers: a copy does)
        "shared memory": (lambda y: y.share_memory_(), lambda h: h.reshape(-1)[-64:]),
    }
    stays_out = ("storage", "weak reference", "shared memory")  # (each made a storage object: see below)
    with torch.no_grad():
        for name, (hold, read) in holds.items():
            first = module(x, order=ORDER_NATIVE)
            held = hold(first)
            address = first.data_ptr()  # the memory held (share_memory_ moves it into a shared segment)
            del first
            other = module(x * 2, order=ORDER_NATIVE)
            assert other.data_ptr() != address, name  # held: not handed out again
            assert torch.allclose(read(held), expected[-64:], rtol=1e-5, atol=1e-5), name  # its numbers stay
            del held
            again = module(x * 3, order=ORDER_NATIVE)
            # dropped: recycled; except after a storage object existed (torch keeps it with the storage, one
            # reference more, so the block stays out of use until the list drops it)
            assert (again.data_ptr() == address) is (name not in stays_out), name
            assert torch.allclose(again.reshape(-1), F.conv2d(x * 3, weight, module.bias, padding=1).reshape(-1),
                                  rtol=1e-5, atol=1e-4), name
            del other, again


@needs_native
def test_recycled_memory_is_bounded_and_released():
    """recycled_bytes counts the kept blocks; release_memory gives them back; a limit of 0 keeps none; a
    resized output changes its own block only."""
    module, weight, x = _recycled_conv()
    lib = native._state["module"]
    limit = lib.recycled_limit()
    try:
        with torch.no_grad():
            y = module(x, order=ORDER_NATIVE)
            assert native.recycled_bytes() >= y.numel() * 4
            native.release_memory()
            assert native.recycled_bytes() == 0
            assert torch.allclose(y, F.conv2d(x, weight, module.bias, padding=1), rtol=1e-5, atol=1e-5)  # still y's
            y.resize_(3 * y.numel())  # the caller's storage grows: never handed out for the old size again
            lib.set_recycled_limit(0)
            module(x, order=ORDER_NATIVE)
            assert native.recycled_bytes() == 0
            lib.set_recycled_limit(limit)
            outputs = [module(x + i, order=ORDER_NATIVE) for i in range(3)]  # three held: three blocks
            assert len({o.data_ptr() for o in outputs}) == 3
            kept = native.recycled_bytes()
            assert kept >= 3 * outputs[0].numel() * 4
            lib.set_recycled_limit(kept - 1)  # the least recently handed out go first
            assert 0 < native.recycled_bytes() < kept
            for i, o in enumerate(outputs):
                assert torch.allclose(o, F.conv2d(x + i, weight, module.bias, padding=1), rtol=1e-5, atol=1e-4)
    finally:
        lib.set_recycled_limit(limit)


def test_a_bad_recycle_limit_is_refused_with_what_to_set(monkeypatch):
    from ipfx.errors import IPFXValueError

    for bad in ("-1", "lots", "nan", "inf"):
        monkeypatch.setenv("IPFX_NATIVE_RECYCLE_MB", bad)
        with pytest.raises(IPFXValueError, match="IPFX_NATIVE_RECYCLE_MB must be a number of MiB >= 0"):
            native._recycle_limit()
    monkeypatch.setenv("IPFX_NATIVE_RECYCLE_MB", "0.5")
    assert native._recycle_limit() == 2**19
    monkeypatch.delenv("IPFX_NATIVE_RECYCLE_MB")
    assert native._recycle_limit() == 2**30


@needs_native
@pytest.mark.parametrize("groups, padding, stride", [(1, 1, 1), (1, 0, 1), (1, 1, 2), (4, 1, 1), (8, 2, 2)])
def test_read_offsets_worked_out_once_give_the_same_numbers(groups, padding, stride):
    """The direct path's per-coefficient read offsets, worked out once per input shape (bind_conv given the
    input's size: the `sources` argument) or on every call (without), give the same numbers to the bit, for
    the ungrouped path (x read in place, or its padded copy) and the grouped one; a conv bound for one size
    refuses another (its offsets would read elsewhere)."""
    from ipfx.ops.kernels import _native_operands

    torch.manual_seed(0)
    c, k = 8, 3
    weight = torch.randn(c, c // groups, k, k) * (torch.rand(c, c // groups, k, k) < 0.4)
    module = SparseIPConv.from_coefficients(weight.reshape(c, c // groups, -1), None, torch.randn(c),
                                            weight_shape=weight.shape, padding=padding, stride=stride, groups=groups)
    x = torch.randn(2, c, 11, 9)
    expected = F.conv2d(x, weight, module.bias, stride, padding, groups=groups)
    from ipfx.ops.library import _conv_geometry

    g = _conv_geometry(x, module.values, module.indices, None, module.bias, module.weight_shape, module.stride,
                       module.padding, module.dilation, groups, False, module.output_padding)
    out_spatial = expected.shape[2:]
    operands = _native_operands(g, module.values, module.indices, lambda: module.indices, x)
    with mock.patch.object(native, "direct_applies", lambda *args: True):
        once = native.bind_conv(*operands[:3], None, module.bias, operands[3], g, out_spatial, 4, x.shape[2:])
        every_call = native.bind_conv(*operands[:3], None, module.bias, operands[3], g, out_spatial, 4)
    y_once, y_every = once(x, None, 0), every_call(x, None, 0)
    assert torch.equal(y_once, y_every)
    assert torch.allclose(y_once, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"bound for inputs of size \(11, 9\)"):
        once(torch.randn(2, c, 12, 9), None, 0)
    with pytest.raises(ValueError, match=r"element size 4, got \(11, 9\) and 8"):
        once(x.double(), None, 0)
    with pytest.raises(ValueError, match=r"got \(9,\) and 4"):  # (another rank: refused, not read past)
        once(x[0], None, 0)
    other = torch.randn(1, c, 12, 9)  # bound without a size: any size
    other_expected = F.conv2d(other, weight, module.bias, stride, padding, groups=groups)
    with mock.patch.object(native, "direct_applies", lambda *args: True):
        any_size = native.bind_conv(*operands[:3], None, module.bias, operands[3], g, other_expected.shape[2:], 4)
    assert torch.allclose(any_size(other, None, 0), other_expected, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("basis", [False, True], ids=["sp", "ip"])
def test_a_bound_conv_keeps_its_tile_runs_for_the_input_size_it_is_called_with(basis):
    """The tiled path's runs, kept by a bound conv (TileRunsCache) for the last input size: inputs of other sizes
    with the same output size (stride 2: 15 or 16 wide), alternating, and calls from four threads at once give
    the unbound kernel's numbers to the bit each time."""
    from ipfx.ops.kernels import _native_operands
    from ipfx.ops.library import _conv_geometry

    torch.manual_seed(0)
    c, k = 8, 3
    weight = torch.randn(c, c, k, k) * (torch.rand(c, c, k, k) < 0.4)
    module = SparseIPConv.from_coefficients(weight.reshape(c, c, -1), dct_basis((k, k), torch.float32) if basis else None,
                                            torch.randn(c), weight_shape=weight.shape, padding=1, stride=2)
    sizes = [(16, 16), (15, 16), (16, 15), (15, 15)]
    inputs = [torch.randn(2, c, *size) for size in sizes * 2]
    g = _conv_geometry(inputs[0], module.values, module.indices, module.basis, module.bias, module.weight_shape,
                       module.stride, module.padding, module.dilation, 1, False, module.output_padding)
    crow, col, vals, used = _native_operands(g, module.values, module.indices, lambda: module.indices, inputs[0])
    b = None if module.basis is None else module.basis.contiguous()
    with mock.patch.object(native, "direct_applies", lambda *args: False):
        bound = native.bind_conv(crow, col, vals, b, module.bias, used, g, (8, 8), 4)
    dense = module.to_dense_weight()
    expected = []
    for x in inputs:
        want = native.conv(x, crow, col, vals, b, module.bias, used, g, (8, 8))
        assert torch.allclose(want, F.conv2d(x, dense, module.bias, 2, 1), rtol=1e-4, atol=1e-4)
        expected.append(want)
    for x, want in zip(inputs, expected):
        assert torch.equal(bound(x, None, 0), want), x.shape
    failures = []

    def hammer(seed):
        for _ in range(20):
            for x, want in zip(inputs[seed:] + inputs[:seed], expected[seed:] + expected[:seed]):
                if not torch.equal(bound(x, None, 0), want):
                    failures.append(x.shape)

    run_in_threads(hammer)
    assert failures == []


@needs_native
@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("size", [(16, 16), (10, 13)], ids=["whole-tiles", "a-short-tile"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_epilogue_from_registers_computes_torchs_activations_to_the_bit(direct, size, dtype):
    """A tile that is one whole run of the output (1x1 unpadded convs) takes its epilogue straight from the
    accumulators (store_tile), other tiles through a buffer: both act((conv + bias) + residual) as torch's
    activations do, NaN, infinities and -0 included (relu kept NaN as NaN and -0 as -0 once it is torch's
    `v < 0 ? 0 : v`; it gave 0 for both). Integer weights and inputs make every sum exact, so the
    result must equal torch's to the bit; the residual carries the special values."""
    from ipfx.ops import epilogue

    torch.manual_seed(0)
    c_in, c_out = 6, 5
    weight = torch.randint(-2, 3, (c_out, c_in, 1, 1)).to(dtype) * (torch.rand(c_out, c_in, 1, 1) < 0.6)
    bias = torch.randint(-3, 4, (c_out,)).to(dtype)
    x = torch.randint(-3, 4, (2, c_in, *size)).to(dtype)
    module = SparseIPConv.from_coefficients(weight.reshape(c_out, c_in, 1), None, bias, weight_shape=weight.shape)
    residual = torch.randint(-8, 9, (2, c_out, *size)).to(dtype)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -2.5, 1e30, -1e30], dtype=dtype)
    flat = residual.view(-1)
    flat[torch.randperm(flat.numel())[:200]] = special[torch.randint(0, len(special), (200,))]
    z = F.conv2d(x, weight, bias)
    for activation in ("none", "relu", "relu6", "hardswish"):
        module.activation = activation
        for r in (None, residual):
            expected = epilogue.apply(z, r, activation)
            with mock.patch.object(native, "direct_applies", lambda *args: direct), torch.no_grad():
                got = module(x, ORDER_NATIVE, r)
            torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=activation)
            if activation != "hardswish":  # (torch's hardswish gives +0 for x <= -3, the formula x * 0 / 6 -0)
                assert torch.equal(got.signbit(), expected.signbit()), activation  # (-0 stays -0)


@needs_native
@pytest.mark.parametrize("kernel, stride, size", [(3, 1, (14, 14)), (3, 1, (7, 13)), (5, 2, (14, 14)),
                                                  (5, 1, (7, 7)), (3, 2, (11, 9))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_grouped_direct_path_writes_each_channel_with_torchs_epilogue(kernel, stride, size, dtype):
    """A depthwise conv on the grouped direct path: a channel without kept coefficients is filled in one pass
    (act(+0 + bias + residual): a -0 bias gives +0, as the empty sum does), the others write their tiles' row
    segments a whole vector at a time where the overhang stays in the channel (rows of 7 to 14 numbers: every
    segment short). Integer weights and inputs make every sum exact: the result equals torch's conv and
    activations, NaN and infinities of the residual included, and the gather path's to the bit, signs of zero
    too (torch's dense sums add the skipped zero weights' -0 products: its zeros' signs are its own)."""
    from ipfx.ops import epilogue

    torch.manual_seed(0)
    c = 24
    weight = torch.randint(-2, 3, (c, 1, kernel, kernel)).to(dtype) * (torch.rand(c, 1, kernel, kernel) < 0.15)
    weight[::3] = 0  # (every third channel keeps nothing)
    weight[-1, 0, kernel // 2, kernel // 2] = 1  # (the last channel keeps something: its segments end the output)
    bias = torch.randint(-3, 4, (c,)).to(dtype)
    bias[0], bias[3] = -0.0, 0.0
    pad = kernel // 2
    x = torch.randint(-3, 4, (2, c, *size)).to(dtype)
    module = SparseIPConv.from_coefficients(weight.reshape(c, 1, -1), None, bias, weight_shape=weight.shape,
                                            stride=stride, padding=pad, groups=c)
    z = F.conv2d(x, weight, bias, stride, pad, groups=c)
    residual = torch.randint(-8, 9, z.shape).to(dtype)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -2.5, 1e30, -1e30], dtype=dtype)
    flat = residual.view(-1)
    flat[torch.randperm(flat.numel())[:200]] = special[torch.randint(0, len(special), (200,))]
    for activation in ("none", "relu", "relu6", "hardswish"):
        module.activation = activation
        for r in (None, residual):
            expected = epilogue.apply(z, r, activation)
            got = {}
            for direct in (True, False):
                with mock.patch.object(native, "direct_applies", lambda *args: direct), torch.no_grad():
                    got[direct] = module(x, ORDER_NATIVE, r)
                torch.testing.assert_close(got[direct], expected, rtol=0, atol=0, equal_nan=True,
                                           msg=f"{activation} direct={direct}")
            assert torch.equal(got[True].isnan(), got[False].isnan())
            same = ~got[True].isnan()
            assert torch.equal(got[True][same], got[False][same]) and torch.equal(got[True].signbit()[same],
                                                                                  got[False].signbit()[same])
    module.activation = "none"
    with torch.no_grad(), mock.patch.object(native, "direct_applies", lambda *args: True):
        y = module(x, ORDER_NATIVE)
    assert not y[:, 0].signbit().any()  # (+0 + -0: +0)


def test_the_kernel_computes_in_vectors_of_the_machines_width():
    """The kernel's vectors are the CPU's own (64 bytes with AVX-512, 32 with AVX2): vectors twice the machine's
    width were split by the compiler through the stack, which made every layer 2-7x slower on AVX2 machines."""
    if not native.available():
        pytest.skip("native kernel unavailable")
    flags = native.cpu_flags().split()
    if "avx2" not in flags:
        pytest.skip("not an x86 CPU with AVX2")
    assert native.vector_bytes() == (64 if "avx512f" in flags else 32)


FOLDED = [
    _case(c_in=6, c_out=6, groups=6, sparsity=0.8),  # depthwise 3x3
    _case(c_in=6, c_out=6, groups=6, stride=(2, 2), spatial=(9, 8), sparsity=0.7),  # strided
    _case(c_in=4, c_out=8, groups=4, dilation=(2, 1), padding=(2, 1), sparsity=0.6),  # multiplier 2, dilated
    _case(c_in=6, c_out=4, groups=2, kernel=(2, 3), padding=(0, 1), basis_kind="random"),  # 3 in a group
    _case(d=1, c_in=5, c_out=5, groups=5, kernel=(5,), stride=(1,), padding=(2,), dilation=(1,),
          output_padding=(0,), spatial=(11,), sparsity=0.9),
    _case(d=3, c_in=4, c_out=4, groups=4, kernel=(3, 1, 3), stride=(1, 1, 1), padding=(1, 0, 1),
          dilation=(1, 1, 1), output_padding=(0, 0, 0), spatial=(4, 3, 5), sparsity=0.95, seed=3),
    _case(c_in=4, c_out=4, groups=4, sparsity=1.0),  # nothing kept: act(bias) everywhere
    _case(c_in=3, c_out=3, groups=3, spatial=(100, 96), batch=1, sparsity=0.9),  # planes past the size rule
]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", FOLDED, ids=range(len(FOLDED)))
def test_grouped_convs_with_a_basis_run_their_folded_kernel_natively(case, dtype):
    """A grouped conv with a basis (IP depthwise above all) runs natively as its folded kernel W = C @ B on the
    direct grouped path (ipfx.ops.kernels.folds_in_native), not as order (a) with the basis: the op and the
    module's eager plan agree with the dense conv and the torch path, the kernel was given the folded matrix
    (no basis) and the direct path, and order (a)'s matrix was never built; an in-place edit of the basis or
    the coefficients is followed."""
    from ipfx.ops.kernels import folds_in_native
    from ipfx.ops.storage import _MATRICES

    t = make_tensors(case, dtype)
    scale = error_scale(case, t)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    ref = dense_conv(case, t.x, dense_weight(case, t), t.bias)
    m = module_for(case, t).eval()
    out_spatial = ref.shape[2:]
    g = dict(groups=case.groups, c_in=case.c_in, c_out=case.c_out, transposed=False, kernel=case.kernel,
             stride=case.stride, dilation=case.dilation)
    assert folds_in_native(g, m.basis) and not folds_in_native(g, None)
    calls = []
    real = native.bind_conv

    def spy(crow, col, vals, basis, *args, **kwargs):
        calls.append((basis, vals.numel(), kwargs.get("direct", args[6] if len(args) > 6 else None)))
        return real(crow, col, vals, basis, *args, **kwargs)

    with mock.patch.object(native, "bind_conv", spy):
        assert_close(m(t.x, order=ORDER_NATIVE), ref, tol, scale)  # the op (autograd on: no plan)
        with torch.inference_mode():
            assert_close(m(t.x, order=ORDER_NATIVE), ref, tol, scale)  # the module's plan
    assert calls and all(basis is None and direct is True for basis, _, direct in calls)
    pairs = int((t.coeff != 0).any(-1).sum())
    assert all(nnz <= pairs * case.K for _, nnz, _ in calls)
    kinds = set(_MATRICES[id(m.indices)][1])
    assert "native_folded" in kinds and "native" not in kinds
    for edit in (lambda: m.basis.mul_(-2.0), lambda: m.values.add_(1.0)):  # each alone is followed
        with torch.no_grad():
            edit()
        values = torch.zeros(t.coeff.numel(), dtype=dtype).index_add_(0, m.indices.long(), m.values)
        edited = values.reshape(t.coeff.shape) @ m.basis
        ref2 = dense_conv(case, t.x, edited.reshape(case.weight_shape), t.bias)
        with torch.inference_mode():
            assert_close(m(t.x, order=ORDER_NATIVE), ref2, tol, 4 * scale + float(ref2.abs().max()))
        assert_close(m(t.x, order=ORDER_NATIVE), ref2, tol, 4 * scale + float(ref2.abs().max()))


def test_which_grouped_convs_with_a_basis_are_folded():
    """Folded: grouped, not transposed, with a basis, at most FOLD_MAX_GROUP_CHANNELS input channels a group
    (whatever the map size: the folded kernel runs on the direct path); a group of 64 channels keeps order (a)."""
    from ipfx.ops.kernels import folds_in_native

    g = dict(groups=16, c_in=16, c_out=16, transposed=False)
    basis = dct_basis((3, 3), torch.float32)
    assert folds_in_native(g, basis)
    assert folds_in_native(dict(g, c_in=16 * native.FOLD_MAX_GROUP_CHANNELS), basis)
    assert not folds_in_native(dict(g, c_in=16 * (native.FOLD_MAX_GROUP_CHANNELS + 1)), basis)
    assert not folds_in_native(dict(g, groups=1), basis)
    assert not folds_in_native(dict(g, transposed=True), basis)
    assert not folds_in_native(g, None)


@needs_native
def test_the_cost_model_runs_a_sparse_ip_depthwise_conv_folded():
    """order=0 on mobilenet's 240-channel depthwise 3x3 @14 with a basis at 95% picks the native kernel (the
    folded kernel: measured 0.22-0.24x the dense conv, 2 threads), costed as folded and direct; a 112x112
    depthwise plane is folded and direct too; groups of 64 channels are neither; the numbers are the dense
    conv's."""
    from ipfx.ops.geometry import _conv_geometry, _output_spatial
    from ipfx.ops.order import _modelled_order, _problem

    gen = torch.Generator().manual_seed(0)
    for channels, groups, size, folded in ((240, 240, 14, True), (16, 16, 112, True), (256, 4, 14, False)):
        x = torch.randn(1, channels, size, size, generator=gen)
        coeff = torch.randn(channels, channels // groups, 9, generator=gen)
        coeff = coeff * (torch.rand(coeff.shape, generator=gen) >= 0.95)
        m = SparseIPConv.from_coefficients(coeff, dct_basis((3, 3), torch.float32),
                                           weight_shape=(channels, channels // groups, 3, 3), padding=1,
                                           groups=groups).eval()
        g = _conv_geometry(x, m.values, m.indices, m.basis, m.bias, m.weight_shape, m.stride, m.padding,
                           m.dilation, m.groups, m.transposed, m.output_padding)
        out = _output_spatial(g, x.shape[2:])
        problem = _problem(g, x, m.values, m.basis, out)
        assert problem["folded"] is folded and problem["direct"] is folded
        if channels == 240:
            assert _modelled_order(g, x, m.values, m.basis, out, True) == ORDER_NATIVE
        with torch.inference_mode():
            ref = F.conv2d(x, m.to_dense_weight(), padding=1, groups=groups)
            torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(m(x, order=ORDER_NATIVE), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", [0, 4])
def test_a_call_under_autocast_leaves_the_module_computing_in_its_own_dtype(order):
    """What is kept per storage (the basis fold C @ B, plans) is made with autocast off: before, an IP module's
    first call under CPU bfloat16 autocast kept a bfloat16 fold, and that call and every later one failed
    ("values must have x's dtype"), with autocast or without."""
    torch.manual_seed(0)
    C, K = 32, 9
    coeff = torch.randn(C, 1, K) * (torch.rand(C, 1, K) < 0.5)
    basis = torch.linalg.qr(torch.randn(K, K))[0]
    x = torch.randn(2, C, 16, 16)
    expected = F.conv2d(x, (coeff @ basis).reshape(C, 1, 3, 3), None, 1, 1, 1, C)
    conv = SparseIPConv.from_coefficients(coeff, basis, None, weight_shape=(C, 1, 3, 3), padding=1, groups=C)
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = conv(x, order)
        after = conv(x, order)
    assert torch.allclose(under.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    assert after.dtype == torch.float32 and torch.allclose(after, expected, atol=1e-5)
