"""Max pooling on the native kernel (``ipfx.ops.pooling``) and the pass that puts it in frozen graphs
(``ipfx.passes.native_pooling``): the same numbers as ``F.max_pool2d`` to the bit, and ``nn.MaxPool2d``
wherever the native kernel does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

import ipfx
from helpers import randomize_masks
from ipfx.ops import native
from ipfx.ops.pooling import GlobalAvgPool2d, MaxPool2d, native_geometry
from ipfx.passes.manager import PassManager
from ipfx.passes.native_pooling import NativePooling

needs_native = pytest.mark.skipif(not native.available(), reason="the native kernel could not be built here")


@st.composite
def pools(draw):
    """A 2-d max pool aten accepts (padding at most half the kernel) and an input it fits, NaN and inf in
    places, float32 or float64."""
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    p = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
    span = [d[a] * (k[a] - 1) + 1 - 2 * p[a] for a in range(2)]
    # rows up to 150 wide too: the kernel takes 4 vectors of an output row at a time (64 floats with AVX-512)
    size = (draw(st.integers(max(1, span[0]), max(1, span[0]) + 9)),
            draw(st.integers(max(1, span[1]), max(1, span[1]) + 9) | st.integers(max(1, span[1]), 150)))
    x = torch.randn(draw(st.integers(1, 2)), draw(st.integers(1, 3)), *size,
                    dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                    generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    specials = draw(st.lists(st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 0.0]), max_size=4))
    if draw(st.booleans()):  # ties of -0 and 0: which one a window keeps
        x = torch.where(x < 0, -0.0, 0.0).to(x.dtype)
    for v in specials:
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = v
    return x, k, s, p, d, draw(st.booleans())


@needs_native
@settings(max_examples=150, deadline=None)
@given(case=pools(), stride_given=st.booleans())
def test_the_native_max_pool_is_aten_s_to_the_bit(case, stride_given):
    x, k, s, p, d, ceil_mode = case
    stride = s if stride_given else None
    expected = F.max_pool2d(x, k, stride, p, d, ceil_mode=ceil_mode)
    assert native_geometry(x, k, stride, p, d, ceil_mode) is not None
    with torch.no_grad():
        y = MaxPool2d(k, stride, p, d, ceil_mode=ceil_mode)(x)
    assert y.shape == expected.shape and y.dtype == expected.dtype
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(expected))
    assert torch.equal(torch.signbit(y), torch.signbit(expected))  # -0 and 0: the same one wins a tie


@needs_native
@pytest.mark.parametrize("k, s, p, d, ceil_mode", [(3, 2, 1, 1, False), ((4, 3), (3, 1), (2, 1), (2, 1), True)])
def test_a_large_image_is_pooled_a_band_of_rows_at_a_time_to_the_same_bits(k, s, p, d, ceil_mode):
    """The kernel lays a plane out a band of output rows at a time (256 KiB of rows): a 700x700 float64 image
    is many bands, the windows of neighbouring bands sharing rows; NaN, inf and ties of -0 and 0 in places."""
    x = torch.randn(1, 2, 700, 700, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x[x.abs() < 0.3] = 0.0
    x[x.abs() < 0.1] = -0.0
    x.view(-1)[::9973] = float("nan")
    x.view(-1)[5::7919] = float("inf")
    expected = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil_mode)
    with torch.no_grad():
        y = MaxPool2d(k, s, p, d, ceil_mode=ceil_mode)(x)
    assert torch.equal(y.isnan(), expected.isnan()) and y.isnan().any()
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(expected))
    assert torch.equal(torch.signbit(y), torch.signbit(expected))


def test_where_the_native_kernel_does_not_apply_the_module_is_nn_max_pool2d():
    """Autograd, non-contiguous inputs, half precision, 3-d inputs, indices: nn.MaxPool2d's results (and
    gradient); arguments aten refuses: aten's own error."""
    x = torch.randn(2, 3, 9, 9)
    pool = MaxPool2d(3, 2, 1)
    grad_x = x.clone().requires_grad_()
    pool(grad_x).sum().backward()
    assert grad_x.grad is not None and grad_x.grad.sum() == 2 * 3 * 5 * 5
    for other in (x.transpose(2, 3), x.half(), x[0], x.contiguous(memory_format=torch.channels_last)):
        with torch.no_grad():
            assert torch.equal(pool(other), F.max_pool2d(other, 3, 2, 1))
    assert native_geometry(x.half(), 3, 2, 1, 1, False) is None
    assert native_geometry(x, 3, 2, 2, 1, False) is None  # padding past half the kernel
    with pytest.raises(RuntimeError, match="pad should be"):
        with torch.no_grad():
            MaxPool2d(3, 2, 2)(x)
    values, indices = MaxPool2d(3, 2, 1, return_indices=True)(x)
    assert torch.equal(values, F.max_pool2d(x, 3, 2, 1)) and indices.dtype == torch.int64


class Pools(nn.Module):
    """A pool as a module, as F.max_pool2d with a computed kernel size and with indices, and aten's."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.indexed = nn.MaxPool2d(2, return_indices=True)

    def forward(self, x):
        y = self.pool(self.conv(x))
        y = F.max_pool2d(y, 2, ceil_mode=True) + torch.ops.aten.max_pool2d.default(y, [2, 2], [2, 2], [0, 0], [1, 1], True)
        z, _ = self.indexed(y)
        return F.max_pool2d(z, z.shape[-1] // 2 + 1)


@needs_native
def test_the_pass_replaces_constant_max_pools_and_leaves_the_rest():
    torch.manual_seed(0)
    original = Pools()
    gm = torch.fx.symbolic_trace(original)
    passes = PassManager([NativePooling()], sites=lambda m: [(m, {})])
    passes(gm)
    pools = [n for n, m in gm.named_modules() if isinstance(m, MaxPool2d)]
    assert len(pools) == 3, pools  # the module and both constant function calls
    assert "it returns indices" in passes.skipped().values()
    assert "its arguments are computed" in passes.skipped().values()
    assert not any(n.op == "call_function" and n.target in (F.max_pool2d, torch.ops.aten.max_pool2d.default)
                   and not isinstance(n.args[1], torch.fx.Node) for n in gm.graph.nodes)
    for shape in [(2, 3, 17, 13), (1, 3, 30, 22)]:
        y = torch.randn(*shape)
        with torch.no_grad():
            assert torch.equal(gm(y), original(y))


@needs_native
@pytest.mark.parametrize("example", [True, False], ids=["example-inputs", "no-example"])
def test_frozen_and_loaded_resnets_pool_natively_and_compute_the_same(tmp_path, example):
    """ipfx.lower(freeze=True) and deploy.load_module: resnet18's max pool runs as ipfx's module, same
    numbers as the transformed model on the example's shape and another, no aten max pool left."""
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    t = ipfx.transform(model, space="sp", example_inputs=(x,) if example else None)
    randomize_masks(t, 0.5)
    frozen = ipfx.lower(t.eval(), target="fused", freeze=True)
    ipfx.deploy.save_program(frozen, tmp_path / "net", x)
    loaded = ipfx.deploy.load_module(tmp_path / "net.pt2")
    from ipfx.passes.module_paths import PathModule

    containers = [s for s in loaded.modules() if s._modules and s is not loaded]  # (layer1, layer1.0, ...)
    assert containers and all(type(s) is PathModule for s in containers)  # the forward's paths as attributes
    for m in (frozen, loaded):
        assert sum(isinstance(s, MaxPool2d) for s in m.modules()) == 1
        assert sum(isinstance(s, GlobalAvgPool2d) for s in m.modules()) == 1  # (the head's average pool)
        assert not any(n.op == "call_function" and "adaptive_avg_pool" in str(n.target) for n in m.graph.nodes)
        assert not any(type(s) is nn.MaxPool2d for s in m.modules())
        assert not any(n.op == "call_function" and "max_pool" in str(n.target) for n in m.graph.nodes)
    for shape in [(2, 3, 64, 64), (1, 3, 72, 80)]:
        y = torch.randn(*shape)
        with torch.no_grad():
            expected = t(y)
            assert torch.allclose(frozen(y), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
            assert torch.equal(loaded(y), frozen(y))


@needs_native
@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 40), h=st.integers(1, 19), w=st.integers(1, 19),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16),
       specials=st.lists(st.sampled_from([float("nan"), float("inf"), float("-inf")]), max_size=2))
def test_the_native_global_average_pool_is_the_mean_of_each_plane(n, c, h, w, dtype, seed, specials):
    """GlobalAvgPool2d in eager inference (the native channel mean): each plane's mean within a few ulps of
    aten's, NaN and infinities where aten has them, the same bits at one and two threads (a plane is summed by
    one thread in a fixed order), and aten's own result wherever autograd is on."""
    x = torch.randn(n, c, h, w, dtype=dtype, generator=torch.Generator().manual_seed(seed)) + 3
    for i, v in enumerate(specials):
        x.view(-1)[(seed * (i + 7)) % x.numel()] = v
    pool = GlobalAvgPool2d()
    expected = F.adaptive_avg_pool2d(x, 1)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = pool(x)
            torch.set_num_threads(2)
            two = pool(x)
    finally:
        torch.set_num_threads(threads)
    assert one.shape == expected.shape == (n, c, 1, 1) and one.dtype == dtype
    assert torch.equal(one.isnan(), expected.isnan()) and torch.equal(one.isnan(), two.isnan())
    fine = ~expected.isnan()
    assert torch.equal(one[fine], two[fine])
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(one[fine], expected[fine], rtol=tol, atol=tol)
    with torch.enable_grad():
        assert torch.equal(pool(x.requires_grad_()).detach().isnan(), expected.isnan())  # (aten's path: autograd)
        x.requires_grad_(False)


@needs_native
def test_global_average_pools_become_native_and_others_stay():
    """The pass turns nn.AdaptiveAvgPool2d(1), F.adaptive_avg_pool2d(x, 1) and aten's (x, [1, 1]) into
    GlobalAvgPool2d, and leaves pools to other sizes; the result is aten's (to a few ulps), on other shapes
    too; the module exports as aten's op, and falls back to aten on a non-contiguous input."""

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.head, self.other = nn.AdaptiveAvgPool2d((1, 1)), nn.AdaptiveAvgPool2d(2)

        def forward(self, x):
            a = self.head(x) + F.adaptive_avg_pool2d(x, 1) + torch.ops.aten.adaptive_avg_pool2d(x, [1, 1])
            return a.flatten(1), self.other(x).flatten(1), F.adaptive_avg_pool2d(x, (1, 2)).flatten(1)

    original = Heads()
    gm = torch.fx.symbolic_trace(original)
    PassManager([NativePooling()], sites=lambda m: [(m, {})])(gm)
    assert sum(type(m) is GlobalAvgPool2d for m in gm.modules()) == 3
    assert type(gm.other) is nn.AdaptiveAvgPool2d
    assert sum(n.op == "call_function" and "adaptive_avg_pool" in str(n.target) for n in gm.graph.nodes) == 1
    for shape in [(2, 5, 7, 7), (1, 5, 13, 9)]:
        y = torch.randn(*shape)
        with torch.no_grad():
            for got, want in zip(gm(y), original(y)):
                torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    pool = GlobalAvgPool2d()
    y = torch.randn(2, 4, 9, 9).transpose(2, 3)
    with torch.no_grad():
        assert torch.equal(pool(y), F.adaptive_avg_pool2d(y, 1))  # (not contiguous: aten's)
    exported = torch.export.export(nn.Sequential(GlobalAvgPool2d()), (torch.randn(1, 3, 5, 5),))
    assert any("adaptive_avg_pool2d" in str(n.target) for n in exported.graph.nodes)


def test_torch_jit_trace_of_a_frozen_model_records_its_ops():
    """Under torch.jit.trace (no autograd, plain tensors) the fused convs and the native pools take the op /
    aten path, so the traced graph computes what the model computes on other inputs (a native call the tracer
    cannot see was recorded as a constant: the traced model gave the example's output for every input)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 16, 16)
    t = ipfx.transform(model, space="sp", example_inputs=(x,))
    randomize_masks(t, 0.5)
    frozen = ipfx.lower(t.eval(), target="fused", freeze=True)
    assert any(isinstance(s, GlobalAvgPool2d) for s in frozen.modules())
    with torch.no_grad():
        traced = torch.jit.trace(frozen, x, check_trace=False)
        for shape in [(2, 3, 16, 16), (3, 3, 20, 12)]:
            y = torch.randn(*shape)
            torch.testing.assert_close(traced(y), frozen(y), rtol=1e-5, atol=1e-5)
