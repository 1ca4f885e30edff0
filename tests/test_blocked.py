"""The batch-blocked layout (ipfx.ops.blocked, csrc/blocked.h): its conv, max pool and channel mean compute the
NCHW kernels' numbers bit for bit, and a program at a batch of a multiple of the lanes keeps values in it between
steps with the generated forward's numbers."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ipfx
from ipfx.ops import blocked, native, program
from helpers import quiet, randomize_masks

pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")

ops = torch.ops.ipfx_native


def lanes() -> int:
    return blocked.lanes()


def csr(w: torch.Tensor, groups: int):
    """CSR of A[o, i*K + t] over all c_in (block-diagonal for groups), as the fused modules store it."""
    c_out, cin_g, K = w.shape[0], w.shape[1], w.shape[2] * w.shape[3]
    a = w.reshape(c_out, cin_g * K)
    crow = torch.zeros(c_out + 1, dtype=torch.long)
    crow[1:] = (a != 0).sum(1).cumsum(0)
    rows, cols = a.nonzero(as_tuple=True)
    cols = cols + (rows // (c_out // groups)) * cin_g * K
    return crow, cols.contiguous(), a[rows, a.nonzero(as_tuple=True)[1]].contiguous()


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c_in, c_out = groups * draw(st.integers(1, 5)), groups * draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    size = tuple(draw(st.integers(max(1, d * (k - 1) + 1 - 2 * p), 23))
                 for k, d, p in zip((kh, kw), dilation, padding))
    return dict(groups=groups, c_in=c_in, c_out=c_out, kernel=(kh, kw), stride=stride, dilation=dilation,
                padding=padding, size=size, density=draw(st.sampled_from([0.0, 0.05, 0.3, 1.0])),
                activation=draw(st.integers(0, 5)), residual=draw(st.booleans()), bias=draw(st.booleans()),
                blocks=draw(st.integers(1, 2)), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=120, deadline=None)
@given(conv_cases())
def test_the_blocked_conv_computes_the_direct_paths_numbers_bit_for_bit(case):
    """Every geometry (groups, strides, dilations, padding wider than the kernel, rows shorter than a tile, maps
    of one position), activation, residual and density: each number of the blocked conv is the one the NCHW
    direct path writes, and both are F.conv2d's up to rounding."""
    g = torch.Generator().manual_seed(case["seed"])
    n = case["blocks"] * lanes()
    x = torch.randn(n, case["c_in"], *case["size"], generator=g)
    w = torch.randn(case["c_out"], case["c_in"] // case["groups"], *case["kernel"], generator=g)
    w = w * (torch.rand(w.shape, generator=g) < case["density"])
    b = torch.randn(case["c_out"], generator=g) if case["bias"] else None
    dense = F.conv2d(x, w, b, case["stride"], case["padding"], case["dilation"], case["groups"])
    res = torch.randn(dense.shape, generator=g) if case["residual"] else None
    crow, col, vals = csr(w, case["groups"])
    geometry = dict(c_in=case["c_in"], c_out=case["c_out"], K=w.shape[2] * w.shape[3], kernel=list(case["kernel"]),
                    stride=list(case["stride"]), padding=list(case["padding"]), dilation=list(case["dilation"]),
                    groups=case["groups"], transposed=False)
    used = torch.ones(case["c_in"] * geometry["K"], dtype=torch.uint8)
    out = list(dense.shape[2:])
    nchw = native.conv(x, crow, col, vals, None, b, used, geometry, out, res, case["activation"], direct=True)
    yb = ops.conv_blocked(ops.to_blocked(x), crow, col, vals, b, case["c_out"], list(case["kernel"]),
                          list(case["stride"]), list(case["padding"]), list(case["dilation"]), case["groups"], out,
                          None if res is None else ops.to_blocked(res), case["activation"])
    assert yb.shape == (case["blocks"], case["c_out"], *out, lanes())
    y = ops.from_blocked(yb)
    assert torch.equal(y, nchw)
    act = [lambda v: v, F.relu, F.relu6, F.silu, F.gelu, F.hardswish][case["activation"]]
    expected = act(dense if res is None else dense + res)
    assert torch.allclose(y, expected, rtol=1e-4, atol=1e-4 * (1 + expected.abs().max().item()))


@pytest.mark.parametrize("activation,residual", [(1, True), (0, False), (2, True)])
def test_an_output_past_the_cache_is_streamed_with_the_same_numbers(activation, residual):
    """An output of more than 16 MiB (csrc/blocked.h: kStreamBytes) is written with streaming stores, past the
    caches: every number is still the NCHW direct path's, every output written (a fresh output is not zeroed)."""
    g = torch.Generator().manual_seed(activation)
    x = torch.randn(16, 4, 48, 48, generator=g)
    w = torch.randn(128, 4, 3, 3, generator=g) * (torch.rand(128, 4, 3, 3, generator=g) < 0.3)
    b = torch.randn(128, generator=g)
    res = torch.randn(16, 128, 48, 48, generator=g) if residual else None
    assert 16 * 128 * 48 * 48 * 4 > 16 << 20  # the premise: past the threshold
    crow, col, vals = csr(w, 1)
    geometry = dict(c_in=4, c_out=128, K=9, kernel=[3, 3], stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1,
                    transposed=False)
    nchw = native.conv(x, crow, col, vals, None, b, torch.ones(36, dtype=torch.uint8), geometry, [48, 48], res,
                       activation, direct=True)
    for _ in range(2):  # the second time into recycled memory holding the first output
        yb = ops.conv_blocked(ops.to_blocked(x), crow, col, vals, b, 128, [3, 3], [1, 1], [1, 1], [1, 1], 1, [48, 48],
                              None if res is None else ops.to_blocked(res), activation)
        assert torch.equal(ops.from_blocked(yb), nchw)
        del yb


@settings(max_examples=60, deadline=None)
@given(kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)), stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)), size=st.tuples(st.integers(1, 15), st.integers(1, 15)),
       pad=st.tuples(st.integers(0, 2), st.integers(0, 2)), nan=st.booleans(), seed=st.integers(0, 2**16))
def test_the_blocked_max_pool_and_channel_mean_compute_the_nchw_ops_numbers(kernel, stride, dilation, size, pad, nan,
                                                                           seed):
    """max_pool2d_blocked: the native NCHW max pool's numbers (a NaN wins, padding never does); channel_mean_blocked:
    channel_mean's, summed in its order (an ordinary (N, C, 1, 1) result); to/from_blocked: each other's inverse."""
    padding = tuple(min(p, k // 2) for p, k in zip(pad, kernel))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * lanes(), 3, *size, generator=g)
    if nan:
        x[1, 2, size[0] // 2, size[1] // 2] = float("nan")
    xb = ops.to_blocked(x)
    assert xb.shape == (2, 3, *size, lanes()) and xb[1, 2, 0, 0, 3].item() == x[lanes() + 3, 2, 0, 0].item()
    assert torch.equal(ops.from_blocked(xb).nan_to_num(), x.nan_to_num())
    assert torch.equal(ops.channel_mean_blocked(xb).nan_to_num(), ops.channel_mean(x).nan_to_num())
    out = [(s + 2 * p - d * (k - 1) - 1) // t + 1 for s, p, d, k, t in zip(size, padding, dilation, kernel, stride)]
    if min(out) < 1:
        return
    args = [list(kernel), list(stride), list(padding), list(dilation), out]
    pooled = ops.from_blocked(ops.max_pool2d_blocked(xb, *args))
    expected = ops.max_pool2d(x, *args)
    assert torch.equal(pooled.isnan(), expected.isnan())
    assert torch.equal(pooled.nan_to_num(), expected.nan_to_num())
    assert torch.equal(expected.nan_to_num(), F.max_pool2d(x, kernel, stride, padding, dilation).nan_to_num())


def test_the_blocked_ops_refuse_what_they_cannot_take():
    """Another number of lanes, a batch that is not a multiple of them, an output size the geometry does not give,
    a CSR column past the input channels: refused with what is wrong."""
    L = lanes()
    x = torch.randn(L, 2, 5, 5)
    w = torch.randn(3, 2, 3, 3)
    crow, col, vals = csr(w, 1)
    xb = ops.to_blocked(x)
    args = [3, [3, 3], [1, 1], [1, 1], [1, 1], 1]
    assert ops.conv_blocked(xb, crow, col, vals, None, *args, [5, 5], None, 0).shape == (1, 3, 5, 5, L)
    with pytest.raises(RuntimeError, match="lanes"):
        ops.conv_blocked(xb[..., :L // 2].contiguous(), crow, col, vals, None, *args, [5, 5], None, 0)
    with pytest.raises(RuntimeError, match="out_spatial"):
        ops.conv_blocked(xb, crow, col, vals, None, *args, [4, 5], None, 0)
    with pytest.raises(RuntimeError, match="column"):
        ops.conv_blocked(xb, crow, col + 100, vals, None, *args, [5, 5], None, 0)
    with pytest.raises(RuntimeError, match="multiple of"):
        ops.to_blocked(torch.randn(L + 1, 2, 5, 5))
    with pytest.raises(RuntimeError, match="residual"):
        ops.conv_blocked(xb, crow, col, vals, None, *args, [5, 5], xb, 0)


class Net(nn.Module):
    """A stem, a max pool, a residual block, a squeeze-excite block (pool, hardsigmoid, mul), hardswish, a strided
    conv, a head: every step the blocked layout has and the conversions around the ones it has not."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.se1, self.se2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.down = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = F.max_pool2d(self.stem(x), 2)
        x = F.relu(self.block(x) + x)
        x = x * F.hardsigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(x, 1)))))
        x = F.hardswish(self.down(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 20, 20)
    t = quiet(ipfx.transform, Net().eval(), space="sp", example_inputs=(x,))
    randomize_masks(t, 0.05)
    path = tmp_path_factory.mktemp("blocked") / "net"
    quiet(ipfx.deploy.save_program, quiet(ipfx.lower, t.eval(), target="fused", freeze=True), path, x)
    return quiet(ipfx.deploy.load_module, str(path) + ".pt2")


def generated(m, x):
    return type(m).forward.__wrapped__(m, x)


def the_program(m, x):
    return program.programs_of(m)[program._signature([x])]


def test_a_program_keeps_values_blocked_between_steps_with_the_generated_forwards_numbers(loaded):
    """At a batch of a multiple of the lanes the convs, the max pool, the residual add, the scale and the
    activations run on the blocked layout: the input converted once, the squeeze-excite's scale once, the
    features pooled into an NCHW result; outputs the generated forward's bit for bit. At another batch nothing
    runs blocked."""
    L = lanes()
    with torch.inference_mode():
        for batch in (L, 2 * L):
            x = torch.randn(batch, 3, 20, 20)
            y = loaded(x)
            assert torch.equal(y, generated(loaded, x)) and torch.equal(loaded(x), y)
            kinds, names = the_program(loaded, x).kinds, the_program(loaded, x).nodes
            conversions = [n for n in names if n.endswith("blocked)")]
            assert kinds.count("blocked") == 3 and kinds.count("conv") == 2, kinds  # (the squeeze-excite's: NCHW)
            assert conversions == ["x (to blocked)", "hardsigmoid (to blocked)"], names
        x = torch.randn(L + 1, 3, 20, 20)
        assert torch.equal(loaded(x), generated(loaded, x))
        assert "blocked" not in the_program(loaded, x).kinds
        assert not any(n.endswith("blocked)") for n in the_program(loaded, x).nodes)


def test_without_the_blocked_layout_the_program_computes_the_same_numbers(loaded, monkeypatch):
    x = torch.randn(lanes(), 3, 20, 12)
    with torch.inference_mode():
        y = loaded(x)
        assert "blocked" in the_program(loaded, x).kinds
        monkeypatch.setattr(blocked, "ENABLED", False)
        program.programs_of(loaded).clear()
        assert torch.equal(loaded(x), y)
        assert "blocked" not in the_program(loaded, x).kinds


def test_a_blocked_program_follows_a_change_of_the_weights(loaded):
    """An in-place edit of a conv's kept values (a guarded version): the blocked program is built again and computes
    with the new values."""
    x = torch.randn(lanes(), 3, 20, 20)
    conv = next(m for m in loaded.modules() if isinstance(m, ipfx.ops.SparseIPConv) and m.weight_shape[0] == 24)
    with torch.inference_mode():
        before = loaded(x)
        with torch.no_grad():
            conv.values.mul_(2)
        after = loaded(x)
        assert not torch.equal(after, before) and torch.equal(after, generated(loaded, x))
        with torch.no_grad():
            conv.values.div_(2)
        assert torch.equal(loaded(x), before)


def test_a_program_with_a_conv_that_cannot_run_blocked_stays_nchw_throughout(tmp_path):
    """All or nothing: a grouped conv (which stays NCHW) between ungrouped ones would cost two conversions per
    call, so the whole program runs NCHW; the same network without it runs blocked."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 12)
    kinds = {}
    for groups in (1, 8):
        net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=groups),
                            nn.ReLU(), nn.Conv2d(16, 8, 1)).eval()
        t = quiet(ipfx.transform, net, space="sp", example_inputs=(x,))
        randomize_masks(t, 0.05)
        path = quiet(ipfx.deploy.save_program, quiet(ipfx.lower, t.eval(), target="fused", freeze=True),
                     tmp_path / f"g{groups}", x)
        m = quiet(ipfx.deploy.load_module, str(path))
        big = torch.randn(lanes(), 8, 12, 12)
        with torch.inference_mode():
            assert torch.equal(m(big), generated(m, big))
        kinds[groups] = the_program(m, big).kinds
    assert kinds[1].count("blocked") == 3, kinds
    assert "blocked" not in kinds[8] and not any("blocked)" in n for n in kinds[8]), kinds


class Halved(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.b(F.relu(self.a(x)) * 0.5 - 1.0)


def test_an_elementwise_op_with_a_number_runs_on_the_blocked_values(tmp_path):
    """``y * 0.5 - 1.0`` are aten ops the program calls from Python (a number for a tensor argument): planned
    blocked, they made the whole program rebuild NCHW; now they run on the blocked values, with no conversion
    but the input's and the output's."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 10)
    t = quiet(ipfx.transform, Halved().eval(), space="sp", example_inputs=(x,))
    randomize_masks(t, 0.05)
    path = quiet(ipfx.deploy.save_program, quiet(ipfx.lower, t.eval(), target="fused", freeze=True),
                 tmp_path / "halved", x)
    m = quiet(ipfx.deploy.load_module, str(path))
    big = torch.randn(lanes(), 3, 10, 10)
    with torch.inference_mode():
        assert torch.equal(m(big), generated(m, big))
    kinds, names = the_program(m, big).kinds, the_program(m, big).nodes
    assert kinds.count("blocked") == 2 and "python" in kinds, kinds
    assert [n for n in names if n.endswith("blocked)")] == ["x (to blocked)", "b (from blocked)"], names
