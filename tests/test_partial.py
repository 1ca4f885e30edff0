"""Partial tracing: models torch.fx cannot trace as a whole still get every reachable weight rewritten."""

import collections
import dataclasses
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ipfx
from helpers import assert_close, randomize_masks


class Gate(nn.Module):
    """Data-dependent control flow around a conv: untraceable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if x.mean() > 0:
            return self.conv(x)
        return -self.conv(x)


class Loop(nn.Module):
    """Iterates over a list of feature maps, like detection heads do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.cls = nn.Conv2d(4, 2, 1)

    def forward(self, feats):
        return [self.cls(F.relu(self.conv(f))) for f in feats]


class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.body(x)


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = Stem()
        self.gate = Gate()
        self.head = Loop()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.gate(self.stem(x))
        outs = self.head([x, F.max_pool2d(x, 2)])
        if len(outs) > 1 and outs[0].sum() > 1e9:  # control flow in the root itself
            outs = outs[:1]
        return outs, self.fc(x.mean((2, 3)))


def test_untraceable_model_gets_every_weight_rewritten():
    torch.manual_seed(0)
    model = Detector().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="could not trace Detector as a whole"):
        t = ipfx.transform(model)
    names = {w.name for w in ipfx.rewritten_weights(t)}
    assert names == {n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1}
    assert_close(t(x), model(x), kind="partial: outputs")
    randomize_masks(t, 0.5)
    y = t(x)
    with torch.no_grad():
        for target in ("dense", "fused"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                lowered = ipfx.lower(t, target)
            assert_close(lowered(x), y, kind=f"partial: lower {target}")
    assert not any(isinstance(m, ipfx.BasisWeight) for m in ipfx.lower(t).modules())


def test_the_report_says_what_was_traced():
    from ipfx.config import TransformConfig
    from ipfx.capture.partial import capture_tree

    import copy

    _, report = capture_tree(copy.deepcopy(Detector()), TransformConfig())
    assert set(report.traced) == {"stem"}  # lone conv/linear children stay modules, parametrized
    t = ipfx.transform(Detector())
    captures = {w.name: w.capture for w in ipfx.rewritten_weights(t)}
    assert captures == {"stem.body.0.weight": "symbolic", "gate.conv.weight": "parametrized",
                        "head.conv.weight": "parametrized", "head.cls.weight": "parametrized",
                        "fc.weight": "parametrized"}
    assert {path for path, _, _ in report.untraced} == {"", "gate", "head"}  # control flow, list iteration
    assert "kept as Python code: <root> (Detector)" in str(report)


def test_config_patterns_see_full_names_in_partial_traces():
    t = ipfx.transform(Detector(), config=ipfx.TransformConfig(exclude=["head.*"]))
    names = {w.name for w in ipfx.rewritten_weights(t)}
    assert "head.conv.weight" not in names and "gate.conv.weight" in names


class Blocks(nn.Module):
    """A block list whose length the parent reads (diffusers' ``len(block.resnets)``)."""

    def __init__(self):
        super().__init__()
        self.resnets = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)])
        self.unused = nn.ModuleList([nn.Conv2d(4, 4, 1)])

    def forward(self, x):
        for conv in self.resnets:
            x = F.relu(conv(x))
        return x


class Iterating(nn.Module):
    """Python code that iterates a Sequential and calls its entries itself (ultralytics' ``_predict_once``),
    indexes it, and reads the length of a ModuleList inside a traced child."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Blocks(), nn.Conv2d(4, 2, 1))
        self.model[2].f = -1  # a plain attribute the loop reads, as ultralytics' layers carry

    def forward(self, x):
        outs = []
        for i, m in enumerate(self.model):
            x = m(x)
            if i == 2:
                x = x * len(m.resnets) + len(m.unused)
            outs.append(x)
        if outs[-1].sum() > 1e9:  # control flow: the forward is not traced
            return outs[0]
        return self.model[-1](outs[-2]) + outs[-1]


def test_python_code_iterating_and_indexing_containers_keeps_them():
    """An ``nn.Sequential`` reached from Python code is opened (its entries captured one by one, it kept),
    and the containers inside a traced part keep their class and every entry."""
    torch.manual_seed(0)
    model = Iterating().eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = ipfx.transform(model)
    assert type(t.model) is nn.Sequential and len(t.model) == 4
    blocks = t.model[2]
    assert isinstance(blocks, torch.fx.GraphModule) and type(blocks.resnets) is nn.ModuleList
    assert len(blocks.resnets) == 2 and len(blocks.unused) == 1 and blocks.f == -1
    names = {w.name for w in ipfx.rewritten_weights(t)}
    assert names == {n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1}
    assert_close(t(x), model(x), kind="partial: containers")
    for target in ("dense", "fused"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            lowered = ipfx.lower(t, target)
        assert_close(lowered(x), model(x), kind=f"partial: containers, lower {target}")


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv(x))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()

    def forward(self, x):
        if x.sum() > 1e9:  # untraceable: kept as Python code, its child captured on its own
            return x
        return self.inner(x)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.mid = Branchy()

    def forward(self, x):
        return self.mid(self.conv(x))


def test_a_graph_below_python_code_below_a_graph_lowers():
    """graph (root) -> Python code (a leaf of it) -> graph: each graph lowers its own weights only."""
    torch.manual_seed(0)
    model = Outer().eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = ipfx.transform(model)
    assert isinstance(t, torch.fx.GraphModule) and isinstance(t.mid.inner, torch.fx.GraphModule)
    assert {w.capture for w in ipfx.rewritten_weights(t)} == {"symbolic"}
    randomize_masks(t, 0.5)
    y = t(x)
    for target in ("dense", "fused"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            lowered = ipfx.lower(t, target)
        assert_close(lowered(x), y, kind=f"partial: nested graphs, lower {target}")
        assert not any(isinstance(m, ipfx.BasisWeight) for m in lowered.modules())


class ReadsProjection(nn.Module):
    """Python code (control flow) that reads an attention layer's packed projection without calling it
    (torchaudio's WavLM attention), and code that calls another attention layer."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.called = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        if x.sum() > 1e9:
            return x
        q, k, v = F.linear(x, self.attention.in_proj_weight, self.attention.in_proj_bias).chunk(3, -1)
        y = self.attention.out_proj(F.scaled_dot_product_attention(q, k, v))
        return self.called(y, y, y, need_weights=False)[0]


def test_attention_projection_read_by_python_code_is_rewritten():
    import copy
    import pickle

    torch.manual_seed(0)
    model = ReadsProjection().eval()
    x = torch.randn(2, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = ipfx.transform(model)
    names = {w.name: w.capture for w in ipfx.rewritten_weights(t)}
    assert names["attention.in_proj_weight"] == names["called.in_proj_weight"] == "parametrized"
    assert "attention.in_proj_weight" not in dict(t.named_parameters())
    assert_close(t(x), model(x), kind="partial: attention projection")
    randomize_masks(t, 0.5)
    y = t(x)
    for other in (copy.deepcopy(t), pickle.loads(pickle.dumps(t))):
        assert_close(other(x), y, kind="partial: attention projection, copied")
    for target in ("dense", "fused"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            lowered = ipfx.lower(t, target)
        assert type(lowered.attention) is nn.MultiheadAttention
        assert isinstance(lowered.attention._parameters["in_proj_weight"], nn.Parameter)
        assert_close(lowered(x), y, kind=f"partial: attention projection, lower {target}")


class TwiceHeld(nn.Module):
    """Blocks registered twice: in a list and again in a chain the forward uses (MONAI's DynUNet)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)])
        self.chain = nn.Module()
        self.chain.first = self.blocks[0]
        self.chain.then = nn.Module()
        self.chain.then.second = self.blocks[1]

    def forward(self, x):
        return self.chain.then.second(F.relu(self.chain.first(x)))


@pytest.mark.parametrize("examples", [True, False], ids=["example-inputs", "no-example"])
def test_a_module_held_under_two_paths_keeps_one_set_of_coefficients(examples):
    """Both front ends: each weight is listed under both its names (as in the state dict) with one set of
    coefficients; the lowered model loads strictly into the model's class and computes the pruned model."""
    torch.manual_seed(0)
    model = TwiceHeld().eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = ipfx.transform(model, example_inputs=(x,)) if examples else ipfx.transform(model)
    weights = ipfx.rewritten_weights(t)
    assert {w.name for w in weights} == {"blocks.0.weight", "blocks.1.weight", "chain.first.weight",
                                         "chain.then.second.weight"}
    coeffs = {n: m.coeff for n, m in t.named_modules(remove_duplicate=False) if isinstance(m, ipfx.BasisWeight)}
    assert len({id(c) for c in coeffs.values()}) == 2
    randomize_masks(t, 0.5)
    y = t(x)
    lowered = ipfx.lower(t, "dense")
    fresh = TwiceHeld().eval()
    fresh.load_state_dict(lowered.state_dict(), strict=True)
    assert_close(fresh(x), y, kind="partial: module held twice, lowered into its class")


@dataclasses.dataclass
class Output(collections.OrderedDict):
    """A keyword-built mapping with attribute access (Hugging Face's ModelOutput)."""

    hidden: torch.Tensor = None
    pooled: torch.Tensor = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if getattr(self, field.name) is not None:
                self[field.name] = getattr(self, field.name)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        return Output(hidden=h, pooled=h.mean((2, 3)))


class ReadsFields(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder()

    def forward(self, x):
        out = self.encoder(x)
        if out.hidden.sum() > 1e9:  # untraceable: the encoder is captured on its own
            return out.pooled
        return out.hidden.relu().mean((2, 3)) + out.pooled


def test_a_traced_part_returns_its_output_class():
    """torch.fx records a returned ModelOutput-like mapping as a plain dict; the graph rebuilds the class, so
    untraced code that reads ``out.hidden`` runs."""
    torch.manual_seed(0)
    model = ReadsFields().eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = ipfx.transform(model)
    assert isinstance(t.encoder, torch.fx.GraphModule) and type(t.encoder(x)) is Output
    assert_close(t(x), model(x), kind="partial: output class")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert_close(ipfx.lower(t, "dense")(x), model(x), kind="partial: output class, lowered")


class ConvList(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_list = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)])

    def forward(self, x):
        return sum(conv(x) for conv in self.conv_list)


class SharedContainer(nn.Module):
    """A module holding a ModuleList, registered at the top and again inside each block (timm's CoaT)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.crpe = ConvList()
        self.blocks = nn.ModuleList([nn.Module(), nn.Module()])
        for block in self.blocks:
            block.crpe = self.crpe

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = F.relu(block.crpe(h))
        return h


@pytest.mark.parametrize("examples", [True, False], ids=["example-inputs", "no-example"])
def test_a_shared_module_holding_a_container_transforms_and_lowers(examples):
    torch.manual_seed(0)
    model = SharedContainer().eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = ipfx.transform(model, example_inputs=(x,)) if examples else ipfx.transform(model)
    for i in range(2):  # one set of coefficients under every name (one object, or tied forms under export)
        coeffs = {id(t.get_submodule(f"{prefix}conv_list.{i}").coeff) for prefix in ("crpe.", "blocks.0.crpe.",
                                                                                      "blocks.1.crpe.")}
        assert len(coeffs) == 1
    randomize_masks(t, 0.5)
    y = t(x)
    for target in ("dense", "fused"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            lowered = ipfx.lower(t, target)
        assert_close(lowered(x), y, kind=f"partial: shared container, lower {target}")
    dense = ipfx.lower(t, "dense")
    fresh = SharedContainer().eval()
    fresh.load_state_dict(dense.state_dict(), strict=True)
    assert_close(fresh(x), y, kind="partial: shared container, into its class")


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).relu() + x


class Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Layer() for _ in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


_RECORDED: list = []  # the active collector (Hugging Face keeps it in a context variable)


def _record(module, args, output):
    _RECORDED.append(output)


class Recording(nn.Module):
    """Records each Layer's output with forward hooks it installs at its first call, as Hugging Face models
    do for hidden states (``_can_record_outputs``)."""

    _can_record_outputs = {"hidden_states": Layer}

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = Layers()

    def forward(self, x):
        if not getattr(self, "hooked", False):
            for m in self.modules():
                if isinstance(m, Layer):
                    m.register_forward_hook(_record)
            self.hooked = True
        _RECORDED.clear()
        last = self.body(self.stem(x))
        if last.sum() > 1e9:  # untraceable as a whole: the body is captured on its own
            return last
        return last.mean((2, 3)), torch.stack([h.mean() for h in _RECORDED])


def test_classes_a_library_hooks_at_run_time_stay_module_calls():
    """A graph traced through a module does not call it, so hooks installed on it at run time would never run:
    a class listed in ``_can_record_outputs`` is kept as a module (its children captured, its weights
    rewritten), and the transformed model records what the original records."""
    torch.manual_seed(0)
    model = Recording().eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = ipfx.transform(model)
    assert all(type(layer) is Layer for layer in t.body.layers)
    assert {w.name for w in ipfx.rewritten_weights(t)} == {n for n, p in model.named_parameters() if p.dim() == 4}
    with torch.no_grad():
        expected = model(x)
        assert_close(t(x), expected, kind="partial: hooked classes")
        assert_close(ipfx.lower(t, "dense")(x), expected, kind="partial: hooked classes, lowered")


def test_hugging_face_hidden_states_without_example_inputs():
    """``output_hidden_states=True`` on a model transformed without example inputs returns every hidden state."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=32)
    model = transformers.ViTModel(cfg).eval()
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = ipfx.transform(model)
        with torch.no_grad():
            got = t(x, output_hidden_states=True).hidden_states
            expected = model(x, output_hidden_states=True).hidden_states
    assert len(got) == len(expected) == 3
    assert_close(got, expected, kind="partial: Hugging Face hidden states")


def _old_weight_norm_net() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        return nn.Sequential(nn.Conv1d(4, 4, 3, padding=1), nn.ReLU(),
                             torch.nn.utils.weight_norm(nn.Conv1d(4, 4, 5, padding=2)))


@pytest.mark.parametrize("examples", [True, False], ids=["example-inputs", "no-example"])
def test_the_deprecated_hook_based_weight_norm_is_copied_and_rewritten(examples):
    """``torch.nn.utils.weight_norm`` keeps the weight as a computed tensor that deepcopy refuses, and
    recomputes it from ``weight_g`` and ``weight_v`` before every call: the model is copied, ``weight_v``
    is in coefficient form (pruning it changes the output), and both lowerings compute the same."""
    torch.manual_seed(0)
    model = _old_weight_norm_net().eval()
    x, other = torch.randn(2, 4, 16), torch.randn(3, 4, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = ipfx.transform(model, example_inputs=(x,)) if examples else ipfx.transform(model)
    assert {w.name for w in ipfx.rewritten_weights(t)} == {"0.weight", "2.weight_v"}
    with torch.no_grad():
        for inputs in (x, other):
            assert_close(t(inputs), model(inputs), kind="partial: old weight norm")
        randomize_masks(t, keep=0.5)
        pruned = t(other)
        assert not torch.allclose(pruned, model(other))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for target in ("dense", "fused"):
                assert_close(ipfx.lower(t, target)(other), pruned, kind=f"partial: old weight norm, {target}")
