"""The shared strategies produce valid, deterministic, traceable things and reach the interesting corners."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, event, find, given, settings
from hypothesis import strategies as st

from strategies import (
    MAX_CHANNELS,
    MAX_SPATIAL,
    NAMED_MODELS,
    ConvConfig,
    FunctionalConv,
    FunctionalLinear,
    GraphRecipe,
    ModelCase,
    RecipeNet,
    SameEvenConv,
    TinyResNet,
    WSConv2d,
    conv_configs,
    functional_conv_models,
    graph_recipes,
    masks_like,
    named_models,
    random_graph_models,
    seeded_init_,
    sparsities,
    trace_into_convs,
)

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions are dominated by thread-pool overhead: on a 2-core machine 300 convs take ~4 s with
    # two threads and ~0.1 s with one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
# find() only needs a witness, not a minimal one: skip shrinking to keep the file fast.
FIND = settings(max_examples=5000, deadline=None, database=None, phases=[Phase.generate])


def _pad_kind(cfg: ConvConfig) -> str:
    return cfg.padding if isinstance(cfg.padding, str) else type(cfg.padding).__name__


# ---- ConvConfig --------------------------------------------------------------------------------------------


@settings(FAST, max_examples=150)
@given(conv_configs())
def test_conv_config_builds_and_runs(cfg: ConvConfig):
    event(f"{cfg.module_class.__name__}")
    event(f"padding={_pad_kind(cfg)} mode={cfg.padding_mode}")
    event("groups: " + ("depthwise" if cfg.is_depthwise else "grouped" if cfg.groups > 1 else "1"))
    assert cfg.in_channels <= MAX_CHANNELS and cfg.out_channels <= MAX_CHANNELS
    assert max(cfg.input_size) <= MAX_SPATIAL[cfg.dims]
    m = cfg.build()
    assert type(m) is cfg.module_class
    assert tuple(m.weight.shape) == cfg.weight_shape
    assert m.weight.dtype == torch.float64
    x = cfg.example_input()
    assert tuple(x.shape) == cfg.input_shape
    y = m(x)
    assert tuple(y.shape) == cfg.output_shape
    assert torch.isfinite(y).all()
    # seeded: a second build is identical, a float32 build is close
    assert torch.equal(cfg.build().weight, m.weight)
    y32 = cfg.build(torch.float32)(cfg.example_input(dtype=torch.float32))
    torch.testing.assert_close(y32.double(), y, rtol=1e-4, atol=1e-4)
    assert str(cfg).startswith(cfg.module_class.__name__)
    # traceable as a root module, also when tracing into the conv (a transposed root needs concrete_args)
    gm = torch.fx.symbolic_trace(m, concrete_args={"output_size": None} if cfg.transposed else None)
    torch.testing.assert_close(gm(x), y, rtol=0, atol=0)
    torch.testing.assert_close(trace_into_convs(m)(x), y, rtol=0, atol=0)


@settings(FAST, max_examples=60)
@given(conv_configs(dims=2, transposed=False, padding_modes=("reflect", "circular")))
def test_conv_configs_respect_filters(cfg):
    assert cfg.dims == 2 and not cfg.transposed and cfg.padding_mode in ("reflect", "circular")


@settings(FAST, max_examples=40)
@given(conv_configs(transposed=True))
def test_transposed_configs_use_zeros_and_numeric_padding(cfg):
    assert cfg.transposed and cfg.padding_mode == "zeros" and not isinstance(cfg.padding, str)
    assert all(op < max(s, d) for op, s, d in zip(cfg.output_padding, cfg.stride, cfg.dilation))


def _corner(pred, strategy=None):
    return find(strategy if strategy is not None else conv_configs(), pred, settings=FIND)


@pytest.mark.parametrize(
    "name, pred",
    [
        (
            "3-d transposed grouped dilated with output_padding",
            lambda c: c.dims == 3 and c.transposed and c.groups > 1 and max(c.dilation) > 1 and any(c.output_padding),
        ),
        ("1-d circular", lambda c: c.dims == 1 and c.padding_mode == "circular" and max(c.pads[0]) > 0),
        ("depthwise", lambda c: c.is_depthwise and c.in_channels >= 3),
        ("same with even kernel", lambda c: c.padding == "same" and any(k % 2 == 0 for k in c.kernel_size)),
        ("2-d non-square", lambda c: c.dims == 2 and c.kernel_size[0] != c.kernel_size[1]),
        ("3-d reflect", lambda c: c.dims == 3 and c.padding_mode == "reflect" and max(max(p) for p in c.pads) > 0),
        ("valid strided", lambda c: c.padding == "valid" and max(c.stride) > 1),
        ("1x1", lambda c: c.kernel_numel == 1 and c.dims == 2),
        ("replicate same dilated", lambda c: c.padding_mode == "replicate" and c.padding == "same" and max(c.dilation) > 1),
    ],
)
def test_conv_configs_reach_corners(name, pred):
    cfg = _corner(pred)
    assert pred(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = cfg.build()(cfg.example_input())
    assert tuple(y.shape) == cfg.output_shape


def test_conv_config_str_is_readable():
    cfg = ConvConfig(3, True, 4, 6, 2, (3, 2, 1), (2, 1, 1), (1, 2, 1), (1, 0, 0), "zeros", False, (1, 1, 0), 2, (3, 5, 2), 7)
    s = str(cfg)
    assert s == repr(cfg)
    assert s.startswith("ConvTranspose3d(4->6, k=(3,2,1), s=(2,1,1), d=(1,2,1), p=(1, 0, 0), op=(1,1,0), g=2")
    assert "2x4x3x5x2" in s
    y = cfg.build()(cfg.example_input())
    assert tuple(y.shape) == cfg.output_shape


# ---- functional convs ----------------------------------------------------------------------------------------


@settings(FAST, max_examples=100)
@given(conv_configs(), st.sampled_from(["w", "kernel"]))
def test_functional_conv_matches_module(cfg, name):
    f = cfg.build_functional(param_name=name)
    names = [n for n, _ in f.named_parameters()]
    assert "weight" not in names and name in names
    x = cfg.example_input(seed=3)
    torch.testing.assert_close(f(x), cfg.build()(x), rtol=1e-10, atol=1e-10)


@settings(FAST, max_examples=60)
@given(functional_conv_models())
def test_functional_conv_models_run_and_trace(case: ModelCase):
    model, x = case
    assert isinstance(model, nn.Module) and isinstance(x, torch.Tensor)
    assert not any(n.rsplit(".", 1)[-1] == "weight" for n, _ in model.named_parameters())
    y = model(x)
    assert torch.isfinite(y).all()
    gm = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(gm(x), y, rtol=0, atol=0)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert targets & {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.linear}
    assert repr(case).startswith("ModelCase(")


def test_functional_conv_models_reach_linear_and_nesting():
    lin = find(functional_conv_models(), lambda c: isinstance(c.module, FunctionalLinear), settings=FIND)
    assert lin.module(lin.example_input).shape[-1] == lin.module.w.shape[0]
    nested = find(
        functional_conv_models(),
        lambda c: isinstance(getattr(c.module, "block", None), FunctionalConv) and c.module.block.param_name == "kernel",
        settings=FIND,
    )
    assert "block.kernel" in dict(nested.module.named_parameters())


# ---- random graphs -------------------------------------------------------------------------------------------


@settings(FAST, max_examples=100)
@given(graph_recipes(), st.integers(0, 3))
def test_random_graph_models_run_deterministic_and_trace(recipe: GraphRecipe, xseed: int):
    for f in sorted(recipe.features):
        event(f)
    model = recipe.build()
    x = recipe.example_input(xseed)
    assert not model.training
    y = model(x)
    assert y.dim() == 2 and y.shape[0] == x.shape[0]
    assert any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()) or "fconv" in recipe.features
    assert torch.isfinite(y).all()
    # deterministic: the same recipe and seed give the same model and output, a different seed another
    assert torch.equal(recipe.build()(x), y)
    assert torch.equal(model(x), y)
    other = recipe.build(seed=recipe.seed + 1)
    assert not torch.equal(other(x), y)
    # traceable, both with leaf convs and tracing into them
    torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), y, rtol=0, atol=0)
    deep = trace_into_convs(model)
    torch.testing.assert_close(deep(x), y, rtol=1e-12, atol=1e-12)
    assert not any(
        isinstance(deep.get_submodule(n.target), (nn.modules.conv._ConvNd, nn.Linear))
        for n in deep.graph.nodes
        if n.op == "call_module"
    )
    # train mode works too (BatchNorm sees >= 4 values per channel)
    model.train()(x)


@settings(FAST, max_examples=20)
@given(random_graph_models(dtype=torch.float32))
def test_random_graph_models_pairs(case):
    model, x = case
    assert isinstance(model, RecipeNet) and x.dtype == torch.float32
    assert torch.isfinite(model(x)).all()
    assert repr(case).startswith("ModelCase(")


GRAPH_FEATURES = [
    "chain", "res", "cat", "twice", "mode", "inverted", "inplace", "bn", "relu", "fconv", "ws", "reflect", "dw", "pw",
    "convT", "grouped", "same_even", "nonsquare", "pool", "strided", "strided_dw", "up", "gap", "flatten", "linear",
]


@pytest.mark.parametrize("feature", GRAPH_FEATURES)
def test_graph_recipes_reach_every_feature(feature):
    recipe = find(graph_recipes(), lambda r: feature in r.features, settings=FIND)
    model = recipe.build()
    y = model(recipe.example_input())
    assert torch.isfinite(y).all()
    if feature == "twice":
        # one conv module called at two places
        gm = torch.fx.symbolic_trace(model)
        calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
        assert any(calls.count(t) >= 2 for t in calls)
    if feature == "mode":  # the two modes run different layers: plain traces differ
        codes = {torch.fx.symbolic_trace(model.train(mode)).code for mode in (True, False)}
        assert len(codes) == 2
    if feature == "ws":
        assert any(isinstance(m, WSConv2d) for m in model.modules())
    if feature == "fconv":
        assert any("." not in n and not n.endswith(("weight", "bias")) for n, _ in model.named_parameters())


def test_graph_recipe_repr_is_readable():
    recipe = find(graph_recipes(), lambda r: {"res", "cat"} <= r.features, settings=FIND)
    text = repr(recipe)
    assert text.startswith("GraphRecipe(") and "res[" in text and "cat[" in text and "linear(" in text


# ---- named models --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(NAMED_MODELS))
def test_named_models_run_and_trace(name):
    model = NAMED_MODELS[name](seed=1).double().eval()
    x = model.example_input()
    y = model(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), y, rtol=0, atol=0)
    torch.testing.assert_close(trace_into_convs(model)(x), y, rtol=1e-12, atol=1e-12)
    again = NAMED_MODELS[name](seed=1).double().eval()
    assert torch.equal(again(x), y)


def test_named_model_details():
    state = NAMED_MODELS["FunctionalConvNet"]().state_dict()
    assert set(state) == {"w", "b", "fc.weight", "fc.bias"}
    net = TinyResNet()
    assert "layer1.0.conv1.weight" in net.state_dict()
    assert net(net.example_input()).shape == (2, 10)
    m = SameEvenConv()
    x = m.example_input()
    assert m(x).shape[-2:] == x.shape[-2:]
    tw = NAMED_MODELS["TwiceUsedConv"]()
    calls = [n.target for n in torch.fx.symbolic_trace(tw).graph.nodes if n.op == "call_module"]
    assert calls.count("conv") == 2


def test_ws_conv_standardises():
    conv = WSConv2d(2, 3, 3)
    seeded_init_(conv, 0)
    x = torch.randn(1, 2, 5, 5)
    w = conv.weight
    ws = (w - w.mean((1, 2, 3), keepdim=True)) / torch.sqrt(w.var((1, 2, 3), keepdim=True, correction=0) + 1e-5)
    torch.testing.assert_close(conv(x), F.conv2d(x, ws, conv.bias))


def test_building_does_not_touch_global_rng():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    TinyResNet()
    RecipeNet(find(graph_recipes(), lambda r: True, settings=FIND))
    ConvConfig(2, False, 2, 2, 1, (3, 3), (1, 1), (1, 1), 1, "zeros", True, (0, 0), 1, (4, 4)).build()
    assert torch.equal(torch.get_rng_state(), before)


@settings(FAST, max_examples=15)
@given(named_models())
def test_named_models_strategy(case):
    model, x = case
    assert torch.isfinite(model(x)).all()


# ---- masks and sparsities ------------------------------------------------------------------------------------

_T = torch.zeros(4, 3, 2, dtype=torch.float64)


@settings(FAST, max_examples=50)
@given(masks_like(_T))
def test_masks_like(mask):
    assert mask.shape == _T.shape and mask.dtype == _T.dtype
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    event(f"kept: {'none' if mask.sum() == 0 else 'all' if mask.sum() == mask.numel() else 'some'}")


def test_masks_like_reach_none_all_and_some():
    n = _T.numel()
    assert find(masks_like(_T), lambda m: m.sum() == 0, settings=FIND).sum() == 0
    assert find(masks_like(_T), lambda m: m.sum() == n, settings=FIND).sum() == n
    assert 0 < find(masks_like(_T), lambda m: 0 < m.sum() < n, settings=FIND).sum() < n
    assert find(masks_like(torch.zeros(3, dtype=torch.int64)), lambda m: True, settings=FIND).dtype == torch.float32


@settings(FAST, max_examples=50)
@given(sparsities(), sparsities(0.5, 1.0))
def test_sparsities(s, t):
    assert 0.0 <= s <= 0.99 and 0.5 <= t <= 1.0
