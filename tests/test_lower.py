"""ipfx.lower: dense folding restores the original graph, fused lowering keeps only kept coefficients."""

import copy
import io
import subprocess
import sys
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import ipfx
from ipfx.ops import SparseIPConv, SparseLinear
from helpers import assert_close, graph_modules, isomorphic, perturb_bases, randomize_masks
from strategies import SameEvenConv, TinyResNet, WSConv2d, conv_configs, functional_conv_models, random_graph_models

keeps = st.sampled_from([0.0, 0.1, 0.5, 1.0])


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


def fresh_trace(model: nn.Module) -> fx.GraphModule:
    concrete = {"output_size": None} if isinstance(model, nn.modules.conv._ConvTransposeNd) else None
    return fx.symbolic_trace(model, concrete_args=concrete)


def prepared(model, space, keep, seed=0):
    t = quiet(ipfx.transform, model, space=space)
    randomize_masks(t, keep, seed=seed)
    if space == "ip":
        perturb_bases(t, seed=seed)
    return t


def assert_plain(model: nn.Module) -> None:
    """No ipfx module and no ipfx function anywhere in the graphs of a dense-lowered model (a model whose
    graph depends on the training flag keeps its ModeSwitch, which runs one of two plain graph modules)."""
    for gm in graph_modules(model).values():
        for name, m in gm.named_modules():
            assert not type(m).__module__.startswith("ipfx"), name
        for node in gm.graph.nodes:
            assert not str(getattr(node.target, "__module__", "")).startswith("ipfx"), node.format_node()
            assert "ipfx" not in str(node.target), node.format_node()


def assert_isomorphic_to_plain_traces(lowered: nn.Module, model: nn.Module) -> None:
    """Each mode's lowered graph is the graph of a plain torch.fx trace of the model in that mode."""
    flag = model.training
    for mode, gm in graph_modules(lowered).items():
        assert isomorphic(gm, fresh_trace(model.train(mode))), f"training={mode}"
    model.train(flag)


@given(conv_configs(), st.sampled_from(["ip", "sp"]), keeps)
def test_lowerings_equal_the_transformed_conv(cfg, space, keep):
    model = cfg.build()
    x = cfg.example_input()
    t = prepared(model, space, keep, seed=cfg.seed)
    y = quiet(t, x)
    dense = ipfx.lower(t, "dense")
    assert_close(quiet(dense, x), y, kind="lower: dense, single conv")
    assert_plain(dense)
    assert isomorphic(dense, fresh_trace(model))
    fused = quiet(ipfx.lower, t, "fused")
    with torch.no_grad():
        assert_close(quiet(fused, x), y.detach(), kind="lower: fused, single conv")
    (conv,) = [m for m in fused.modules() if isinstance(m, SparseIPConv)]
    original = next(m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd))
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (  # nn.ConvNd's names answer as before
        original.in_channels, original.out_channels, tuple(original.kernel_size))


@settings(max_examples=20)
@given(random_graph_models(), st.sampled_from(["ip", "sp"]), keeps, st.integers(0, 100))
def test_lowerings_equal_the_transformed_graph(case, space, keep, seed):
    model, x = case
    t = prepared(model, space, keep, seed)
    y = quiet(t, x)
    dense = ipfx.lower(t, "dense")
    assert_close(quiet(dense, x), y, kind="lower: dense, random graph")
    assert_plain(dense)
    assert_isomorphic_to_plain_traces(dense, model)
    fused = quiet(ipfx.lower, t, "fused")
    with torch.no_grad():
        assert_close(quiet(fused, x), y.detach(), kind="lower: fused, random graph")
    if isinstance(t, ipfx.ModeSwitch):  # both graphs were lowered: train mode too (batch norm alike in all)
        y = quiet(t.train(), x)
        assert_close(quiet(dense.train(), x), y, kind="lower: dense, random graph (train)")
        with torch.no_grad():
            assert_close(quiet(fused.train(), x), y.detach(), kind="lower: fused, random graph (train)")


@given(functional_conv_models(), keeps)
def test_lowering_functional_kernels(case, keep):
    model, x = case
    t = prepared(model, "ip", keep)
    y = quiet(t, x)
    dense = ipfx.lower(t)
    assert_close(quiet(dense, x), y, kind="lower: dense, functional")
    assert set(dense.state_dict()) == set(model.state_dict())
    assert isomorphic(dense, fresh_trace(model))
    with torch.no_grad():
        assert_close(quiet(quiet(ipfx.lower, t, "fused"), x), y.detach(), kind="lower: fused, functional")


def test_lowering_a_graph_never_called_warns_once_and_names_the_line():
    model = TinyResNet(seed=0)
    t = ipfx.transform(model)  # no example inputs: each graph is checked on its first call, which never came
    with pytest.warns(UserWarning, match=r"1 graph\(s\) traced without example inputs .* were never called") as record:
        ipfx.lower(t)
    assert [w.filename for w in record if "never called" in str(w.message)] == [__file__]  # the user's line
    x = model.example_input(batch=2)
    t(x)  # called once: checked, so lowering has nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ipfx.lower(t)


def test_dense_lowering_restores_modules_and_names():
    model = TinyResNet(seed=0)
    dense = ipfx.lower(prepared(model, "ip", 0.3))
    assert set(dense.state_dict()) == set(model.state_dict())
    originals = dict(model.named_modules())
    for name, m in dense.named_modules():
        if isinstance(originals.get(name), (nn.Conv2d, nn.Linear)):
            assert type(m) is type(originals[name]), name
            assert m.extra_repr() == originals[name].extra_repr(), name
    assert_plain(dense)


def test_dense_lowering_runs_without_ipfx(tmp_path):
    model = TinyResNet(seed=0)
    t = prepared(model, "ip", 0.3)
    x = model.example_input(batch=2)
    path = tmp_path / "lowered.pt"
    torch.save({"model": ipfx.lower(t), "x": x, "y": t(x).detach()}, path)
    script = (
        "import sys; sys.modules['ipfx'] = None\n"  # any import of ipfx now fails
        "import torch\n"
        f"d = torch.load({str(path)!r}, weights_only=False)\n"
        "y = d['model'](d['x'])\n"
        "assert torch.allclose(y, d['y'], rtol=1e-4, atol=1e-5), (y - d['y']).abs().max()\n"
        "assert not [k for k in sys.modules if k.startswith('ipfx') and sys.modules[k] is not None]\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_lowering_keeps_flags_dtype_and_leaves_its_input_alone():
    model = TinyResNet(seed=0).double().eval()
    t = prepared(model, "ip", 0.5)
    before = copy.deepcopy(t.state_dict())
    for target in ("dense", "fused"):
        out = quiet(ipfx.lower, t, target)
        assert not out.training and all(not m.training for m in out.modules())
        assert all(p.dtype == torch.float64 for p in out.parameters())
    assert all(torch.equal(v, before[k]) for k, v in t.state_dict().items())
    assert ipfx.sparsity(t) > 0  # still transformed


def test_fused_lowering_stores_only_kept_coefficients():
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 1), nn.Flatten(),
                          nn.Linear(64 * 4 * 4, 10))
    t = ipfx.transform(model)
    randomize_masks(t, 0.05)
    fused = ipfx.lower(t, "fused")
    kinds = [type(m) for m in fused.modules()]
    assert kinds.count(SparseIPConv) == 2 and kinds.count(SparseLinear) == 1
    for prefix, m in (("0", fused.get_submodule("0")), ("4", fused.get_submodule("4"))):
        assert m.nnz == int((t.get_submodule(prefix).mask != 0).sum())

    def saved_bytes(module):
        buf = io.BytesIO()
        torch.save(module.state_dict(), buf)
        return buf.tell()

    assert saved_bytes(fused) * 5 < saved_bytes(ipfx.lower(t, "dense"))
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        assert_close(fused(x), t(x), kind="lower: fused, storage")


def test_fused_lowering_falls_back_to_dense_for_processed_weights():
    model = nn.Sequential(WSConv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3))
    t = prepared(model, "ip", 0.5)
    with pytest.warns(UserWarning, match="kept 1 weight.*0 .*processed"):
        fused = ipfx.lower(t, "fused")
    assert isinstance(fused.get_submodule("2"), SparseIPConv)
    assert not isinstance(fused.get_submodule("0"), SparseIPConv)
    x = torch.randn(1, 3, 7, 7)
    with torch.no_grad():
        assert_close(fused(x), t(x), kind="lower: fused fallback")


def test_same_padding_with_even_kernels_is_resolved():
    model = SameEvenConv(seed=0)
    t = prepared(model, "ip", 0.5)
    x = model.example_input(batch=2)
    fused = quiet(ipfx.lower, t, "fused")
    with torch.no_grad():
        assert_close(quiet(fused, x), quiet(t, x), kind="lower: fused, same padding")


def test_lowering_twice_or_transforming_twice_is_a_clear_error():
    t = ipfx.transform(TinyResNet(seed=0))
    dense = ipfx.lower(t)
    with pytest.raises(ipfx.NotTransformedError, match="already lowered"):
        ipfx.lower(dense)
    with pytest.raises(ValueError, match="already transformed"):
        ipfx.transform(t)
    again = ipfx.lower(t)  # lowering does not consume the transformed model
    x = TinyResNet(seed=0).example_input()
    assert_close(again(x), dense(x), kind="lower: twice", rtol=0)


def _targets(ep) -> set:
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


def test_torch_export_captures_transformed_and_lowered_models():
    model = TinyResNet(seed=0).eval()
    t = prepared(model, "ip", 0.3).eval()
    x = model.example_input(batch=2)
    with torch.no_grad():
        y = t(x)
        for name, m in (("transformed", t), ("dense", ipfx.lower(t)), ("fused", ipfx.lower(t, "fused"))):
            ep = torch.export.export(m, (x,))
            assert_close(ep.module()(x), y, kind=f"export: {name}")
            if name == "fused":
                assert "ipfx.ip_conv.default" in _targets(ep) and "ipfx.sparse_linear.default" in _targets(ep)


class TiedEmbeddingFirst(nn.Module):
    """An embedding tied to the output layer, registered first (as in GPT-2 and BERT language models)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.emb.weight = self.head.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def test_a_tied_weight_left_unread_by_the_graph_is_not_kept_stale():
    """torch.export reads a tied weight under one name; the other (emb.weight) stayed in the transformed and the
    lowered model holding the original tensor: after pruning and training, the lowered state dict's emb.weight
    was the untrained dense weight beside the trained head.weight. Now the name is gone from the transformed
    model and, lowered, holds the folded weight (the tie)."""
    torch.manual_seed(0)
    model = TiedEmbeddingFirst().eval()
    original = model.head.weight.detach().clone()
    ids = torch.randint(0, 20, (2, 5))
    t = quiet(ipfx.transform, model, example_inputs=(ids,))
    assert "emb.weight" not in t.state_dict()
    ipfx.prune(t, "magnitude", 0.5)
    opt = torch.optim.SGD([p for p in t.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        t(ids).logsumexp(-1).sum().backward()
        opt.step()
    t.eval()
    for target in ("dense", "fused"):
        lowered = quiet(ipfx.lower, t, target)
        assert_close(lowered(ids), t(ids), kind=f"tied, lowered {target}")
    state = ipfx.lower(t, "dense").state_dict()
    assert torch.equal(state["emb.weight"], state["head.weight"]) and not torch.equal(state["emb.weight"], original)
    again = TiedEmbeddingFirst()
    again.load_state_dict(state)
    assert_close(again(ids), t(ids), kind="tied, loaded into the class")


def test_a_tied_weight_a_leaf_module_reads_stays_with_it():
    """An embedding called as a leaf reads its (tied) weight itself: not a name left unread, so it stays (the
    tie converted into coefficient form by the transform), and the model computes as before."""
    torch.manual_seed(0)
    model = TiedEmbeddingFirst().eval()
    ids = torch.randint(0, 20, (2, 5))
    t = quiet(ipfx.transform, model, leaf_modules=[nn.Embedding])
    assert_close(t(ids), model(ids), kind="tied, embedding a leaf")
    ipfx.prune(t, "magnitude", 0.5)
    state = ipfx.lower(t, "dense").state_dict()
    assert torch.equal(state["emb.weight"], state["head.weight"])
    assert_close(ipfx.lower(t, "dense")(ids), t(ids), kind="tied, embedding a leaf, lowered")
