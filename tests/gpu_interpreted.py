"""The Triton kernel of ``ipfx::ip_conv`` (``ipfx.ops.gpu``) run by Triton's interpreter on CPU tensors.

Not collected by itself (no ``test_`` prefix): ``tests/test_ops_gpu.py`` runs this file in a fresh process
with ``TRITON_INTERPRET=1``, which Triton reads when it is imported.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ipfx.ops.geometry import _conv_geometry, _output_spatial
from ipfx.ops.kernels import _order_gpu
from ipfx.ops.storage import sparse_coefficients
from test_ops_ip_conv import ConvCase, _case, assert_close, conv_cases, dense_conv, dense_weight, error_scale, make_tensors

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="run by tests/test_ops_gpu.py")


def triton_call(case: ConvCase, t, dtype=torch.float32) -> torch.Tensor:
    values, indices = sparse_coefficients(t.coeff)
    x = t.x.to(dtype).contiguous()
    basis = None if t.basis is None else t.basis.to(dtype)
    g = _conv_geometry(x, values, indices, basis, t.bias, list(case.weight_shape), list(case.stride),
                       list(case.padding), list(case.dilation), case.groups, case.transposed,
                       list(case.output_padding))
    out = _output_spatial(g, x.shape[2:])
    flat = lambda: indices.to(torch.int64)  # noqa: E731
    return _order_gpu(g, x, values, indices, flat, basis, out, t.bias)


@settings(max_examples=int(os.environ.get("IPFX_TRITON_EXAMPLES", "20")), deadline=None)
@given(case=conv_cases())
def test_triton_kernel_agrees_with_the_dense_conv(case: ConvCase):
    """1/2/3-d, transposed, groups, stride, dilation, padding, output padding, odd sizes, nnz = 0, empty rows."""
    t = make_tensors(case, torch.float32)
    ref = dense_conv(case, t.x, dense_weight(case, t), t.bias)
    assert_close(triton_call(case, t), ref, 1e-5, error_scale(case, t))


@pytest.mark.parametrize("case", [
    _case(basis_kind="none", sparsity=0.8),  # SP: the kept coefficients are the folded kernel
    _case(basis_kind="random", sparsity=0.95, c_in=8, c_out=8, spatial=(9, 11), bias=True),
    _case(d=3, kernel=(3, 3, 3), spatial=(4, 5, 4), padding=(1, 1, 1), transposed=True, stride=(2, 2, 2),
          output_padding=(1, 1, 1), dilation=(1, 1, 1), groups=2, c_in=4, c_out=6),
    _case(d=1, kernel=(5,), spatial=(200,), padding=(2,), stride=(1,), dilation=(1,), output_padding=(0,),
          batch=1, c_in=2, c_out=3),  # more output positions than one program's block
], ids=["sp", "ip-bias", "3d-transposed-groups", "1d-long"])
def test_triton_kernel_on_chosen_geometries(case):
    t = make_tensors(case, torch.float32)
    ref = dense_conv(case, t.x, dense_weight(case, t), t.bias)
    assert ref.abs().max() > 0
    assert_close(triton_call(case, t), ref, 1e-5, error_scale(case, t))


def test_empty_rows_and_no_coefficients():
    case = _case(c_in=6, c_out=5, bias=True, basis_kind="random")
    t = make_tensors(case, torch.float32)
    t.coeff[1] = 0  # output channel 1: an empty row (only the bias)
    ref = dense_conv(case, t.x, dense_weight(case, t), t.bias)
    assert_close(triton_call(case, t), ref, 1e-5, error_scale(case, t))
    t.coeff.zero_()  # nnz = 0: the bias alone
    got = triton_call(case, t)
    assert torch.equal(got, t.bias.float().reshape(1, -1, 1, 1).expand_as(got))


@pytest.mark.parametrize("dtype", [torch.float16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    case = _case(c_in=8, c_out=4, sparsity=0.7, basis_kind="orthogonal")
    t = make_tensors(case, torch.float32)
    got = triton_call(case, t, dtype)
    assert got.dtype == dtype
    ref = dense_conv(case, t.x.to(dtype).float(), dense_weight(case, t), t.bias)
    assert_close(got.float(), ref, 2e-3, error_scale(case, t))


@given(seed=st.integers(0, 2**16))
@settings(max_examples=3, deadline=None)
def test_sp_folded_kernel_is_the_kept_coefficients(seed):
    """SP's folded CSR holds exactly the kept coefficients: ``nnz * P_out`` multiply-accumulates."""
    from ipfx.ops import gpu

    case = _case(basis_kind="none", sparsity=0.9, seed=seed)
    t = make_tensors(case, torch.float32)
    values, indices = sparse_coefficients(t.coeff)
    g = _conv_geometry(t.x, values, indices, None, None, list(case.weight_shape), list(case.stride),
                       list(case.padding), list(case.dilation), case.groups, case.transposed,
                       list(case.output_padding))
    crow, col, val = gpu.folded_operands(g, values, indices, lambda: indices.long(), None, t.x)
    assert col.numel() == values.numel() == int(crow[-1])
    assert torch.equal(torch.sort(val).values, torch.sort(values.float()).values)
