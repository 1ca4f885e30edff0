"""Models whose forward depends on ``self.training``: one graph per mode (``ipfx.ModeSwitch``).

Auxiliary heads, ``F.dropout(training=self.training)`` and stochastic depth are fixed by a torch.fx trace;
ipfx traces both modes and switches, so the transformed and lowered models compute what the original
computes in *both* modes, whichever mode it was transformed in, and no weight is lost.
"""

import copy
import io
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.ops import StochasticDepth

import ipfx
from helpers import assert_close, randomize_masks


class AuxNet(nn.Module):
    """An auxiliary head run only in training, and functional dropout: a plain trace differs per mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.aux = nn.Sequential(nn.Conv2d(8, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
        self.depth = StochasticDepth(0.5, "row")
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = x + self.depth(self.block(x))
        x = F.dropout(x, 0.3, training=self.training)
        out = self.fc(x.mean((2, 3)))
        if self.training:
            return out, self.aux(x)
        return out


def seeded(model, x, seed=0):
    torch.manual_seed(seed)
    return model(x)


def assert_same_in_both_modes(a, b, x, kind):
    """Outputs equal in train mode (same random draws) and in eval mode; ``a`` and ``b`` end in eval mode."""
    for mode in (True, False):
        a.train(mode), b.train(mode)
        ya, yb = seeded(a, x), seeded(b, x)
        ya, yb = (ya if isinstance(ya, tuple) else (ya,)), (yb if isinstance(yb, tuple) else (yb,))
        assert len(ya) == len(yb)
        for u, v in zip(ya, yb):
            assert_close(v, u, kind=f"{kind} ({'train' if mode else 'eval'})")


@pytest.fixture
def net():
    torch.manual_seed(0)
    return AuxNet().eval(), torch.randn(4, 3, 8, 8)


@pytest.mark.parametrize("mode", [False, True], ids=["transformed in eval", "transformed in train"])
def test_both_modes_are_preserved_and_every_weight_is_rewritten(net, mode):
    model, x = net
    model.train(mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left dense, nothing to warn about
        t = ipfx.transform(model)
    assert isinstance(t, ipfx.ModeSwitch) and t.training == mode
    assert {w.name for w in ipfx.rewritten_weights(t)} == {
        n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() >= 2}
    reference = copy.deepcopy(model)  # batch norm statistics move alike in both from here
    assert_same_in_both_modes(reference, t, x, "modes: transform")
    t.train()
    assert all(m.training for m in t.modules()), "train() reaches every shared module"


def test_the_switch_has_the_original_names_and_one_copy_of_each_tensor(net):
    model, _ = net
    t = ipfx.transform(model)
    expected = set()
    for name, tensor in model.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        if leaf != "weight" or tensor.dim() < 2:  # batch norm, biases, buffers: unchanged
            expected.add(name)
            continue
        expected |= {f"{prefix}.coeff", f"{prefix}.mask"}
        if tensor[0, 0].numel() > 1:  # a kernel with K > 1 has a basis
            expected.add(f"{prefix}.basis")
    assert set(t.state_dict()) == expected
    train, eval_ = t.graph_module(True), t.graph_module(False)
    assert train.graph is not eval_.graph
    # one tree: a path names the same object whichever graph module it is reached from
    for name, p in t.named_parameters():
        for gm in (train, eval_):
            prefix, _, leaf = name.rpartition(".")
            assert getattr(gm.get_submodule(prefix), leaf) is p
    assert len(list(t.parameters())) == len({id(p) for p in t.parameters()})
    assert not any(isinstance(m, fx.GraphModule) for m in t.modules()), "graphs are not child modules"


def test_pruning_and_training_act_on_both_modes(net):
    model, x = net
    t = ipfx.transform(model)
    ipfx.prune(t, "random", 0.7)
    assert ipfx.sparsity(t) == pytest.approx(0.7, abs=0.01)
    t.train()
    out, aux = seeded(t, x)
    (out.square().mean() + aux.square().mean()).backward()
    for w in ipfx.rewritten_weights(t):
        m = t.get_submodule(w.prefix)
        assert m.coeff.grad is not None, f"{w.name}: no gradient in train mode"
        assert not m.coeff.grad[m.mask == 0].any(), f"{w.name}: masked coefficients got a gradient"
    # the eval graph reads the same (pruned) coefficients: both lowerings of both modes agree
    dense = ipfx.lower(t, "dense")
    assert_same_in_both_modes(t, dense, x, "modes: pruned, dense")


@pytest.mark.parametrize("target", ["dense", "fused"])
def test_lowering_keeps_both_modes(net, target):
    model, x = net
    t = ipfx.transform(model)
    randomize_masks(t, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fused: the aux head's flattened linear is fine
        lowered = ipfx.lower(t, target)
    assert isinstance(lowered, ipfx.ModeSwitch)
    assert not any(isinstance(m, ipfx.BasisWeight) for m in lowered.modules())
    assert_same_in_both_modes(t, lowered, x, f"modes: lower {target}")


def test_dense_lowering_loads_into_the_original_architecture(net):
    """Deployment without ipfx: the dense state dict is the original model's, in both modes."""
    model, x = net
    t = ipfx.transform(model)
    randomize_masks(t, 0.5)
    dense = ipfx.lower(t, "dense")
    plain = AuxNet()
    plain.load_state_dict(dense.state_dict(), strict=True)
    assert_same_in_both_modes(dense, plain, x, "modes: dense in the original class")
    # the eval graph module alone is a plain GraphModule: saved and loaded without any ipfx class
    gm = dense.eval().graph_module(False)
    assert not any(type(m).__module__.startswith("ipfx") for m in gm.modules())
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    assert_close(torch.load(buffer, weights_only=False)(x), plain.eval()(x), kind="modes: saved eval graph")


def test_copies_and_saved_modules_keep_both_modes_and_one_tree(net):
    model, x = net
    t = ipfx.transform(model)
    randomize_masks(t, 0.5)
    buffer = io.BytesIO()
    torch.save(t, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for copied in (copy.deepcopy(t), loaded):
        copied.to(torch.float64)  # before any forward: the switch ties its graphs' modules back when run
        reference = copy.deepcopy(t).double()  # (train mode moves batch norm statistics)
        assert_same_in_both_modes(reference, copied, x.double(), "modes: copy")
        # pruning the copy changes both of its modes and nothing of the original
        ipfx.prune(copied, "magnitude", 0.9)
        kept = copied.get_submodule("aux.3").mask.clone()
        for mode in (True, False):
            gm = copied.graph_module(mode)
            assert gm.get_submodule("conv") is copied.conv
        assert torch.equal(copied.graph_module(False).get_submodule("aux.3").mask, kept)
        assert ipfx.sparsity(t) == pytest.approx(0.5, abs=0.05)


def test_a_module_that_caches_state_in_forward_is_traced_cleanly():
    """Like torchvision's MultiScaleRoIAlign: the first call stores something on the module."""

    class Cache(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.scale = None

        def forward(self, x):
            if self.scale is None:
                self.scale = x.shape[-1] // 2
            y = self.conv(x) * self.scale
            return F.dropout(y, 0.5, training=self.training)

    model = Cache().eval()
    x = torch.randn(1, 2, 4, 4)
    t = ipfx.transform(model, inplace=True)
    assert model.scale is None, "tracing left a proxy on the user's module"
    assert isinstance(t, ipfx.ModeSwitch)
    assert_same_in_both_modes(model, t, x, "modes: cache")


def test_a_mode_dependent_part_of_a_partially_traced_model():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = AuxNet()

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent control flow: the root stays Python
                return None
            return self.body(x)

    torch.manual_seed(0)
    model = Untraceable().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="as a whole"):
        t = ipfx.transform(model)
    assert isinstance(t.body, ipfx.ModeSwitch)
    randomize_masks(t, 0.5)
    for target in ("dense", "fused"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            lowered = ipfx.lower(t, target)
        assert isinstance(lowered.body, ipfx.ModeSwitch)
        assert_same_in_both_modes(t, lowered, x, f"modes: partial, {target}")


def test_models_whose_graph_does_not_depend_on_the_mode_stay_one_graph_module():
    model = torchvision.models.resnet18(weights=None).eval()
    assert isinstance(ipfx.transform(model), fx.GraphModule)


@pytest.mark.parametrize("name", ["googlenet", "efficientnet_b0"])
def test_torchvision_models_with_aux_heads_and_stochastic_depth(name):
    torch.manual_seed(0)
    kwargs = {"aux_logits": True, "init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    t = ipfx.transform(model)
    assert isinstance(t, ipfx.ModeSwitch)
    expected = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {w.name for w in ipfx.rewritten_weights(t)} == expected  # googlenet: aux1, aux2 included
    reference = copy.deepcopy(model)
    assert_same_in_both_modes(reference, t, x, f"modes: {name}")
    dense = ipfx.lower(t, "dense")
    plain = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    plain.load_state_dict(dense.state_dict(), strict=True)
    assert_same_in_both_modes(plain, dense, x, f"modes: {name} dense")


def test_torch_compile_and_export_of_a_switch(net):
    model, x = net
    t = ipfx.transform(model)
    randomize_masks(t, 0.5)
    reference = copy.deepcopy(t)
    compiled = torch.compile(t, backend="aot_eager")
    for mode in (True, False):  # the compiled switch follows .train()/.eval() like the eager one
        t.train(mode), reference.train(mode)
        got, want = seeded(compiled, x), seeded(reference, x)
        for u, v in zip(got if mode else (got,), want if mode else (want,)):
            assert_close(u, v, kind="modes: torch.compile")
    t.train()
    out, aux = compiled(x)
    aux.sum().backward()
    head = t.get_submodule("aux.3")
    assert head.coeff.grad is not None and not head.coeff.grad[head.mask == 0].any()
    exported = torch.export.export(reference.eval(), (x,))
    assert_close(exported.module()(x), reference(x), kind="modes: torch.export")


def test_constants_created_in_forward_keep_their_values_in_each_mode():
    """Each trace numbers its constants (``_tensor_constant0``, ...) on its own: the same name may stand
    for different tensors in the two graphs."""

    class Constants(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            if self.training:
                x = x * torch.tensor(2.0)
            return self.conv(x) + torch.tensor(3.0)

    model = Constants().eval()
    x = torch.randn(1, 2, 5, 5)
    t = ipfx.transform(model)
    assert isinstance(t, ipfx.ModeSwitch)
    assert_same_in_both_modes(model, t, x, "modes: constants")
    for target in ("dense", "fused"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            assert_same_in_both_modes(model, ipfx.lower(t, target), x, f"modes: constants, {target}")


def test_a_forward_traceable_in_one_mode_only_keeps_that_graph_and_says_so():
    class TrainOnlyControlFlow(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            if self.training and x.sum() > 0:  # data-dependent, but only reached in train mode
                x = -x
            return self.conv(x)

    model = TrainOnlyControlFlow().eval()
    x = torch.randn(1, 2, 5, 5)
    with pytest.warns(UserWarning, match="in eval mode only"):
        t = ipfx.transform(model)
    assert isinstance(t, fx.GraphModule)
    assert_close(t(x), model(x), kind="modes: one mode")


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_of_a_lowered_switch_in_eval_mode(net, dynamo):
    """Exporters trace one mode: the eval graph of the dense lowering, with plain Conv nodes."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    model, x = net
    t = ipfx.transform(model)
    randomize_masks(t, 0.5)
    dense = ipfx.lower(t, "dense").eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated
        torch.onnx.export(dense, (x,), buffer, dynamo=dynamo, verbose=False)
    proto = onnx.load_from_string(buffer.getvalue())
    assert [n.op_type for n in proto.graph.node].count("Conv") == 2  # the aux head runs in training only
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert_close(torch.from_numpy(y), dense(x), kind="modes: onnx")


def test_a_mode_switch_is_a_module_like_any_other_for_apply(net):
    model, x = net
    t = ipfx.transform(model)
    seen = []
    assert t.apply(lambda m: seen.append(m)) is t  # nn.Module.apply: every module, then the switch itself
    assert seen[-1] is t and sum(isinstance(m, ipfx.BasisWeight) for m in seen) == len(ipfx.rewritten_weights(t))
