"""Each pass on its own, on hand-built graphs: it fires, it must not fire, it is idempotent."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import ipfx
from helpers import assert_close, randomize_masks
from ipfx.form.compose import compose_weight, emit_compose
from ipfx.config import TransformConfig
from ipfx.passes.kernels import kernel_call
from ipfx.capture.partial import Part, TraceReport
from ipfx.capture.pipeline import Captured
from ipfx.passes.lower_dense import LowerDense
from ipfx.passes.manager import GraphPass, Pass, PassManager, PassResult
from ipfx.passes.parametrize_unreached import ParametrizeUnreached
from ipfx.passes.rewrite_weights import CoefficientFactory, RewriteWeights
from ipfx.passes.subgraphs import compose_subgraphs

aten = torch.ops.aten


def aten_conv_graph(op=aten.conv2d.default, extra=(), weight_from_input=False) -> fx.GraphModule:
    """x -> op(x, W, b, *extra) with W, b parameters of a container module ``conv`` (as export gives)."""
    root = nn.Module()
    root.conv = nn.Module()
    torch.manual_seed(0)
    root.conv.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
    root.conv.bias = nn.Parameter(torch.randn(4))
    graph = fx.Graph()
    x = graph.placeholder("x")
    w = graph.call_function(aten.mul.Tensor, (graph.placeholder("k"), 1.0)) if weight_from_input \
        else graph.get_attr("conv.weight")
    b = graph.get_attr("conv.bias")
    graph.output(graph.call_function(op, (x, w, b, *extra)))
    return fx.GraphModule(root, graph)


# -- the kernel-call normaliser ---------------------------------------------------------------------------------
@pytest.mark.parametrize("op, extra, kind, dims", [
    (aten.conv2d.default, ([2, 2], [1, 1], [1, 1], 1), "conv", 2),
    (aten.convolution.default, ([1, 1], [0, 0], [1, 1], False, [0, 0], 1), "conv", 2),
    (aten.convolution.default, ([2, 2], [0, 0], [1, 1], True, [1, 1], 1), "conv_transpose", 2),
    (aten.conv_transpose2d.input, ([1, 1], [0, 0], [0, 0], 1, [1, 1]), "conv_transpose", 2),
    (torch.conv2d, (1, 0, 1, 1), "conv", 2),
])
def test_kernel_calls_of_every_dialect_normalise_alike(op, extra, kind, dims):
    gm = aten_conv_graph(op, extra)
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    call = kernel_call(node)
    assert (call.kind, call.dims) == (kind, dims)
    assert call.weight.target == "conv.weight" and call.bias.target == "conv.bias"
    assert set(call.arguments) >= {"stride", "padding", "dilation", "groups"}
    if kind == "conv_transpose":
        assert "output_padding" in call.arguments and "transposed" not in call.arguments


def test_addmm_over_a_transposed_weight_is_a_linear_call_that_is_not_fusable():
    graph = fx.Graph()
    x, w, b = graph.placeholder("x"), graph.placeholder("w"), graph.placeholder("b")
    node = graph.call_function(aten.addmm.default, (b, x, graph.call_function(aten.t.default, (w,))))
    call = kernel_call(node)
    assert call.kind == "linear" and call.weight_transposed and call.input is x
    assert kernel_call(graph.call_function(aten.relu.default, (x,))) is None


# -- the rewrite ---------------------------------------------------------------------------------------------
def run_graph_pass(graph_pass, gm, **where) -> PassResult:
    """One graph pass on one graph, as the manager runs it (lint and recompile included)."""
    manager = PassManager([graph_pass], sites=lambda _: [(gm, where)])
    manager(gm)
    return manager.results[0][1]


def rewrite(gm, config=TransformConfig()):
    owners = {"conv": nn.Conv2d(3, 4, 3)}  # the type the config filters by
    return run_graph_pass(RewriteWeights(config, CoefficientFactory(config)), gm, owners=owners)


def test_rewrite_fires_on_an_aten_graph_and_preserves_it():
    gm = aten_conv_graph()
    x = torch.randn(2, 3, 6, 6)
    expected = gm(x)
    result = rewrite(gm)
    assert result.modified and isinstance(gm.conv, ipfx.BasisWeight)
    assert not any(n.op == "get_attr" and n.target == "conv.weight" for n in gm.graph.nodes)
    assert_close(gm(x), expected, kind="pass: rewrite aten graph")
    (sub,) = compose_subgraphs(gm)
    assert [n.target for n in sub.nodes if n.op == "call_function"] == [torch.mul, torch.matmul, torch.reshape]


def test_rewrite_does_not_fire_where_it_must_not():
    gm = aten_conv_graph(weight_from_input=True)  # the kernel is computed from an input
    assert not rewrite(gm).modified
    gm = aten_conv_graph()
    assert not rewrite(gm, TransformConfig(exclude=["conv.*"])).modified  # excluded by the config
    assert isinstance(gm.conv.weight, nn.Parameter)


def test_rewrite_is_idempotent():
    gm = aten_conv_graph()
    assert rewrite(gm).modified
    code = gm.code
    assert not rewrite(gm).modified  # nothing left to rewrite
    assert gm.code == code


def test_one_compose_definition_in_graph_and_eager_form():
    torch.manual_seed(0)
    coeff, mask, basis = torch.randn(4, 3, 9), (torch.rand(4, 3, 9) > 0.5).float(), torch.randn(9, 9)
    root = nn.Module()
    root.w = nn.Module()
    root.w.coeff, root.w.basis = nn.Parameter(coeff), nn.Parameter(basis)
    root.w.register_buffer("mask", mask)
    for multiplies in (True, False):
        graph = fx.Graph()
        graph.output(emit_compose(graph, "w", multiplies, True, (4, 3, 3, 3)))
        eager = compose_weight(coeff, mask, basis, (4, 3, 3, 3), multiplies)
        assert torch.equal(fx.GraphModule(root, graph)(), eager)
    assert torch.equal(compose_weight(coeff, mask, basis, None, False), coeff * mask)


# -- parametrize unreached weights ---------------------------------------------------------------------------------
class Untraced(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def captured_as_python(model, config=TransformConfig()):
    report = TraceReport()
    return Captured(model, [], report, dict(model.named_modules()), "symbolic"), ParametrizeUnreached(
        config, CoefficientFactory(config))


def test_parametrize_fires_on_untraced_weights_and_preserves_outputs():
    model, x = Untraced(), torch.randn(2, 3, 5, 5)
    expected = model(x)
    captured, p = captured_as_python(model)
    assert p.run(captured).changed == ["conv.weight", "fc.weight"]
    assert isinstance(model.conv, ipfx.BasisWeight) and isinstance(model.conv, nn.Conv2d)
    assert "weight" not in model.conv._parameters and {"conv.coeff", "conv.mask", "conv.basis"} <= set(model.state_dict())
    assert_close(model(x), expected, kind="pass: parametrize")
    randomize_masks(model, 0.5)
    assert torch.equal(model.conv.weight, model.conv.compose())


def test_parametrize_does_not_fire_on_excluded_weights_and_is_idempotent():
    model = Untraced()
    captured, p = captured_as_python(model, TransformConfig(exclude=["fc.*"]))
    assert p.run(captured).changed == ["conv.weight"]
    assert isinstance(model.fc.weight, nn.Parameter)  # the config said so
    assert not p.run(captured).modified  # idempotent


def test_parametrized_modules_copy_pickle_and_lower():
    import io

    model, x = Untraced(), torch.randn(2, 3, 5, 5)
    captured, p = captured_as_python(model)
    p.run(captured)
    randomize_masks(model, 0.5)
    y = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert_close(loaded(x), y, kind="pass: parametrized pickle")
    assert_close(copy.deepcopy(model)(x), y, kind="pass: parametrized deepcopy")
    lowered = ipfx.lower(model)
    assert type(lowered.conv) is nn.Conv2d and isinstance(lowered.conv.weight, nn.Parameter)
    assert not {"space", "weight_shape", "kind", "_ipfx_copied"} & set(vars(lowered.conv))  # nothing of the form left
    Untraced().load_state_dict(lowered.state_dict(), strict=True)
    assert_close(lowered(x), y, kind="pass: parametrized lowered")


# -- lowering and the manager ----------------------------------------------------------------------------------
def test_lower_dense_fires_once_and_is_idempotent():
    gm = aten_conv_graph()
    rewrite(gm)
    x = torch.randn(2, 3, 6, 6)
    randomize_masks(gm, 0.5)
    expected = gm(x)
    assert run_graph_pass(LowerDense(), gm).changed == ["conv"]
    assert_close(gm(x), expected, kind="pass: lower dense aten graph")
    assert isinstance(gm.conv.weight, nn.Parameter)
    assert not run_graph_pass(LowerDense(), gm).modified


def test_pass_manager_runs_in_order_and_checks_conditions():
    class Append(Pass):
        def __init__(self, k):
            self.k, self.name = k, f"append {k}"

        def requires(self, obj):
            if obj and obj[-1] < 0:
                raise ValueError("negative")

        def run(self, obj):
            if self.k:
                obj.append(self.k)
            return PassResult([str(self.k)] if self.k else [], {} if self.k else {"0": "nothing to add"})

    manager = PassManager([Append(1), Append(0), Append(2)])
    assert manager([]) == [1, 2]
    assert [(n, r.modified) for n, r in manager.results] == [("append 1", True), ("append 0", False), ("append 2", True)]
    assert manager.result("append 2").changed == ["2"] and manager.skipped() == {"0": "nothing to add"}
    with pytest.raises(ValueError, match="negative"):
        manager([-5])


def test_graph_passes_get_each_graph_and_the_manager_recompiles_what_changed():
    class Negate(GraphPass):
        name = "negate outputs"

        def run_graph(self, site):
            output = next(n for n in site.gm.graph.nodes if n.op == "output")
            with site.gm.graph.inserting_before(output):
                negated = site.gm.graph.call_function(torch.neg, (output.args[0],))
            output.args = (negated,)
            return PassResult([site.path])

    graphs = [fx.symbolic_trace(nn.Identity()), fx.symbolic_trace(nn.Identity())]
    manager = PassManager([Negate()], sites=lambda _: [(gm, {"path": f"part{i}"}) for i, gm in enumerate(graphs)])
    manager(None)
    assert manager.result("negate outputs").changed == ["part0", "part1"]
    x = torch.randn(3)
    assert all(torch.equal(gm(x), -x) for gm in graphs)  # recompiled by the manager, not the pass
    with pytest.raises(TypeError, match="sites"):
        PassManager([Negate()])(None)


def test_transform_runs_the_named_pipeline():
    from ipfx.api import transform_passes
    from ipfx.capture.pipeline import capture

    model, x = Untraced(), torch.randn(2, 3, 5, 5)
    config = TransformConfig()
    captured = capture(copy.deepcopy(model), "symbolic", config)
    assert isinstance(captured.parts[0], Part)
    manager = transform_passes(config, CoefficientFactory(config), check_first_calls=True)  # what transform runs
    captured = manager(captured)
    assert [n for n, _ in manager.results] == ["rewrite weights", "parametrize unreached weights", "guard fallbacks"]
    assert manager.result("rewrite weights").changed == ["conv", "fc"]
    assert not manager.result("parametrize unreached weights").modified
    assert manager.result("guard fallbacks").modified  # traced without example inputs: checked on first calls
    assert_close(captured.model(x), model(x), kind="pass: pipeline")


def test_classes_pickled_under_the_old_module_paths_still_load():
    import pickle

    assert pickle.loads(b"cipfx.modes\nModeSwitch\n.") is ipfx.ModeSwitch
    assert pickle.loads(b"cipfx.reparam\nBasisWeight\n.") is ipfx.BasisWeight
    assert pickle.loads(b"cipfx.source_attributes\nCapturedGraphModule\n.").__module__ == "ipfx.capture.source_attributes"


def test_path_modules_keep_their_submodules_as_attributes_through_every_change_of_one():
    """ModulePathsAsAttributes (deploy.load_module's last pass): the plain containers of a graph module keep
    each submodule in ``__dict__`` as well, with the same state dict, modules and outputs, and the copy follows
    setattr, add_module, register_module, delattr and pop (a deleted module is not called), through pickling and
    copying too, and direct writes into ``_modules`` (torch's quantization, swap_submodule) and changes through a
    shallow copy sharing them; torch.compile traces it; containers of other classes are left as they are."""
    import pickle

    from ipfx.passes.module_paths import ModulePathsAsAttributes, PathModule, as_path_module

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
            self.head = nn.Module()
            self.head.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.head.fc(self.features(x).mean((2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    gm = fx.symbolic_trace(net)
    assert type(gm.features) is nn.Module and type(gm.head) is nn.Module  # (fx's copies of the paths)
    keys, names, x = gm.state_dict().keys(), [n for n, _ in gm.named_modules()], torch.randn(2, 3, 8, 8)
    passes = PassManager([ModulePathsAsAttributes()], sites=lambda m: [(m, {})])
    passes(gm)
    assert sorted(passes.result("module paths as attributes").changed) == ["features", "head"]
    assert type(gm.features) is PathModule and gm.head.__dict__["fc"] is gm.head._modules["fc"]
    assert gm.state_dict().keys() == keys and [n for n, _ in gm.named_modules()] == names
    features = lambda x: net.features(x).mean((2, 3))  # noqa: E731
    with torch.no_grad():
        assert torch.equal(gm(x), net(x))
        from torch.nn.utils._named_member_accessor import NamedMemberAccessor

        for change in ("setattr", "add_module", "register_module", "_modules[name] =", "swap_submodule"):
            new = nn.Linear(4, 2)
            if change == "setattr":
                gm.head.fc = new
            elif change == "_modules[name] =":  # (as torch's quantization convert and sparsifier write it)
                gm.head._modules["fc"] = new
            elif change == "swap_submodule":
                NamedMemberAccessor(gm).swap_submodule("head.fc", new)
            else:
                getattr(gm.head, change)("fc", new)
            assert gm.head.__dict__["fc"] is new, change
            assert torch.equal(gm(x), new(features(x))), change
        for copied in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
            assert copied.head.__dict__["fc"] is copied.head._modules["fc"] is not new
            assert torch.equal(copied(x), gm(x))
            copied.head._modules["fc"] = nn.Identity()  # the copy follows its own changes
            assert torch.equal(copied(x), features(x))
        shallow = copy.copy(gm.head)  # shares _modules with gm.head: a change through either reaches both
        shallow.fc = nn.Identity()
        assert gm.head.fc is shallow.fc and torch.equal(gm(x), features(x))
        gm.head._modules.update(fc=new)
        assert shallow.fc is new and torch.equal(gm(x), new(features(x)))
        assert torch.equal(torch.compile(gm, backend="eager")(x), gm(x))
        assert dir(gm.head).count("fc") == 1
        gm.head._modules.pop("fc")
        assert "fc" not in gm.head.__dict__
        with pytest.raises(AttributeError, match="fc"):
            gm(x)
        gm.head.fc = new
        del gm.head.fc
        assert "fc" not in gm.head.__dict__
        with pytest.raises(AttributeError, match="fc"):
            gm(x)
    assert not as_path_module(nn.Sequential(nn.ReLU())) and not as_path_module(nn.Linear(2, 2))
