"""The GPU kernel of ``ipfx::ip_conv`` (Triton, ``ipfx.ops.gpu``).

On every machine with Triton (it comes with torch's CUDA builds) the kernel itself runs under Triton's
interpreter on CPU tensors, in a fresh process (``tests/gpu_interpreted.py``), against the dense conv over
hypothesis-drawn geometries. Where CUDA exists the op's CUDA kernel is checked against cuDNN too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ipfx.ops import ORDER_AUTO, ORDER_DENSE, ORDER_GPU, gpu, sparse_coefficients
from ipfx.ops.geometry import _conv_geometry, _output_spatial
from ipfx.ops import order as order_module
from ipfx.ops.order import resolve_order
from test_ops_ip_conv import ConvTensors, _case, assert_close, dense_conv, dense_weight, error_scale, make_tensors, op_call

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.parametrize("drawn", [pytest.param(5, id="5 drawn cases"), pytest.param(20, id="20 drawn cases")])
def test_triton_kernel_agrees_with_the_dense_conv_under_the_interpreter(drawn):
    """The interpreter runs the kernel slowly: about 55 s on 2 cores for its fixed geometries plus 5 drawn
    convolutions (20 barely cost more), so both run with -m slow (the default run stays near 10 minutes)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "IPFX_TRITON_EXAMPLES": str(drawn)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "gpu_interpreted.py")],
                          cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "8 passed" in done.stdout


def test_cpu_tensors_never_take_the_triton_order():
    assert not gpu.supports(torch.randn(1, 4, 6, 5))
    case = _case(sparsity=0.9)
    t = make_tensors(case, torch.float32)
    # an explicit ORDER_GPU on CPU falls back to order 0 and gives the dense conv's numbers
    assert_close(op_call(case, t, ORDER_GPU), dense_conv(case, t.x, dense_weight(case, t), t.bias), 1e-5,
                 error_scale(case, t))


def _on(t, device):
    return None if t is None else t.to(device)


@CUDA
@pytest.mark.parametrize("case", [
    _case(basis_kind="none", sparsity=0.95, c_in=32, c_out=32, spatial=(14, 14)),
    _case(basis_kind="random", sparsity=0.99, c_in=64, c_out=64, spatial=(28, 28), bias=True),
    _case(d=3, kernel=(3, 3, 3), spatial=(5, 6, 5), padding=(1, 1, 1), stride=(1, 1, 1), dilation=(1, 1, 1),
          output_padding=(0, 0, 0), transposed=True, groups=2, c_in=4, c_out=6),
], ids=["sp", "ip", "3d-transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_agrees_with_the_dense_conv(case, dtype):
    t = make_tensors(case, torch.float32)
    on_gpu = ConvTensors(t.x.to("cuda", dtype), t.coeff.cuda(), _on(t.basis, "cuda"), _on(t.bias, "cuda"))
    got = op_call(case, on_gpu, ORDER_GPU)
    ref = dense_conv(case, t.x.to(dtype).double(), dense_weight(case, t).double(), _on(t.bias, torch.float64))
    assert got.is_cuda and got.dtype == dtype
    assert_close(got.double().cpu(), ref, 1e-5 if dtype == torch.float32 else 2e-2, error_scale(case, t))


@pytest.mark.parametrize("sparsity, expected", [(0.995, ORDER_DENSE), (0.9999, ORDER_DENSE), (1.0, ORDER_GPU)])
def test_the_cuda_rule_picks_cudnn_unless_nothing_is_kept(monkeypatch, sparsity, expected):
    """The rule order=0 follows where the Triton kernel can run (CUDA), checked on any machine by letting the
    CPU pass for that device: cuDNN for every kept density (it beat the kernel on every layer measured)."""
    monkeypatch.setattr(order_module, "_own_kernel", lambda g, x: ORDER_GPU)
    case = _case(basis_kind="none", sparsity=sparsity, c_in=64, c_out=64, spatial=(16, 16))
    t = make_tensors(case, torch.float32)
    assert (t.coeff != 0).any() == (sparsity < 1.0)
    values, indices = sparse_coefficients(t.coeff)
    g = _conv_geometry(t.x, values, indices, None, None, list(case.weight_shape), list(case.stride),
                       list(case.padding), list(case.dilation), case.groups, case.transposed,
                       list(case.output_padding))
    assert resolve_order(ORDER_AUTO, g, t.x, values, indices, lambda: indices.long(), None,
                         _output_spatial(g, t.x.shape[2:]), allow_native=True) == expected


@CUDA
@pytest.mark.parametrize("sparsity, expected", [(0.995, ORDER_DENSE), (1.0, ORDER_GPU)])
def test_order_zero_on_cuda_takes_cudnn_unless_nothing_is_kept(sparsity, expected):
    """Measured on an H200, the Triton kernel lost to cuDNN on every benchmark layer (GPU_DENSITY_MAX)."""
    case = _case(basis_kind="none", sparsity=sparsity, c_in=64, c_out=64, spatial=(16, 16), bias=True)
    t = make_tensors(case, torch.float32)  # sparsity 1.0 keeps nothing
    values, indices = sparse_coefficients(t.coeff.cuda())
    x = t.x.to("cuda", torch.float32)
    g = _conv_geometry(x, values, indices, None, None, list(case.weight_shape), list(case.stride),
                       list(case.padding), list(case.dilation), case.groups, case.transposed,
                       list(case.output_padding))
    flat = lambda: indices.long()  # noqa: E731
    assert resolve_order(ORDER_AUTO, g, x, values, indices, flat, None, _output_spatial(g, x.shape[2:]),
                         allow_native=True) == expected
    on_gpu = ConvTensors(x, t.coeff.cuda(), None, t.bias.cuda())
    ref = dense_conv(case, t.x.double(), dense_weight(case, t).double(), t.bias.double())
    tol = 1e-5 if expected == ORDER_GPU else 1e-2  # cuDNN's float32 conv may run in TF32
    assert_close(op_call(case, on_gpu, ORDER_AUTO).double().cpu(), ref, tol, error_scale(case, t))


@CUDA
def test_the_kernel_runs_on_the_inputs_gpu_not_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    case = _case(sparsity=0.9)
    t = make_tensors(case, torch.float32)
    on_second = ConvTensors(t.x.to("cuda:1"), t.coeff.to("cuda:1"), t.basis.to("cuda:1"), None)
    got = op_call(case, on_second, ORDER_GPU)
    assert got.device == torch.device("cuda:1")
    assert_close(got.cpu(), dense_conv(case, t.x, dense_weight(case, t), None), 1e-5, error_scale(case, t))
