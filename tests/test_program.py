"""ipfx.ops.program: a loaded program's graph as one native call, with the generated forward's numbers, following
every change of the model it was built from."""

import copy
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ipfx
from ipfx.ops import SparseIPConv, native, order, program
from helpers import quiet, randomize_masks, run_in_threads

pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")


class Net(nn.Module):
    """Convs with a residual, a squeeze-excite block (pool, hardsigmoid, mul), hardswish, max pool, a linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.se1, self.se2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.block(x) + x)
        x = F.max_pool2d(x, 2)
        x = x * F.hardsigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(x, 1)))))
        return self.head(F.hardswish(x).mean((2, 3)))


class _EveryOther(nn.Module):
    """A conv's output at every ``step``-th position: another shape for what follows when ``step`` changes."""

    def __init__(self, conv):
        super().__init__()
        self.conv, self.step = conv, 1

    def forward(self, x, **kwargs):
        return self.conv(x, **kwargs)[..., ::self.step, ::self.step]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    t = quiet(ipfx.transform, Net().eval(), space="sp", example_inputs=(torch.randn(2, 3, 16, 16),))
    randomize_masks(t, 0.1)
    frozen = quiet(ipfx.lower, t.eval(), target="fused", freeze=True)
    path = tmp_path_factory.mktemp("program") / "net"
    quiet(ipfx.deploy.save_program, frozen, path, torch.randn(2, 3, 16, 16))
    return str(path) + ".pt2"


def load(saved):
    return quiet(ipfx.deploy.load_module, saved)


def generated(m, x):
    """The forward torch.fx generated for the graph (what the program stands in for)."""
    return type(m).forward.__wrapped__(m, x)


def the_program(m, x):
    return program.programs_of(m)[program._signature([x])]


def test_a_loaded_program_runs_its_graph_natively_with_the_generated_forwards_numbers(saved):
    """load_module installs the program forward; per input signature one program is built and reused, its steps
    native convs and boxed ops (Python only for dense-order convs; torch.export's input guards ran in the build),
    its outputs the generated forward's bit for bit, on the saved batch size and others and on another spatial
    size."""
    m = load(saved)
    assert program.programs_of(m) == {}
    with torch.inference_mode():
        for shape in [(2, 3, 16, 16), (1, 3, 16, 16), (5, 3, 16, 16), (2, 3, 24, 20)]:
            x = torch.randn(*shape)
            first, again, expected = m(x), m(x), generated(m, x)
            assert torch.equal(first, expected) and torch.equal(again, expected), shape
            kinds = the_program(m, x).kinds
            plans = [s.__dict__["_last_plan_memo"][1] for s in m.modules() if isinstance(s, SparseIPConv)]
            bound = sum(hasattr(p, "bound") for p in plans)  # (a plan on the native kernel; the 3-channel stem's
            assert bound >= 2 and kinds.count("conv") == bound, kinds  # is dense: a Python step)
            assert kinds.count("python") == len(plans) - bound, kinds  # (no input guards)
            assert kinds.count("op") == 7, kinds  # max pool, pool, hardsigmoid, mul, hardswish, mean, the linear
    assert len(program.programs_of(m)) == 4
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():  # (no_grad as inference_mode)
        assert torch.equal(m(x), generated(m, x)) and len(program.programs_of(m)) == 5
        channels_last = x.to(memory_format=torch.channels_last)  # (another signature: its strides)
        assert torch.equal(m(channels_last), generated(m, channels_last)) and len(program.programs_of(m)) == 6


def test_a_program_times_its_steps_only_while_asked(saved):
    """Program.set_timing (benchmarks/program_profile.py): each step's total over the runs since timing was turned
    on, kept when it is turned off; a program names each step's node."""
    m = load(saved)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        m(x)
        p = the_program(m, x)
        assert p.step_seconds == []  # (never turned on)
        names = {n.name for n in m.graph.nodes}
        assert len(p.nodes) == len(p.kinds) and set(p.nodes) <= names
        p.set_timing(True)
        assert p.step_seconds == [0.0] * len(p.kinds)
        start = time.perf_counter()
        for _ in range(3):
            m(x)
        wall = time.perf_counter() - start
        p.set_timing(False)
        spent = p.step_seconds
        assert len(spent) == len(p.kinds) and all(s > 0 for s in spent) and sum(spent) <= wall, spent
        m(x)
        assert p.step_seconds == spent
        p.set_timing(True)
        assert p.step_seconds == [0.0] * len(p.kinds)
        p.set_timing(False)


def test_the_program_follows_every_change_of_the_model(saved):
    """After each change (an in-place edit of a conv's values, a replaced buffer or bias, another activation or
    stride, load_state_dict, a replaced submodule, a hook on a conv, a global hook, IPFX_AUTOTUNE) the
    output is the generated forward's on the changed model: the program's guards see each and it is rebuilt."""
    m = load(saved)
    convs = [name for name, s in m.named_modules() if isinstance(s, SparseIPConv)]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # (not inference_mode: tensors made in it have no version to guard)
        m(x)
        before = the_program(m, x)

        def check(what, fresh=False):
            y = m(x)
            # (fresh: against a copy, whose per-op plans are new: the model's own may have missed the change too)
            assert torch.equal(y, generated(copy.deepcopy(m) if fresh else m, x)), what
            return y

        conv = m.get_submodule(convs[1])
        conv.values.mul_(2)
        check("values edited in place")
        assert the_program(m, x) is not before
        conv.values = conv.values * -1.5
        check("values replaced")
        conv.values.data = conv.values.data * 2  # (counts no in-place version: its data address is guarded)
        check("values swapped through .data", fresh=True)
        conv.indices.data = conv.indices.data.flip(0)
        check("indices swapped through .data", fresh=True)
        for _ in range(5):  # the old data freed first (its block may come back: the guard holds it)
            n = conv.values.numel()
            conv.values.data = torch.empty(0)
            conv.values.data = torch.randn(n) * 3
            check("values freed, then new ones through .data", fresh=True)
        conv.bias = nn.Parameter(conv.bias * 3, requires_grad=False)
        check("bias replaced")
        conv.activation = "hardswish" if conv.activation != "hardswish" else "relu"
        check("activation")
        first = m.get_submodule(convs[0])
        state = {k: v * 0.5 if k.endswith("values") else v for k, v in m.state_dict().items()}
        m.load_state_dict(state)
        check("load_state_dict")
        native_conv = next(s for s in map(m.get_submodule, convs) if hasattr(s.__dict__["_last_plan_memo"][1], "bound"))
        handle = native_conv.register_forward_hook(lambda mod, args, out: out * 2)
        check("a forward hook")
        handle.remove()
        check("the hook removed")
        handle = nn.modules.module.register_module_forward_hook(
            lambda mod, args, out: out * 2 if isinstance(mod, SparseIPConv) else None)
        check("a global hook")
        handle.remove()
        parent_name, _, child = convs[0].rpartition(".")
        parent = m.get_submodule(parent_name) if parent_name else m
        replacement = copy.deepcopy(first)
        replacement.values = replacement.values.flip(0)
        setattr(parent, child, replacement)
        check("a replaced submodule")
        replacement.stride = (2, 2)
        check("the replaced conv's stride (8x8 maps from there on)")
        replacement.stride = (1, 1)
        check("stride back")
        # a module the program runs in Python (not a fused conv) whose output changes shape: the native conv
        # after it was bound for the old shape and refuses the new one; the program is built again
        assert getattr(m.get_submodule(convs[1]).__dict__["_last_plan_memo"][1], "bound", None) is not None, "premise"
        strided = _EveryOther(replacement)
        setattr(parent, child, strided)
        check("a module run in Python")
        strided.step = 2
        assert m(x).shape == (2, 10)
        check("its output at another size")
        setattr(parent, child, replacement)
        check("the conv back")
        pool_name = next(n for n, s in m.named_modules() if type(s).__name__ == "GlobalAvgPool2d")
        program_now = the_program(m, x)
        assert program_now.kinds[program_now.nodes.index(pool_name.replace(".", "_"))] == "op"  # (its native op)
        handle = m.get_submodule(pool_name).register_forward_hook(lambda mod, args, out: out * 2)
        check("a hook on the global pool")
        handle.remove()
        m.get_submodule(pool_name).output_size = (1, 1)  # (another object: seen, same result)
        check("the pool's output size")
        linear = next(s for s in m.modules() if type(s).__name__ == "SparseLinear")
        program_now = the_program(m, x)
        assert program_now.kinds[-1] == "op"  # (the head: its native op)
        linear.values.mul_(3)
        check("the linear's values edited in place")
        linear.values.data = linear.values.data * -1
        check("the linear's values swapped through .data", fresh=True)
        linear.bias = nn.Parameter(linear.bias + 1, requires_grad=False)
        check("the linear's bias replaced")
        handle = linear.register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
        check("a pre-hook on the linear")
        handle.remove()
        check("the pre-hook removed")
        # torch.export's input guards: not a step (they hold for the signature), but replacing them is seen
        guards_fn = m.get_submodule("_guards_fn")
        assert "_guards_fn" not in the_program(m, x).nodes

        def refuse(*args):
            raise AssertionError("Guard failed: refused")

        guards_fn.forward = refuse
        with pytest.raises(AssertionError, match="refused"):
            m(x)
        del guards_fn.forward
        check("the guards' own forward back")
        m._guards_fn = copy.deepcopy(guards_fn)
        m._guards_fn.forward = refuse
        with pytest.raises(AssertionError, match="refused"):
            m(x)


def test_a_pool_attribute_that_changes_the_size_a_strided_conv_sees_rebuilds_the_program(tmp_path):
    """A max pool run in Python whose kernel and stride change after the program is built: the strided 3x3 conv
    after it (the gather path) now sees 32x32 maps instead of 16x16. Its bound kernel refuses them (it was bound
    for 16x16; before, it took them and wrote a 8x8 map from them: 3% off), so the program is built again and
    computes the generated forward's numbers, as a program loaded after the change does."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    x = torch.randn(2, 3, 32, 32)
    t = quiet(ipfx.transform, net, space="sp", example_inputs=(x,))
    randomize_masks(t, 0.1)
    path = quiet(ipfx.deploy.save_program, quiet(ipfx.lower, t.eval(), target="fused", freeze=True),
                 tmp_path / "pooled", x)

    def change(m):
        pool = next(s for s in m.modules() if isinstance(s, nn.MaxPool2d))
        pool.kernel_size = pool.stride = 1

    m = load(str(path))
    with torch.inference_mode():
        before = m(x)
        change(m)
        y = m(x)
        assert not torch.equal(y, before)
        assert torch.equal(y, generated(m, x))
        fresh = load(str(path))
        change(fresh)
        assert torch.equal(fresh(x), y)
        conv = next(s for s in m.modules() if isinstance(s, SparseIPConv) and s.stride == (2, 2))
        conv(torch.randn(2, 16, 16, 16))
        kernel, code, _ = conv.__dict__["_last_plan_memo"][1].bound
        with pytest.raises(ValueError) as refused:
            kernel(torch.randn(2, 16, 32, 32), None, code)
        assert native.binding_mismatch(refused.value)


def test_calls_the_program_does_not_take_run_the_generated_forward_and_raise_its_errors(saved):
    """With autograd on, keyword arguments, another number of inputs or an input the graph refuses, the generated
    forward runs (same result or same error); a recompile gives the module fx's forward back, as a deep copy has it;
    two threads calling one module get their own inputs' outputs."""
    m = load(saved)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        expected = m(x)
        assert len(program.programs_of(m)) == 1
    y = m(x)  # autograd on: the fused op's graph path, no program for it
    assert torch.allclose(y, expected, rtol=1e-5, atol=1e-6) and len(program.programs_of(m)) == 1
    plain = load(saved)
    type(plain).forward = type(plain).forward.__wrapped__  # (as loaded before the program)
    for args, kwargs in [((torch.randn(2, 4, 16, 16),), {}), ((torch.randn(3, 16, 16),), {}), ((), {"x": x}),
                         ((x, x), {})]:
        with torch.inference_mode():
            with pytest.raises(Exception) as ours:
                m(*args, **kwargs)
            with pytest.raises(Exception) as theirs:
                plain(*args, **kwargs)
        assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)
    assert len(program.programs_of(m)) == 1
    other = copy.deepcopy(m)  # (the program forward again, a program of its own; torch's loaded modules do not
    with torch.inference_mode():  # pickle, with it or without)
        assert torch.equal(other(x), expected) and len(program.programs_of(other)) == 1
    assert program.programs_of(other) is not program.programs_of(m)
    m.recompile()
    assert program.programs_of(m) is None
    with torch.inference_mode():
        assert torch.equal(m(x), expected)
    m = load(saved)
    inputs = [torch.randn(b, 3, 16, 16) for b in (1, 2, 3, 4)]
    with torch.inference_mode():
        wanted = [generated(m, i) for i in inputs]
    got = {}

    def work(i):
        with torch.inference_mode():
            for _ in range(20):
                got[i] = m(inputs[i])
                assert torch.equal(got[i], wanted[i])

    run_in_threads(work)
    assert all(torch.equal(got[i], wanted[i]) for i in range(4))


class Mixed(nn.Module):
    """Native conv steps around an aten op that autocast runs in bfloat16 (a matmul over the rows)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)
        self.register_buffer("mix", torch.randn(16, 16) / 4)

    def forward(self, x):
        return self.b(F.relu(self.a(torch.matmul(x, self.mix))))


def test_under_autocast_the_generated_forward_runs(tmp_path):
    """Autocast changes the dtypes aten steps return: a call under it runs the generated forward (its numbers,
    its dtype), before a program is built or after, and builds none; plain calls then run the plain program.
    (A float32 program run under CPU bfloat16 autocast handed a native conv step a bfloat16 input: a loaded
    resnet18 raised; here the program was built again under autocast, and plain calls then ran its convs in
    Python.)"""
    torch.manual_seed(0)
    x = torch.randn(2, 32, 16, 16)
    t = quiet(ipfx.transform, Mixed().eval(), space="sp", example_inputs=(x,))
    randomize_masks(t, 0.1)
    quiet(ipfx.deploy.save_program, quiet(ipfx.lower, t, target="fused", freeze=True), tmp_path / "m", x)
    for first in ("autocast", "plain"):
        m = load(str(tmp_path / "m.pt2"))
        with torch.inference_mode():
            expected = generated(m, x)
            calls = ["autocast", "plain", "autocast", "plain"] if first == "autocast" else ["plain", "autocast"] * 2
            for i, call in enumerate(calls):
                if call == "plain":
                    assert torch.equal(m(x), expected)
                    kinds = program.programs_of(m)[program._signature([x])].kinds
                    assert "conv" in kinds[kinds.index("op"):], kinds  # (a native conv after the matmul)
                    continue
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    cast, wanted = m(x), generated(m, x)
                assert wanted.dtype == torch.bfloat16 and cast.dtype == wanted.dtype and torch.equal(cast, wanted)
                assert len(program.programs_of(m)) == (0 if i == 0 else 1)


class Inverted(nn.Module):
    """Pointwise convs feeding grouped ones, as in inverted residual blocks: a depthwise 3x3/2 after an expansion
    (batch norm, relu), groups of two channels (silu after each), a channel multiplier of two (gelu after the
    pointwise conv: the epilogue's scalar path), a depthwise 5x5 with a residual in its epilogue (hardswish
    after the add); and pairs that stay two steps: a pointwise output read twice, a strided 1x1 conv, a 1x1 conv
    with a residual."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(8, 24, 1), nn.BatchNorm2d(24), nn.ReLU())
        self.dw = nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24)
        self.expand2 = nn.Conv2d(24, 16, 1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=8)  # (2 channels in, 2 out a group)
        self.expand3 = nn.Conv2d(16, 16, 1)
        self.wide = nn.Conv2d(16, 32, 3, padding=1, groups=16)  # (1 in, 2 out)
        self.mix = nn.Conv2d(32, 8, 1)
        self.pw = nn.Conv2d(8, 8, 1)
        self.dw2 = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.shared = nn.Conv2d(8, 8, 1)
        self.dw3 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.strided = nn.Conv2d(8, 8, 1, stride=2)
        self.dw4 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw5 = nn.Conv2d(8, 8, 1)
        self.dw5 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        for conv in self.modules():  # (weights that carry the input through half-pruned layers to the output)
            if isinstance(conv, nn.Conv2d):
                nn.init.normal_(conv.weight, std=2 / conv.weight[0].numel() ** 0.5)
                nn.init.uniform_(conv.bias, -0.05, 0.05)

    def forward(self, x):
        x = F.relu(self.dw(self.expand(x)))
        x = F.silu(self.grouped(F.silu(self.expand2(x))))
        y = self.mix(self.wide(F.gelu(self.expand3(x))))
        y = F.hardswish(self.dw2(F.gelu(self.pw(y))) + y)
        z = self.shared(y)
        z = self.dw3(z) * z  # (shared's output read twice)
        z = self.dw4(self.strided(z))
        return self.dw5(self.pw5(z) + z)  # (pw5 with a residual in its epilogue)


@pytest.mark.parametrize("space", ["sp", "ip"])
def test_a_pointwise_conv_and_the_grouped_conv_that_alone_reads_it_run_as_one_step_with_the_same_numbers(
        tmp_path, monkeypatch, space):
    """program._pointwise_pairs: each 1x1 conv whose output only a grouped conv reads runs inside that conv's
    step (kind "fused"; the 1x1 conv's output never stored), and only those: not where the output is read
    twice, nor after a strided 1x1 conv or one with a residual. The outputs are the generated forward's (the
    convs one after the other) and those of a program without fusion, bit for bit, on batches of one and three
    and on maps whose positions are not a whole number of the kernel's 64-position tiles, and on a map large
    enough for the wider tiles of a 1x1 conv on its own (36x30: 128 positions; the fused step's stay 64) (every
    conv on the native kernel, which the cost model would not pick for most convs this small)."""
    monkeypatch.setattr(order, "_modelled_order", lambda *args, **kwargs: order.ORDER_NATIVE)
    torch.manual_seed(0)
    net = Inverted().eval()
    with torch.no_grad():  # (batch norm statistics away from the identity)
        net.expand[1].running_mean.uniform_(-1, 1), net.expand[1].running_var.uniform_(0.5, 2)
    t = quiet(ipfx.transform, net, space=space, example_inputs=(torch.randn(2, 8, 18, 14),))
    randomize_masks(t, 0.5)
    for weight in (w for w in t.modules() if isinstance(w, ipfx.BasisWeight)):
        weight.mask[::5] = 0  # (output channels that keep nothing: a plane of act(bias), a group not computed)
    frozen = quiet(ipfx.lower, t.eval(), target="fused", freeze=True)
    path = quiet(ipfx.deploy.save_program, frozen, tmp_path / "inverted", torch.randn(2, 8, 18, 14))
    fused, plain = load(path), load(path)
    with torch.inference_mode():
        for shape in [(3, 8, 18, 14), (1, 8, 18, 14), (3, 8, 21, 13), (1, 8, 9, 7), (1, 8, 36, 30)]:
            x = torch.randn(*shape)
            expected = generated(fused, x)
            scale = expected.abs().max()  # (the output shows each sample's input)
            assert len(x) == 1 or (expected[0] - expected[-1]).abs().max() > 0.01 * scale
            assert (generated(fused, x * 2) - expected).abs().max() > 0.01 * scale
            monkeypatch.setattr(program, "FUSE_POINTWISE_GROUPED", True)
            assert torch.equal(fused(x), expected) and torch.equal(fused(x), expected), shape
            kinds = the_program(fused, x).kinds
            assert kinds.count("fused") == 4 and "python" not in kinds, (shape, kinds)  # (expand, expand2, expand3,
            # pw, each with the grouped conv after it)
            monkeypatch.setattr(program, "FUSE_POINTWISE_GROUPED", False)
            assert torch.equal(plain(x), expected), shape
            assert "fused" not in the_program(plain, x).kinds
            assert (expected - frozen(x)).abs().max() <= 1e-4 * (1 + expected.abs().max()), shape
        # the depthwise conv before expand2 run in Python, then made to change its output's size: the fused
        # step of expand2 and its grouped conv was bound for the old size, refuses the new one, and the program
        # is built again
        monkeypatch.setattr(program, "FUSE_POINTWISE_GROUPED", True)
        x = torch.randn(2, 8, 18, 14)
        fused(x)
        fused.dw = _EveryOther(fused.dw)
        assert torch.equal(fused(x), generated(fused, x)) and torch.equal(fused(x), generated(fused, x))
        assert the_program(fused, x).kinds.count("fused") == 3  # (expand's output now goes to a Python step)
        fused.dw.step = 2
        assert torch.equal(fused(x), generated(fused, x)) and fused(x).shape[-2:] == (3, 2)
        assert the_program(fused, x).kinds.count("fused") == 3
