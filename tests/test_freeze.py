"""``ipfx.lower(model, "fused", freeze=True)``: eval-mode batch norms folded into the fused convolutions, a
residual add and an activation in the op's epilogue (ipfx/passes/fold_batch_norm.py, fuse_epilogue.py,
ipfx/ops/epilogue.py). The frozen model must compute the eval-mode function of the original on every input."""

from __future__ import annotations

import copy
import pickle
import inspect
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ipfx
from helpers import assert_close, randomize_masks
from ipfx.capture.modes import graphs_in
from ipfx.errors import IPFXTypeError, IPFXValueError
from ipfx.ops import SparseIPConv, native, program
from ipfx.ops.epilogue import ACTIVATIONS
from test_capture import Encoder

ORDERS = [0, 1, 2, 3] + ([4] if native.available() else [])


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def fused_convs(model: nn.Module) -> list[SparseIPConv]:
    return [m for m in model.modules() if isinstance(m, SparseIPConv)]


def batch_norm_calls(model) -> int:
    graph = model.graph
    return sum(1 for n in graph.nodes if "batch_norm" in str(n.target) or
               (n.op == "call_module" and isinstance(model.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)))


# -- the op's epilogue ------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(activation=st.sampled_from(list(ACTIVATIONS)), order=st.sampled_from(ORDERS), unbatched=st.booleans(),
       residual=st.sampled_from(["none", "same", "channel", "float64"]), identity=st.booleans(),
       size=st.tuples(st.integers(3, 12), st.integers(3, 12)), stride=st.integers(1, 2), seed=st.integers(0, 99))
def test_the_epilogue_is_act_of_conv_plus_residual(activation, order, unbatched, residual, identity, size, stride,
                                                   seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(6, 4, 9, generator=g) * (torch.rand(6, 4, 9, generator=g) < 0.4)
    basis = None if identity else torch.randn(9, 9, generator=g)
    conv = SparseIPConv.from_coefficients(c, basis, torch.randn(6, generator=g), weight_shape=(6, 4, 3, 3),
                                          stride=stride, padding=1)
    conv.activation = activation
    x = torch.randn(2, 4, *size, generator=g)
    weight = conv.to_dense_weight()
    z = F.conv2d(x, weight, conv.bias, stride=stride, padding=1)
    r = {"none": None, "same": torch.randn(z.shape, generator=g), "channel": torch.randn(6, 1, 1, generator=g),
         "float64": torch.randn(z.shape, generator=g, dtype=torch.float64)}[residual]
    expected = ACTIVATIONS[activation][1](z if r is None else z + r)
    if unbatched:
        x, expected = x[0], expected[0]
        r = r[0] if r is not None and r.dim() == 4 else r
    with torch.no_grad():
        eager = conv(x, order, r)
    op = torch.ops.ipfx.ip_conv(x, conv.values, conv.indices, conv.basis, conv.bias, [6, 4, 3, 3], [stride] * 2,
                                [1, 1], [1, 1], 1, False, [0, 0], order, r, activation)
    for got in (eager, op):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert_close(got, expected, kind="epilogue", rtol=1e-5)


def test_the_op_refuses_an_unknown_activation():
    conv = SparseIPConv.from_coefficients(torch.ones(2, 1, 1), weight_shape=(2, 1, 1, 1))
    with pytest.raises(IPFXValueError, match="unknown epilogue activation 'tanh'"):
        torch.ops.ipfx.ip_conv(torch.ones(1, 1, 2, 2), conv.values, conv.indices, None, None, [2, 1, 1, 1], [1, 1],
                               [0, 0], [1, 1], 1, False, [0, 0], 0, None, "tanh")


def test_a_called_fused_module_copies_and_pickles():
    conv = SparseIPConv.from_coefficients(torch.randn(4, 2, 9), torch.randn(9, 9), weight_shape=(4, 2, 3, 3))
    with torch.no_grad():
        conv(torch.randn(1, 2, 6, 6))  # caches a plan (closures)
    buffer = io.BytesIO()
    torch.save(conv, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(1, 2, 6, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), conv(x))


# -- the frozen lowering ----------------------------------------------------------------------------------------
class Block(nn.Module):
    """conv -> bn -> (+ identity) -> activation, in the forms the captured graphs hold them."""

    def __init__(self, activation: str, residual: bool, functional: bool, c: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.act = {"relu": nn.ReLU(), "relu6": nn.ReLU6(), "silu": nn.SiLU(), "gelu": nn.GELU(),
                    "hardswish": nn.Hardswish(), "none": nn.Identity()}[activation]
        self.activation, self.residual, self.functional = activation, residual, functional

    def forward(self, x):
        y = self.conv2(F.relu(self.bn1(self.conv1(x))))
        y = F.batch_norm(y, self.bn2.running_mean, self.bn2.running_var, self.bn2.weight, self.bn2.bias, False,
                         0.1, self.bn2.eps) if self.functional else self.bn2(y)
        if self.residual:
            y = y + x
        return self.act(y)


def calibrated(model: nn.Module, *shape) -> nn.Module:
    """Batch norms with statistics of their own inputs (random ones make the folded scale meaningless)."""
    model.train()
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = None
                nn.init.uniform_(bn.weight, 0.5, 1.5)
                nn.init.uniform_(bn.bias, -0.5, 0.5)
        for _ in range(3):
            model(torch.randn(*shape))
    return model.eval()


def transformed(model: nn.Module, x: torch.Tensor, example: bool, **options) -> nn.Module:
    """``model`` transformed (``options``: ``ipfx.transform``'s) with ``x`` as example input, or without one and
    then called once on ``x``."""
    if example:
        return quiet(ipfx.transform, model, example_inputs=(x,), **options)
    t = quiet(ipfx.transform, model, **options)
    t(x)
    return t


@pytest.mark.parametrize("activation, residual, example", [
    *[(a, r, True) for a in ("relu", "relu6", "silu", "gelu", "hardswish", "none") for r in (True, False)],
    ("relu", True, False), ("silu", False, False),  # captured by symbolic tracing: call_module batch norms
], ids=lambda v: {True: "T", False: "F"}.get(v, v) if isinstance(v, bool) else v)
def test_frozen_blocks_fold_every_batch_norm_and_fuse_the_epilogue(activation, residual, example):
    torch.manual_seed(0)
    model = calibrated(Block(activation, residual, functional=activation == "gelu"), 4, 6, 10, 10)
    x = torch.randn(2, 6, 10, 10)
    t = transformed(model, x, example)
    randomize_masks(t, 0.5)
    t.eval()
    frozen = quiet(ipfx.lower, t, "fused", freeze=True)
    assert not frozen.training and batch_norm_calls(frozen) == 0
    convs = fused_convs(frozen)
    assert len(convs) == 2 and convs[0].activation == "relu"
    assert convs[1].activation == activation
    residual_calls = [n for n in frozen.graph.nodes if n.op == "call_module" and "residual" in n.kwargs]
    assert len(residual_calls) == int(residual)
    # the folded statistics are read by nothing: no attribute read left behind (a getattr chain per call)
    assert [n.target for _, gm in graphs_in(frozen) for n in gm.graph.nodes if n.op == "get_attr" and not n.users] == []
    assert unread_state(frozen) == []  # nor the batch norms' modules (saved, and fetched by an exported program)
    for shape in [(2, 6, 10, 10), (3, 6, 7, 13), (1, 6, 1, 1)]:
        y = torch.randn(*shape)
        with torch.no_grad():
            assert_close(frozen(y), t(y), kind="frozen block")


def unread_state(model: nn.Module) -> list[str]:
    """The state-dict entries of ``model``'s graphs that no node of them calls or reads."""
    unread = []
    for _, gm in graphs_in(model):
        used = [(n.target, n.op == "call_module") for n in gm.graph.nodes if n.op in ("get_attr", "call_module")]
        unread += [key for key in gm.state_dict()
                   if not any(key == t or (module and key.startswith(t + ".")) for t, module in used)]
    return unread


class Guarded(nn.Module):
    """Chains the passes must leave alone: an in-place write into the residual between the convolution and
    the add, an add with alpha, a convolution read twice, a batch norm without running statistics."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        r = x * 1.0
        y = self.a(x)
        r.mul_(2.0)  # the residual changes after the convolution: the add must see the new value
        y = F.relu(y + r)
        z = torch.add(self.b(y), y, alpha=0.5).relu()
        w = self.c(z)
        v = F.relu(w) + w  # the convolution's output read twice
        return F.relu(self.bn(self.d(v)))


@pytest.mark.parametrize("example", [True, False], ids=["example-inputs", "no-example"])
def test_freezing_leaves_what_it_cannot_fold_and_stays_exact(example):
    torch.manual_seed(1)
    model = Guarded().eval()
    x = torch.randn(2, 4, 8, 8)
    t = transformed(model, x, example)
    frozen = quiet(ipfx.lower, t, "fused", freeze=True)
    by_name = dict(frozen.named_modules())
    assert by_name["b"].activation == "none" and by_name["c"].activation == "none"
    assert batch_norm_calls(frozen) == 1  # batch statistics: not foldable
    for shape in [(2, 4, 8, 8), (1, 4, 5, 9)]:
        y = torch.randn(*shape)
        with torch.no_grad():
            assert_close(frozen(y), model(y), kind="frozen, guarded chains")


class Aliased(nn.Module):
    """Chains whose fusion would change what the model computes: a write into the convolution's input through
    a view, after the convolution and before the add (moved to the add, the convolution would read the new
    value); an in-place add of a wider residual (``w.add_(r)`` keeps ``w``'s dtype, the op's ``+`` would
    promote); and one that may fuse: an in-place add of a residual of the output's shape and dtype."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))

    def forward(self, x, wide):
        x = x * 1.0
        y = self.a(x)
        x.view(-1).mul_(2.0)
        z = F.relu(y + x)
        w = self.b(z)
        w.add_(wide)
        v = self.c(w)
        v.add_(z)
        return F.relu(v)


@pytest.mark.parametrize("example", [True, False], ids=["example-inputs", "no-example"])
def test_the_epilogue_keeps_in_place_writes_and_their_dtypes(example):
    torch.manual_seed(2)
    model = Aliased().eval()
    args = (torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8, dtype=torch.float64))
    t = quiet(ipfx.transform, model, **({"example_inputs": args} if example else {}))
    t(*args)
    frozen = quiet(ipfx.lower, t, "fused", freeze=True)
    by_name = dict(frozen.named_modules())
    assert by_name["a"].activation == "none" and by_name["b"].activation == "none"
    # c's in-place add of z fuses where torch.export recorded both (symbolic tracing records no shapes)
    fused_c = [n for n in frozen.graph.nodes if n.op == "call_module" and n.target == "c" and "residual" in n.kwargs]
    assert by_name["c"].activation == ("relu" if example else "none") and len(fused_c) == int(example)
    for shape in [(2, 4, 8, 8), (1, 4, 5, 9)]:
        x, wide = torch.randn(*shape), torch.randn(*shape, dtype=torch.float64)
        with torch.no_grad():
            expected, got = model(x.clone(), wide), frozen(x.clone(), wide)
        assert got.dtype == expected.dtype == torch.float32
        assert_close(got, expected, kind="frozen, in-place writes")
    # w.add_ of a larger residual raises, and so does the frozen model (or torch.export's guard refuses first)
    with pytest.raises((RuntimeError, AssertionError), match="broadcast shape|ipfx shape guard"):
        frozen(torch.randn(1, 4, 8, 8), torch.randn(3, 4, 8, 8, dtype=torch.float64))


class NormAct(nn.BatchNorm2d):
    """A batch norm that does more than normalise (as timm's ``BatchNormAct2d``), kept whole by the symbolic
    trace: its statistics alone do not describe it, so it must not be folded as one."""

    def forward(self, x):
        return F.hardswish(super().forward(x)) * 2.0


@pytest.mark.parametrize("example", [True, False], ids=["example-inputs", "no-example"])
def test_a_batch_norm_subclass_with_its_own_forward_keeps_it(example):
    torch.manual_seed(3)
    model = calibrated(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), NormAct(6), nn.Conv2d(6, 4, 1)), 4, 3, 9, 9)
    t = transformed(model, torch.randn(2, 3, 9, 9), example)
    frozen = quiet(ipfx.lower, t, "fused", freeze=True)
    for shape in [(2, 3, 9, 9), (1, 3, 6, 11)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            assert_close(frozen(x), model(x), kind="frozen, batch norm subclass")


class ModalEncoder(Encoder):
    """test_capture's encoder (attributes, a property and a method that untraced code reads) with one graph per
    training mode: a part captured as a ``ModeSwitch``."""

    def forward(self, x):
        y = self.conv(x)
        return y * 2.0 if self.training else y


class ModalSegmenter(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = ModalEncoder()

    def forward(self, x):
        if x.sum() > -1e9:  # untraceable root: the encoder is replaced by its graphs
            x = self.encoder(x)
        return x * self.encoder.output_stride + self.encoder.out_channels_for(1)


def test_the_frozen_form_keeps_what_a_replaced_part_answered_for():
    torch.manual_seed(4)
    model, x = ModalSegmenter().eval(), torch.randn(2, 3, 6, 6)
    t = quiet(ipfx.transform, model, capture="symbolic")
    assert type(t.encoder).__name__ == "ModeSwitch"
    frozen = quiet(ipfx.lower, t, "fused", freeze=True)  # the switch gives way to its eval-mode graph
    assert frozen.encoder.output_stride == 8 and frozen.encoder.out_channels_for(2) == 8
    assert frozen.encoder._depth == 3
    with torch.no_grad():
        assert_close(frozen(x), model(x), kind="frozen, a replaced part's attributes")
    assert copy.deepcopy(frozen).encoder.output_stride == 8


@pytest.mark.parametrize("example", [True, False], ids=["export", "symbolic"])
def test_the_frozen_form_refuses_train_mode(example):
    """A frozen model computes the eval-mode function only: ``.train()`` raises (as a loaded program's does)
    instead of leaving a model that computes eval mode while it says train, copies included; ``.eval()`` works."""
    torch.manual_seed(0)
    model, x = calibrated(Block("relu", True, False), 4, 6, 6, 6), torch.randn(2, 6, 6, 6)
    frozen = quiet(ipfx.lower, transformed(model, x, example), "fused", freeze=True)
    for result in (frozen, copy.deepcopy(frozen), pickle.loads(pickle.dumps(frozen))):  # (pickles too)
        assert result.eval() is result and not result.training
        with pytest.raises(IPFXValueError, match="lowered with freeze=True.*lower without freeze"):
            result.train()
        assert not result.training
        with torch.no_grad():
            assert_close(result(x), model(x), kind="frozen, after a refused train()")
    assert ipfx.lower(transformed(model, x, example), "fused").train().training  # not frozen: trains
    t = quiet(ipfx.transform, ModalSegmenter().eval(), capture="symbolic")
    with pytest.raises(IPFXValueError, match="freeze=True"):  # a frozen graph inside the user's own class
        quiet(ipfx.lower, t, "fused", freeze=True).train()


def test_freeze_checks_its_arguments():
    t = ipfx.transform(nn.Sequential(nn.Conv2d(1, 2, 3)), example_inputs=(torch.randn(1, 1, 5, 5),))
    with pytest.raises(IPFXValueError, match="use it with target='fused'"):
        ipfx.lower(t, "dense", freeze=True)
    with pytest.raises(IPFXTypeError, match="freeze must be True or False"):
        ipfx.lower(t, "fused", freeze="yes")


@pytest.mark.parametrize("name", ["resnet18", pytest.param("mobilenet_v3_small", marks=pytest.mark.slow)])
def test_frozen_torchvision_models_compute_the_eval_function(name):
    torch.manual_seed(0)
    model = calibrated(getattr(torchvision.models, name)(num_classes=10), 4, 3, 64, 64)
    x = torch.randn(1, 3, 64, 64)
    t = quiet(ipfx.transform, model, example_inputs=(x,))
    randomize_masks(t, 0.2)  # (global magnitude pruning empties mobilenet's small-initialised classifier)
    t.eval()
    frozen = quiet(ipfx.lower, t, "fused", freeze=True)
    assert batch_norm_calls(frozen) == 0 and unread_state(frozen) == []
    convs = fused_convs(frozen)
    with_act = sum(c.activation != "none" for c in convs)
    assert with_act >= {"resnet18": 17, "mobilenet_v3_small": 30}[name], with_act
    for shape in [(1, 3, 64, 64), (2, 3, 72, 56)]:
        y = torch.randn(*shape)
        with torch.no_grad():
            expected = t(y)
            assert expected.abs().max() > 1e-3  # an output that says something
            assert_close(frozen(y), expected, kind=f"frozen {name}", rtol=1e-4)
    # the deployment file (save_program, deploy.load): test_the_readme_deployment_block_runs


@pytest.mark.slow  # 138 s for the eight models, both capture paths
@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny",
                                  "regnet_y_400mf", "resnext50_32x4d", "mnasnet0_5", "shufflenet_v2_x1_0"])
@pytest.mark.parametrize("example", [True, False], ids=["example-inputs", "no-example"])
def test_fused_sp_lowering_of_grouped_and_depthwise_models(name, example, tmp_path):
    """The native kernel's grouped/depthwise direct path and its squeeze-excitation product, end to end: SP
    models full of grouped, depthwise and 1x1-map convs, pruned, lowered to the fused form with and without
    freeze, compute the transformed model's function on the captured shape and another batch and size; so
    does the frozen form saved and loaded, whose native program runs 1x1 convs inside the grouped convs that
    alone read them (ipfx.ops.program._pointwise_pairs) with the numbers of the per-op forward."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    with torch.no_grad():  # unit-std weights: global magnitude pruning then leaves every layer some weights
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.div_(m.weight.std().clamp_min(1e-12))
    model = calibrated(model, 4, 3, 96, 96)
    t = transformed(model, torch.randn(1, 3, 96, 96), example, space="sp")
    quiet(ipfx.prune, t, "magnitude", 0.9)
    t.eval()
    for freeze in (False, True):
        fused = quiet(ipfx.lower, t, "fused", freeze=freeze)
        for shape in [(1, 3, 96, 96), (3, 3, 64, 80)]:
            y = torch.randn(*shape)
            with torch.no_grad():
                expected = t(y)
                assert expected.std() > 1e-2  # an output that says something
                assert_close(fused(y), expected, kind=f"fused {name} freeze={freeze}", rtol=1e-4)
    if not native.available():
        return
    loaded = quiet(ipfx.deploy.load_module, quiet(ipfx.deploy.save_program, fused, tmp_path / name,
                                                  torch.randn(2, 3, 96, 96)))
    pairs = 0
    for shape in [(1, 3, 96, 96), (3, 3, 64, 80)]:
        y = torch.randn(*shape)
        with torch.inference_mode():
            expected, by_op = t(y), type(loaded).forward.__wrapped__(loaded, y)
            got = loaded(y)
            assert torch.equal(loaded(y), got) and torch.equal(got, by_op), shape  # (built, then run)
            assert_close(got, expected, kind=f"loaded {name}", rtol=1e-4)
            pairs += program.programs_of(loaded)[program._signature([y])].kinds.count("fused")
    assert (pairs > 0) == (name != "convnext_tiny"), pairs  # (convnext: depthwise, then 1x1 convs)


def test_the_readme_deployment_block_runs(tmp_path, monkeypatch):
    """README, "Which form to deploy": the block as written, on a small transformed model."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("**Which form to deploy.**"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    model = calibrated(torchvision.models.resnet18(num_classes=10), 4, 3, 64, 64)
    ip = quiet(ipfx.transform, model, example_inputs=(torch.randn(2, 3, 64, 64),))
    randomize_masks(ip, 0.1)
    images = torch.randn(3, 3, 64, 64)
    monkeypatch.chdir(tmp_path)
    scope = {"ipfx": ipfx, "torch": torch, "ip": ip, "images": images}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(block.replace("224, 224", "64, 64"), scope)
    assert (tmp_path / "net.pt2").exists()
    program = scope["program"]
    assert len(fused_convs(program)) == 20  # the fused op, run by its module (not a dense conv)
    assert not any("batch_norm" in str(n.target) for n in program.graph.nodes)  # folded
    with torch.no_grad():
        assert_close(scope["y"], ip.eval()(images), kind="README deployment block", rtol=1e-4)


def _op_calls(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("ipfx.")]


@pytest.mark.parametrize("activation, residual", [("relu", True), ("hardswish", False)])
def test_a_loaded_program_runs_its_fused_op_calls_as_modules(tmp_path, activation, residual):
    """deploy.load_module: every fused op call on the program's tensors becomes a call of the module holding
    them, with the same state dict, the same numbers on other shapes and the program's own input checks; a
    call whose tensors something else reads too stays an op call, and says why."""
    from ipfx.passes.fused_modules import FusedOpsAsModules
    from ipfx.passes.manager import PassManager

    torch.manual_seed(4)
    model = calibrated(Block(activation, residual, functional=False), 4, 6, 10, 10)
    x = torch.randn(2, 6, 10, 10)
    t = transformed(model, x, True)
    randomize_masks(t, 0.5)
    frozen = quiet(ipfx.lower, t.eval(), "fused", freeze=True)
    quiet(ipfx.deploy.save_program, frozen, tmp_path / "net", x)
    plain = ipfx.deploy.load(tmp_path / "net.pt2").module()
    loaded = ipfx.deploy.load_module(tmp_path / "net.pt2")
    assert len(_op_calls(plain)) == 2 and _op_calls(loaded) == []
    assert len(fused_convs(loaded)) == 2 and [c.activation for c in fused_convs(loaded)] == ["relu", activation]
    assert not any(n.op == "get_attr" for n in loaded.graph.nodes)
    assert plain.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in plain.state_dict().items())
    for shape in [(2, 6, 10, 10), (3, 6, 7, 13), (1, 6, 1, 1)]:
        y = torch.randn(*shape)
        with torch.no_grad():
            assert torch.equal(loaded(y), plain(y))
            assert_close(loaded(y), frozen(y), kind="load_module", rtol=1e-5)
    with pytest.raises(AssertionError, match=r"x.size\(\)\[1\] == 6"):  # the program's own check of a fixed size
        loaded(torch.randn(2, 5, 10, 10))

    shared = ipfx.deploy.load(tmp_path / "net.pt2").module()  # a crafted program: one call's values read twice
    first = _op_calls(shared)[0]
    with shared.graph.inserting_after(first.args[1]):
        shared.graph.call_function(torch.ops.aten.sum.default, (first.args[1],))
    shared.recompile()
    passes = PassManager([FusedOpsAsModules()], sites=lambda m: [(m, {})])
    passes(shared)
    assert _op_calls(shared) == [first] and len(fused_convs(shared)) == 1
    assert "read by it alone" in next(iter(passes.skipped().values()))
    with torch.no_grad():
        assert torch.equal(shared(x), plain(x))
    with pytest.raises(IPFXValueError, match="not a torch.export program"):
        ipfx.deploy.load_module(tmp_path / "net.state_dict.pt")


class Scaled(nn.Module):
    """A forward with an optional argument: its graph is guarded, with a fallback for the other pattern."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)

    def forward(self, x, scale=None):
        y = F.relu(self.bn(self.conv(x)))
        return y if scale is None else y * scale


@pytest.mark.parametrize("example", [True, False], ids=["example-inputs", "no-example"])
def test_the_frozen_form_keeps_no_dense_fallback(example):
    """The fallback of a guarded graph holds every weight folded dense; the frozen form drops it, keeps the
    captured signature (through copies and pickles), and refuses a call of another pattern, saying why."""
    torch.manual_seed(2)
    model = calibrated(Scaled(), 4, 32, 8, 8)
    x = torch.randn(2, 32, 8, 8)
    t = transformed(model, x, example)
    randomize_masks(t, 0.9)
    t.eval()
    fused = quiet(ipfx.lower, t, "fused")
    frozen = quiet(ipfx.lower, t, "fused", freeze=True)

    pickled = lambda m: len(_saved(m))  # noqa: E731
    dense_bytes = model.conv.weight.numel() * 4
    assert pickled(fused) > dense_bytes  # lowered without freeze: the fallback's dense copy is kept
    assert pickled(frozen) < pickled(fused) - dense_bytes // 2
    with torch.no_grad():
        assert_close(frozen(x), t(x), kind="frozen, no fallback")
        assert_close(fused(x, torch.tensor(2.0)), t(x, torch.tensor(2.0)), kind="fused, fallback")
        for m in (frozen, copy.deepcopy(frozen)):
            assert list(inspect.signature(m.forward).parameters) == ["x", "scale"]
            with pytest.raises(RuntimeError, match="freeze=True"):
                m(x, torch.tensor(2.0))
        # a pickled frozen graph keeps what it was (it unpickles through ipfx, as its fused ops run through it)
        with pytest.raises(RuntimeError, match="freeze=True"):
            torch.load(io.BytesIO(_saved(frozen)), weights_only=False)(x, torch.tensor(2.0))


def _saved(m) -> bytes:
    buffer = io.BytesIO()
    torch.save(m, buffer)
    return buffer.getvalue()
