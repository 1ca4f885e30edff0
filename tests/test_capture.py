"""The two capture front ends (torch.export and symbolic tracing) and what every result must hold.

Properties run through both front ends: whole convolution configurations, random graphs in train and
eval mode, functional kernels and both lowerings; and the two front ends give the same state dict and
the same outputs. Then the model code that broke symbolic capture (issue 10), each in a few lines.
"""

from __future__ import annotations

import copy
import inspect
import io
import math
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import ipfx
from helpers import OptionalScale, assert_close, graph_modules, perturb_bases, quiet, randomize_masks
from strategies import conv_configs, functional_conv_models, random_graph_models

FRONT_ENDS = ("export", "symbolic")
EXPORT_EXAMPLES = 12  # torch.export takes ~0.1-1 s per model and mode: fewer examples than the profile's


def capture_both(model, x, **kwargs):
    return {front: quiet(ipfx.transform, model, example_inputs=(x,), capture=front, **kwargs) for front in FRONT_ENDS}


def fronts_of(t) -> set[str]:
    return {w.capture for w in ipfx.rewritten_weights(t)}


# -- properties through both front ends ---------------------------------------------------------------------
@settings(max_examples=EXPORT_EXAMPLES)
@given(conv_configs(), st.sampled_from(["ip", "sp"]), st.booleans())
def test_both_front_ends_preserve_any_convolution_and_agree(cfg, space, train):
    model = cfg.build().train(train)
    x = cfg.example_input()
    expected = quiet(model, x)
    results = capture_both(model, x, space=space)
    assert fronts_of(results["export"]) == {"export"} and fronts_of(results["symbolic"]) == {"symbolic"}
    for front, t in results.items():
        assert_close(quiet(t, x), expected, kind=f"capture {front}: single conv")
    sd_e, sd_s = results["export"].state_dict(), results["symbolic"].state_dict()
    assert set(sd_e) == set(sd_s)
    for key in sd_e:
        assert torch.equal(sd_e[key], sd_s[key]), key
    for target in ("dense", "fused"):
        lowered = {front: quiet(ipfx.lower, t, target) for front, t in results.items()}
        assert_close(quiet(lowered["export"], x), quiet(lowered["symbolic"], x), kind=f"capture: lower {target} agree")


@settings(max_examples=EXPORT_EXAMPLES)
@given(random_graph_models(train=True), st.sampled_from(["ip", "sp"]))
def test_export_preserves_random_graphs_in_train_and_eval(case, space):
    model, x = case
    reference = copy.deepcopy(model)
    t = quiet(ipfx.transform, model, example_inputs=(x,), capture="export", space=space)
    assert fronts_of(t) == {"export"}
    for key, value in reference.state_dict().items():  # the input model is not touched
        assert torch.equal(model.state_dict()[key], value), key
    assert_close(quiet(t, x), quiet(model, x), kind="export: random graph (train)")  # batch norm updates alike
    model.eval()
    t.eval()
    assert_close(quiet(t, x), quiet(model, x), kind="export: random graph (eval)")
    n_kernels = sum(1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)))
    n_raw = sum(1 for n, _ in model.named_parameters() if not n.endswith(("weight", "bias")))
    assert len(ipfx.rewritten_weights(t)) == n_kernels + n_raw
    randomize_masks(t, 0.5)
    perturb_bases(t)
    expected = quiet(t, x)
    for target in ("dense", "fused"):
        assert_close(quiet(quiet(ipfx.lower, t, target), x), expected, kind=f"export: lower {target}")


@settings(max_examples=EXPORT_EXAMPLES)
@given(functional_conv_models())
def test_export_rewrites_functional_kernels_like_symbolic_tracing(case):
    model, x = case
    results = capture_both(model, x)
    kernels = {n for n, p in model.named_parameters() if p.dim() >= 2}
    for front, t in results.items():
        assert {w.name for w in ipfx.rewritten_weights(t)} == kernels
        assert_close(quiet(t, x), quiet(model, x), kind=f"capture {front}: functional kernel")
    assert set(results["export"].state_dict()) == set(results["symbolic"].state_dict())


# -- the export result: modes, state dict, lowering, export again ---------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(x.mean((2, 3))))


def test_export_result_follows_train_and_eval_and_trains():
    model, x = Net(), torch.randn(4, 3, 8, 8)
    t = ipfx.transform(model, example_inputs=(x,))
    assert isinstance(t, ipfx.ModeSwitch)  # batch norm and dropout differ between the modes
    t.eval()
    model.eval()
    assert_close(t(x), model(x), kind="export: eval")
    assert_close(t(x), t(x), kind="export: eval is deterministic")
    t.train()
    first, second = t(x), t(x)
    assert not torch.allclose(first, second)  # dropout is live in train mode
    optimizer = torch.optim.SGD(t.parameters(), lr=0.1)
    before = t.conv.coeff.detach().clone()
    t(x).sum().backward()
    optimizer.step()
    assert not torch.equal(t.conv.coeff, before)
    assert t.conv.basis.grad is not None  # the IP basis trains too
    assert t(torch.randn(2, 3, 12, 12)).shape == (2, 4)  # batch and image size stay dynamic


def test_export_result_lowers_to_a_state_dict_of_the_original_class_and_exports_again():
    model, x = Net().eval(), torch.randn(4, 3, 8, 8)
    t = ipfx.transform(model, example_inputs=(x,)).eval()
    randomize_masks(t, 0.5)
    perturb_bases(t)
    expected = t(x)
    dense = ipfx.lower(t, "dense").eval()
    assert not any(isinstance(m, ipfx.BasisWeight) for m in dense.modules())
    fresh = Net()
    fresh.load_state_dict(dense.state_dict(), strict=True)
    assert_close(fresh.eval()(x), expected, kind="export: lowered state dict in the original class")
    again = torch.export.export(dense, (x,), strict=False)
    assert_close(again.module()(x), expected, kind="export: lowered dense exports again")
    fused = quiet(ipfx.lower, t, "fused").eval()
    assert_close(fused(x), expected, kind="export: lower fused")
    fused_again = torch.export.export(fused, (x,), strict=False)
    assert any("ipfx" in str(n.target) for n in fused_again.graph.nodes)  # one op, seen through its fake kernel
    assert_close(fused_again.module()(x), expected, kind="export: lowered fused exports again")


def test_an_exported_program_is_accepted():
    model, x = Net().eval(), torch.randn(4, 3, 8, 8)
    program = torch.export.export(model, (x,), strict=False)
    with pytest.warns(UserWarning, match="one training mode"):
        t = ipfx.transform(program)
    assert fronts_of(t) == {"export"}
    assert {w.name for w in ipfx.rewritten_weights(t)} == {"conv.weight", "fc.weight"}
    assert_close(t(x), model(x), kind="export: from an ExportedProgram")
    randomize_masks(t, 0.5)
    assert torch.equal(program.state_dict["conv.weight"], model.conv.weight)  # the program is not touched
    assert_close(ipfx.lower(t)(x), t(x), kind="export: ExportedProgram lowered")


def test_capture_options_are_checked():
    model = Net()
    with pytest.raises(ValueError, match="needs example inputs"):
        ipfx.transform(model, capture="export")
    with pytest.raises(ValueError, match="unknown capture"):
        ipfx.transform(model, capture="dynamo")
    with pytest.raises(TypeError, match="tuple of positional arguments"):
        ipfx.transform(model, example_inputs={"x": 1})
    t = ipfx.transform(model, example_inputs=torch.randn(2, 3, 8, 8))  # a bare tensor is one argument
    assert fronts_of(t) == {"export"}


def test_auto_falls_back_to_symbolic_tracing_and_says_why():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            n = int(x.sum() > 0)  # a value torch.export cannot know, but eager Python can
            return self.conv(x) * (n + 1)

    model, x = DataDependent(), torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="symbolic tracing instead"):
        t = ipfx.transform(model, example_inputs=(x,))
    assert fronts_of(t) <= {"symbolic", "parametrized"} and len(ipfx.rewritten_weights(t)) == 1
    assert_close(t(x), model(x), kind="auto: fallback")
    with pytest.raises(ipfx.TraceError, match="torch.export could not capture"):
        ipfx.transform(model, example_inputs=(x,), capture="export")


# -- model code that broke symbolic capture ------------------------------------------------------------------
class Conv2dSame(nn.Conv2d):
    """'same' padding computed in Python from the input size (as timm's Conv2dSame)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        pads = [max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
                for i, k, s, d in zip((ih, iw), self.kernel_size, self.stride, self.dilation)]
        x = F.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SameNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = Conv2dSame(3, 6, 3, stride=2)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.stem(x).mean((2, 3)))


@pytest.mark.parametrize("front", FRONT_ENDS)
def test_dynamic_same_padding_weights_are_rewritten_by_either_front_end(front):
    model, x = SameNet(), torch.randn(2, 3, 9, 9)
    t = quiet(ipfx.transform, model, example_inputs=(x,), capture=front)
    infos = {w.name: w for w in ipfx.rewritten_weights(t)}
    assert set(infos) == {"stem.weight", "head.weight"}
    expected_front = "export" if front == "export" else "parametrized"  # symbolic: the conv stays Python code
    assert infos["stem.weight"].capture == expected_front
    assert_close(t(x), model(x), kind=f"{front}: dynamic same padding")
    randomize_masks(t, 0.3)
    assert ipfx.sparsity(t) > 0.5
    y = t(x)
    assert_close(ipfx.lower(t)(x), y, kind=f"{front}: dynamic same padding lowered")
    fresh = SameNet()
    fresh.load_state_dict(ipfx.lower(t).state_dict(), strict=True)


class WeightNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 4, 5, padding=2, groups=2), dim=2)

    def forward(self, x):
        return self.conv(x)


def test_weight_norm_convs_are_rewritten_through_their_parametrization():
    model, x = WeightNormNet(), torch.randn(2, 4, 11)
    t = quiet(ipfx.transform, model, example_inputs=(x,))
    names = {w.name for w in ipfx.rewritten_weights(t)}
    assert names == {"conv.parametrizations.weight.original1"}  # the direction v is the kernel; g scales it
    assert_close(t(x), model(x), kind="export: weight norm")
    randomize_masks(t, 0.5)
    assert_close(ipfx.lower(t)(x), t(x), kind="export: weight norm lowered")


class ReadsWeightDtype(nn.Module):
    """Untraced outer code reads a rewritten weight's dtype (as Hugging Face ViT embeddings do)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.projection = nn.Conv2d(3, 4, 2, stride=2)
        self.gate = nn.Linear(4, 4)

    def forward(self, x):
        x = x.to(self.projection.weight.dtype)
        y = self.projection(x).flatten(2).transpose(1, 2)
        if y.sum() > -1e9:  # data-dependent: symbolic tracing keeps this forward as Python
            y = self.gate(y)
        return y


def test_untraced_code_reading_weight_attributes_runs_and_prunes():
    model, x = ReadsWeightDtype(), torch.randn(2, 3, 4, 4)
    t = quiet(ipfx.transform, model, capture="symbolic")
    assert {w.name for w in ipfx.rewritten_weights(t)} == {"projection.weight", "gate.weight"}
    assert t.projection.weight.dtype == torch.float32 and t.projection.weight.shape == (4, 3, 2, 2)
    assert_close(t(x), model(x), kind="symbolic: weight dtype read by Python")
    randomize_masks(t, 0.0)  # every coefficient masked: the untraced linear reads a zero weight
    out = t(x)
    assert torch.equal(out, t.gate.bias.expand_as(out))


def test_a_leaf_linear_traced_on_its_own_lowers():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            if x.sum() > -1e9:  # untraceable: fc is traced on its own
                return self.fc(x)
            return x

    model, x = Outer(), torch.randn(2, 4)
    t = quiet(ipfx.transform, model)
    assert [w.name for w in ipfx.rewritten_weights(t)] == ["fc.weight"]
    randomize_masks(t, 0.5)
    lowered = ipfx.lower(t)
    assert_close(lowered(x), t(x), kind="partial: single leaf lowered")
    assert not any(isinstance(m, ipfx.BasisWeight) for m in lowered.modules())


class DecoderBlock(nn.Module):
    """A skip input that is None or a tensor (MONAI-style decoder block)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, x_e=None):
        if x_e is not None and torch.jit.isinstance(x_e, torch.Tensor):
            x = x + x_e
        return self.conv(x)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = DecoderBlock()

    def forward(self, x):
        return self.block(x, None)


def test_export_takes_the_branch_the_real_call_takes_and_the_check_catches_a_wrong_graph():
    model, x = Decoder(), torch.randn(2, 4, 5, 5)
    t = ipfx.transform(model, example_inputs=(x,))
    assert fronts_of(t) == {"export"}
    assert_close(t(x), model(x), kind="export: optional skip input")

    class Wrong(nn.Module):  # a "capture" that took the other branch
        def forward(self, x):
            return model.block.conv(x + 1)

    from ipfx.capture.pipeline import CheckCapture

    with pytest.raises(ipfx.TraceError, match="does not reproduce the model"):
        CheckCapture(model, (x,), {}).check(Wrong())


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self._output_stride = 32
        self._depth = 3

    @property
    def output_stride(self):
        return min(self._output_stride, 2 ** self._depth)

    def out_channels_for(self, i):
        return self.conv.out_channels * i

    def forward(self, x):
        return self.conv(x)


class Segmenter(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = Encoder()

    def forward(self, x):
        if x.sum() > -1e9:  # untraceable root: the encoder is replaced by its graph
            x = self.encoder(x)
        return x * self.encoder.output_stride


def test_replaced_modules_keep_attributes_properties_and_methods():
    model, x = Segmenter(), torch.randn(2, 3, 4, 4)
    t = quiet(ipfx.transform, model, capture="symbolic")
    assert isinstance(t.encoder, fx.GraphModule)
    assert t.encoder.output_stride == 8 and t.encoder.out_channels_for(2) == 8
    assert_close(t(x), model(x), kind="symbolic: attributes of replaced modules")
    copied = copy.deepcopy(t)
    assert copied.encoder.output_stride == 8
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        t.encoder.missing


def test_prune_takes_example_inputs_as_a_tuple_a_tensor_or_a_shape():
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    masks = []
    for example in ((x,), x, (2, 3, 8, 8)):
        t = ipfx.transform(model)
        ipfx.prune(t, "synflow", 0.8, example_inputs=example)
        masks.append(torch.cat([m.mask.flatten() for m in t.modules() if isinstance(m, ipfx.BasisWeight)]))
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[1], masks[2])
    assert abs(1 - masks[0].mean().item() - 0.8) < 0.02


def test_graph_modules_helper_sees_both_export_graphs():
    model, x = Net(), torch.randn(4, 3, 8, 8)
    t = ipfx.transform(model, example_inputs=(x,))
    graphs = graph_modules(t)
    assert graphs[True] is not graphs[False]
    def dropout_flags(gm):  # aten.dropout(x, p, train)
        return [n.args[2] for n in gm.graph.nodes if "dropout" in str(n.target)]

    assert dropout_flags(graphs[True]) == [True] and dropout_flags(graphs[False]) in ([], [False])


# -- call patterns of optional arguments (symbolic tracing) ----------------------------------------------------
class Skip(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, skip=None, scale=2.0):
        if skip is not None:
            x = x + skip
        return self.conv(x) * scale


def test_a_symbolic_graph_guards_the_optional_arguments_it_was_traced_without():
    model, x = Skip(), torch.randn(2, 4, 5, 5)
    t = ipfx.transform(model)  # no example inputs: traced with skip=None
    assert_close(t(x), model(x), kind="guard: traced pattern")
    assert_close(t(x, None, 3.0), model(x, None, 3.0), kind="guard: traced pattern, other scale")
    with pytest.warns(UserWarning, match="captured with skip=None but is called with skip=given"):
        assert_close(t(x, x), model(x, x), kind="guard: fallback")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per graph
        t(x, skip=x)
    randomize_masks(t, 0.4)
    perturb_bases(t)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.conv.weight.copy_(t.conv.compose())
    assert_close(t(x, skip=x), reference(x, x), kind="guard: the fallback reads the graph's coefficients")
    t.conv.coeff.grad = None
    t(x, skip=x).sum().backward()
    assert t.conv.coeff.grad is not None  # training through the fallback reaches the same coefficients
    copied = copy.deepcopy(t)
    assert set(copied.state_dict()) == set(t.state_dict()) == {"conv.coeff", "conv.mask", "conv.basis", "conv.bias"}
    assert_close(quiet(copied, x, x), quiet(t, x, x), kind="guard: fallback survives a copy")
    lowered = ipfx.lower(t)
    assert_close(quiet(lowered, x, x), quiet(t, x, x), kind="guard: lowered fallback")
    assert not any(isinstance(m, ipfx.BasisWeight) for m in lowered.meta["ipfx_fallback"].modules())


class Embeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.types = nn.Parameter(torch.randn(4))

    def forward(self, x, token_type_ids=None):
        if token_type_ids is None:
            return self.proj(x)
        return self.proj(x) + token_type_ids[..., None] * self.types


class Encoder2(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embeddings = Embeddings()
        self.out = nn.Linear(4, 2)

    def forward(self, x, token_type_ids=None):
        if x.sum() > -1e9:  # untraceable root: its children are captured on their own
            x = self.embeddings(x, token_type_ids)
        return self.out(x)


@pytest.mark.parametrize("traced_with", [None, "tokens"])
def test_parts_traced_with_the_observed_pattern_fall_back_on_the_other(traced_with):
    model, x, tokens = Encoder2(), torch.randn(2, 3, 4), torch.ones(2, 3)
    example = {"token_type_ids": tokens} if traced_with else {}
    t = quiet(ipfx.transform, model, example_inputs=(x,), example_kwargs=example, capture="symbolic")
    assert {w.name for w in ipfx.rewritten_weights(t)} == {"embeddings.proj.weight", "out.weight"}
    for call in ({}, {"token_type_ids": tokens}):
        assert_close(quiet(t, x, **call), model(x, **call), kind="guard: partial part, both patterns")


# -- call patterns of an exported graph: the example call, other calls through the forward ---------------------
class Classifier(nn.Module):
    """A Hugging Face-like head: a loss when labels are given, options through ``**kwargs``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, pixel_values=None, labels=None, scale: float = 1.0, **kwargs):
        features = self.bn(self.conv(pixel_values)).relu().mean((2, 3))
        logits = self.head(features) * scale
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        if kwargs.get("output_features"):
            out["features"] = features
        return out


def _same_output(a: dict, b: dict, kind: str) -> None:
    assert set(a) == set(b), f"{kind}: keys {sorted(a)} != {sorted(b)}"
    for key in a:
        assert_close(a[key], b[key], kind=f"{kind}: {key}")


CALLS = {
    "pixels": lambda x, y: {"pixel_values": x},
    "labels=None": lambda x, y: {"pixel_values": x, "labels": None},
    "labels": lambda x, y: {"pixel_values": x, "labels": y},
    "positional labels": lambda x, y: {"args": (x, y)},
    "scale": lambda x, y: {"pixel_values": x, "scale": 2.0},
    "**kwargs option": lambda x, y: {"pixel_values": x, "output_features": True},
}


def _call(model, x, y, name):
    call = dict(CALLS[name](x, y))
    return quiet(model, *call.pop("args", ()), **call)


@pytest.mark.parametrize("example", ["pixels", "labels", "positional labels", "**kwargs option"])
def test_an_exported_graph_takes_every_call_pattern_of_the_forward(example):
    model, x, y = Classifier().eval(), torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    call = dict(CALLS[example](x, y))
    t = ipfx.transform(model, example_inputs=call.pop("args", ()), example_kwargs=call)
    assert {w.capture for w in ipfx.rewritten_weights(t)} == {"export"}
    assert inspect.signature(t.forward) == inspect.signature(model.forward)  # labels=None, **kwargs included
    other = (torch.randn(3, 3, 10, 10), torch.tensor([1, 1, 0]))
    for form in ("transformed", "dense", "fused"):
        result = t if form == "transformed" else quiet(ipfx.lower, t, form)
        assert inspect.signature(result.forward) == inspect.signature(model.forward), form
        for name in CALLS:
            for inputs in ((x, y), other):
                _same_output(_call(result, *inputs, name), _call(model, *inputs, name), f"{form}, {name}")


def test_a_call_of_another_pattern_warns_once_and_trains_the_same_coefficients():
    model, x, y = Classifier(), torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    t = ipfx.transform(model, example_inputs=(x,), example_kwargs={"labels": y})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t(x, labels=y)  # the example's own pattern: the graph, no warning
    with pytest.warns(UserWarning, match=r"captured with \(pixel_values, labels\) given but is called with \(pixel_values\) given"):
        t(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per graph
        t(pixel_values=x, labels=None)
    t.conv.coeff.grad = None
    t(x)["logits"].sum().backward()
    assert t.conv.coeff.grad is not None and t.conv.coeff.grad.abs().sum() > 0


def test_an_example_given_by_keyword_alone_is_exported():
    model, x = Classifier().eval(), torch.randn(2, 3, 8, 8)
    t = ipfx.transform(model, example_kwargs={"pixel_values": x})
    assert {w.capture for w in ipfx.rewritten_weights(t)} == {"export"}
    _same_output(t(pixel_values=x), model(pixel_values=x), "keyword example")


def test_the_example_call_records_what_export_fixes():
    from ipfx.capture.guards import ExampleCall

    forward = Classifier().forward
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    pattern = ExampleCall.record(forward, (x,), {"labels": y, "scale": 1.0})
    assert dict(pattern.given).keys() == {"pixel_values", "labels"}  # scale at its default is left out
    assert pattern.graph_call({"pixel_values": x, "labels": y}) == ([x], {"labels": y, "scale": 1.0})
    bind = pattern.bind
    assert pattern.matches(bind((x, y), {}))
    assert not pattern.matches(bind((x,), {}))
    assert not pattern.matches(bind((x, y), {"scale": 2.0}))  # a constant export fixed: another value
    assert not pattern.matches(bind((x, y), {"output_features": True}))
    assert pattern.matches(bind((x, y), {"output_features": None}))  # None through **kwargs: left out
    assert not pattern.matches(bind((x, (y, y)), {}))  # another structure
    assert bind((x,), {"pixel_values": x}) is None  # not a call of this signature: the graph says so
    assert ExampleCall.record(forward, (x,), {"labels": object()}) is None  # nothing export could fix


class Plain(nn.Module):
    """No batch norm, no dropout: one graph for both modes; a tensor constant export lifts."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.offset = torch.arange(4.0)  # a plain tensor attribute: export lifts it as a constant
        self.register_buffer("scratch", torch.zeros(1), persistent=False)

    def forward(self, x):
        return self.conv(x).mean((2, 3)) + self.offset + self.scratch


def test_export_keeps_the_mode_and_the_state_dict_of_the_model():
    model, x = Plain().eval(), torch.randn(2, 3, 6, 6)
    t = ipfx.transform(model, example_inputs=(x,))
    assert isinstance(t, fx.GraphModule) and not t.training
    assert not any(m.training for m in t.modules())
    assert_close(t(x), model(x), kind="export: one graph for both modes")
    lowered = ipfx.lower(t)
    assert set(lowered.state_dict()) == set(model.state_dict()) == {"conv.weight", "conv.bias"}
    Plain().load_state_dict(lowered.state_dict(), strict=True)


def test_raw_kernels_of_untraced_code_are_reported_and_captured_by_export():
    class RawUntraced(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))

        def forward(self, x):
            if x.shape[-1] > 2:  # a size test: untraceable by torch.fx, fine for torch.export
                return F.conv2d(x, self.w)
            return x

    model, x = RawUntraced(), torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="kernel-shaped parameter.*: w\\."):
        quiet_off = ipfx.transform(model, capture="symbolic")
    assert isinstance(quiet_off.w, nn.Parameter)
    t = ipfx.transform(model, example_inputs=(x,))  # export captures the call: w is a kernel
    assert [(w.name, w.capture) for w in ipfx.rewritten_weights(t)] == [("w", "export")]
    assert_close(t(x), model(x), kind="export: raw kernel of untraceable code")


class Conv1D(nn.Module):
    """transformers' Conv1D: a linear layer with its weight stored (in, out), read by torch.addmm."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(nx, nf)), nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


def test_weights_of_other_module_types_in_untraced_code_are_named_not_left_dense_silently():
    """Without example inputs, a Conv1D (not a module type the config selects) in code torch.fx cannot trace
    stays dense: the warning names it (it said only that the code was kept as Python); an embedding's or a
    norm's weight is not named; with example inputs torch.export captures it as a kernel."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.norm, self.proj = nn.Embedding(10, 6), nn.LayerNorm(6), Conv1D(6, 6)

        def forward(self, ids):
            h = self.norm(self.emb(ids))
            if h.dim() == 3:  # untraceable by torch.fx (a branch on a size > 1 exports wrongly at size 1: refused)
                h = self.proj(h)
            return h

    model, ids = Block().eval(), torch.randint(0, 10, (2, 3))
    with pytest.warns(UserWarning, match=r"kernel-shaped parameter\(s\) of untraced Python code dense: "
                                         r"proj\.weight\. If") as seen:
        ipfx.transform(model, capture="symbolic")
    assert not any("emb.weight" in str(w.message) or "norm.weight" in str(w.message) for w in seen)
    t = ipfx.transform(model, example_inputs=(ids,))
    assert "proj.weight" in {w.name for w in ipfx.rewritten_weights(t)}
    assert_close(t(ids), model(ids), kind="export: Conv1D kernel")


class _NormAct(nn.BatchNorm2d):
    """A batch norm with its own Python forward, as timm's BatchNormAct2d: it counts batches in place."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.add_(1)
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
        return self.act(y)


class _ConvNormAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = _NormAct(6)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("front", FRONT_ENDS)
def test_a_batch_norm_with_its_own_forward_keeps_its_counter(front):
    """Traced into, its in-place ``num_batches_tracked.add_(1)`` ran once at trace time, on the user's
    model, and was lost: from the graph and from the state dict."""
    model = _ConvNormAct().train()
    x = torch.randn(2, 3, 8, 8)
    t = quiet(ipfx.transform, model, example_inputs=(x,), capture=front)
    assert int(model.bn.num_batches_tracked) == 0  # the user's model is untouched
    assert "bn.num_batches_tracked" in t.state_dict()
    t.train()
    t(x)
    t(x)
    assert int(t.state_dict()["bn.num_batches_tracked"]) == 2
    dense = ipfx.lower(t, "dense")
    fresh = _ConvNormAct()
    fresh.load_state_dict(dense.state_dict(), strict=True)
    assert int(fresh.bn.num_batches_tracked) == 2
    fresh.eval()
    dense.eval()
    assert torch.allclose(fresh(x), dense(x), atol=1e-5)


def test_transform_traces_after_a_pickled_guarded_graph_was_loaded():
    """Loading a pickled graph that checks an argument traced as None leaves torch.fx a leaf-function
    registration no trace can honour (torch 2.14: every later trace raised KeyError); ipfx drops it first."""
    x = torch.randn(1, 3, 8, 8)
    t = ipfx.transform(OptionalScale())
    t(x)
    buffer = io.BytesIO()
    torch.save(ipfx.lower(t, "fused"), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    model = OptionalScale()
    again = ipfx.transform(model)
    assert isinstance(again, fx.GraphModule)  # traced, not kept as Python code
    with torch.no_grad():
        assert_close(loaded(x), t(x), kind="loaded lowered graph")
        assert_close(again(x), model(x), kind="traced after a load")


@pytest.mark.parametrize("example", [True, False])
def test_lazy_modules_never_called_are_refused_saying_to_call_the_model_first(example):
    """A model of lazy modules not yet called has no weights: without example inputs it was transformed with
    nothing rewritten (no warning), with them capture failed inside torch; now either says what to do, and
    after one call the model transforms with every weight rewritten."""
    model = nn.Sequential(nn.LazyConv2d(6, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4)).eval()
    x = torch.randn(2, 3, 10, 10)
    with pytest.raises(ipfx.errors.IPFXValueError, match=r"lazy modules .*0\.weight.*call the model once"):
        ipfx.transform(model, example_inputs=(x,) if example else None)
    model(x)
    t = quiet(ipfx.transform, model, example_inputs=(x,) if example else None)
    assert {w.name for w in ipfx.rewritten_weights(t)} == {"0.weight", "3.weight"}
    assert_close(t(x), model(x), kind="lazy modules after their first call")


class _Cache:
    """An output object without ==, as transformers' DynamicCache."""


class ReturnsCache(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x), _Cache()


def test_an_output_object_without_equality_is_named_as_the_reason_not_printed_twice():
    """Two caches print alike, so the check said "output 1: <cache> instead of <cache>"; it now says that the
    object cannot be compared and what to return instead."""
    with pytest.raises(ipfx.errors.TraceError, match=r"output 1: a _Cache, which has no == .*use_cache=False"):
        quiet(ipfx.transform, ReturnsCache().eval(), example_inputs=(torch.randn(2, 3, 8, 8),))


class _Counted(nn.Module):
    """A stack of convs and a counter the output reads (``n = n + 1``)."""

    def __init__(self, depth: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, 3, 3, padding=1) for _ in range(depth))
        self.register_buffer("n", torch.ones(()))

    def forward(self, x):
        for conv in self.convs:
            x = conv(x)
        self.n = self.n + 1
        return x * self.n


def test_threads_transforming_models_at_once_each_get_their_own_graph():
    """torch.fx patches ``nn.Module.__call__`` and ``__getattr__`` for the whole process while it traces: three
    threads transforming models at once ran into each other's patches (transforms failed, "module is not installed
    as a submodule", and patches were left in place for every later model). ipfx's traces take turns: each model
    computes what it computes, counter included, and nn.Module is as it was."""
    import threading

    before = {k: nn.Module.__dict__.get(k) for k in ("__setattr__", "__call__", "__getattr__")}
    x = torch.randn(1, 3, 6, 6)
    for trial in range(3):
        models = [_Counted(4 + 3 * i).eval() for i in range(3)]
        references = [copy.deepcopy(m) for m in models]
        results: list = [None] * 3

        def work(i):
            try:
                results[i] = quiet(ipfx.transform, models[i])
            except Exception as exc:  # noqa: BLE001 - reported below
                results[i] = exc

        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert {k: nn.Module.__dict__.get(k) for k in before} == before, f"trial {trial}: nn.Module left patched"
        for t, reference in zip(results, references):
            assert not isinstance(t, Exception), f"trial {trial}: {t!r}"
            for _ in range(2):
                assert_close(t(x), reference(x), kind="transformed in threads at once")
            assert t.state_dict()["n"].item() == reference.n.item() == 3
