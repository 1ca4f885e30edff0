"""Bad input gets a clear error that names the problem and the fix, and leaves the input untouched."""


import pytest
import torch
import torch.nn as nn

import ipfx
from ipfx.errors import IPFXTypeError, IPFXValueError, NotTransformedError, SingularBasisError, TraceError
from strategies import TinyResNet


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: torch.fx cannot trace this
            return x * 2
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = DataDependent()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.gate(self.conv(x)))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("bad", [None, 3, "resnet18", torch.zeros(3)])
def test_not_a_module(bad):
    with pytest.raises(IPFXTypeError, match="takes a torch.nn.Module"):
        ipfx.transform(bad)
    with pytest.raises(TypeError):
        ipfx.lower(bad)


def test_a_class_instead_of_an_instance():
    with pytest.raises(IPFXTypeError, match=r"model instance.*ipfx.transform\(TinyResNet\(...\)\)"):
        ipfx.transform(TinyResNet)


def test_untraceable_module_is_named_with_the_fix():
    model = Net()
    before = snapshot(model)
    with pytest.raises(TraceError) as info:
        ipfx.transform(model, partial=False)
    message = str(info.value)
    assert "'gate'" in message and "DataDependent" in message
    assert "leaf_modules=['gate']" in message
    assert unchanged(model, before)
    # and the suggested fix works
    t = ipfx.transform(model, leaf_modules=["gate"], partial=False)
    x = torch.randn(1, 3, 6, 6)
    assert torch.allclose(t(x), model(x), atol=1e-6)
    assert {w.name for w in ipfx.rewritten_weights(t)} == {"conv.weight", "head.weight"}


def test_leaf_modules_are_transformed_on_their_own():
    model = nn.Sequential(nn.Conv2d(3, 3, 3), nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU()))
    t = ipfx.transform(model, leaf_modules=[nn.Sequential])
    assert [n.target for n in t.graph.nodes if n.op == "call_module"] == ["1"]
    assert sorted(w.name for w in ipfx.rewritten_weights(t)) == ["0.weight", "1.0.weight"]
    x = torch.randn(1, 3, 7, 7)
    assert torch.allclose(t(x), model(x), atol=1e-6)


def test_untraceable_root_forward():
    with pytest.raises(TraceError, match="forward of DataDependent itself"):
        ipfx.transform(DataDependent(), partial=False)
    with pytest.warns(UserWarning, match="could not trace DataDependent as a whole"):
        same = ipfx.transform(DataDependent())  # nothing to rewrite, and it still works
    assert torch.equal(same(torch.ones(2)), torch.full((2,), 2.0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(space="ipx"), "unknown space 'ipx'.*'ip'.*'sp'"),
        (dict(basis="haar"), "unknown basis 'haar'.*'dct'"),
        (dict(space="sp", basis="dct"), "space='sp' always uses the spatial"),
        (dict(space="sp", train_basis=True), "use space='ip' to train a basis"),
        (dict(basis=torch.zeros(9, 9)), "singular"),
        (dict(basis=torch.eye(4)), r"\(K, K\) = \(9, 9\)"),
        (dict(config=ipfx.TransformConfig(), space="sp"), "either config"),
    ],
)
def test_bad_options(kwargs, match):
    model = TinyResNet(seed=0)
    before = snapshot(model)
    with pytest.raises(IPFXValueError, match=match):
        ipfx.transform(model, **kwargs)
    assert unchanged(model, before)


def test_singular_basis_error_names_the_layer():
    with pytest.raises(SingularBasisError, match="conv1.weight"):
        ipfx.transform(TinyResNet(seed=0), basis=lambda ks: torch.ones(9, 9))


def test_bad_config_values():
    with pytest.raises(IPFXValueError, match="unknown option"):
        ipfx.TransformConfig(overrides={"a*": {"spaec": "sp"}})
    with pytest.raises(TypeError, match="nn.Module subclasses"):
        ipfx.TransformConfig(module_types=(int,))


def test_lowering_a_model_that_was_never_transformed():
    model = TinyResNet(seed=0)
    for call in (lambda: ipfx.lower(model), lambda: ipfx.sparsity(model)):
        with pytest.raises(NotTransformedError, match=r"never transformed.*ipfx.transform\(model\)"):
            call()


def test_unknown_lowering_target():
    t = ipfx.transform(TinyResNet(seed=0))
    with pytest.raises(IPFXValueError, match="unknown lowering target 'onnx'.*'dense'.*'fused'"):
        ipfx.lower(t, "onnx")


def test_edited_compose_subgraph_is_refused():
    t = ipfx.transform(nn.Sequential(nn.Conv2d(3, 3, 3)))
    mul = next(n for n in t.graph.nodes if n.target is torch.mul)
    with t.graph.inserting_after(mul):
        doubled = t.graph.call_function(torch.add, (mul, mul))
    mul.replace_all_uses_with(doubled, delete_user_cb=lambda u: u is not doubled)
    t.recompile()
    with pytest.raises(IPFXValueError, match="was changed after ipfx.transform"):
        ipfx.lower(t)


def test_uncopyable_model_says_how_to_proceed():
    class Uncopyable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3)

        def __deepcopy__(self, memo):
            raise RuntimeError("holds a file handle")

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(IPFXTypeError, match="inplace=True"):
        ipfx.transform(Uncopyable())
    t = ipfx.transform(Uncopyable(), inplace=True)
    assert len(ipfx.rewritten_weights(t)) == 1


@pytest.mark.parametrize("value", [0.5, float("nan"), 2.0])
def test_a_mask_that_is_not_zeros_and_ones_is_refused_on_load(value):
    """A state dict whose mask holds anything but 0 and 1 would scale or poison its weight silently."""
    model = ipfx.transform(nn.Sequential(nn.Conv2d(3, 4, 3)), example_inputs=(torch.randn(1, 3, 8, 8),))
    state = model.state_dict()
    key = next(k for k in state if k.endswith("mask"))
    before = state[key].clone()
    bad = {**state, key: torch.full_like(state[key], value)}
    with pytest.raises(RuntimeError, match="a mask holds only 0 \\(pruned\\) and 1 \\(kept\\)"):
        model.load_state_dict(bad)
    assert torch.equal(model.state_dict()[key], before)
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(RuntimeError, match=f"Missing key\\(s\\) in state_dict: \"{key}\""):
        model.load_state_dict(missing)


def _two_convs(seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3))
    return ipfx.transform(model, example_inputs=(torch.randn(2, 3, 8, 8),), **options)


def _trained_bases(model: nn.Module) -> dict:
    """The state dict of ``model`` with each layer's basis moved off its start (as training moves it)."""
    with torch.no_grad():
        for i, key in enumerate(k for k in model.state_dict() if k.endswith("basis")):
            model.get_submodule(key.rsplit(".", 1)[0]).basis.add_(0.01 * (i + 1))
    return model.state_dict()


def test_a_basis_that_would_load_and_be_ignored_or_overwritten_is_refused():
    """An IP model's state dict loaded into the SP form (which computes without its basis) matched every key and
    computed something else; into a model sharing one basis (share_basis=True), each layer's basis overwrote
    the one tensor, the last winning. Both are load errors now, naming the key; state dicts of the same options
    still load, and a shared basis loads where its layers agree."""
    x = torch.randn(2, 3, 8, 8)
    state = _trained_bases(_two_convs(0))
    for options, match in (({"space": "sp"}, r"0\.basis: this weight is in SP form.*space='ip'"),
                           ({"share_basis": True}, r"2\.basis: this model shares one basis.*than at 0\.basis")):
        model = _two_convs(1, **options)
        with pytest.raises(RuntimeError, match=match):
            model.load_state_dict(state)
    same = _two_convs(1)
    same.load_state_dict(state)
    shared = _two_convs(2, share_basis=True)
    shared_state = _trained_bases(_two_convs(3, share_basis=True))
    assert torch.equal(shared_state["0.basis"], shared_state["2.basis"])
    for _ in range(2):  # and again (the first layer's key is read anew at each load)
        shared.load_state_dict(shared_state)
    assert all(torch.equal(v, shared_state[k]) for k, v in shared.state_dict().items())
    assert torch.equal(same(x), same(x)) and not torch.equal(same(x), _two_convs(1)(x))  # the trained bases count
    sp_state = _two_convs(4, space="sp").state_dict()
    _two_convs(5, space="sp").load_state_dict(sp_state)
