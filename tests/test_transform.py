"""ipfx.transform: function preservation, the state it creates, and what it must keep."""

import copy
import io
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import ipfx
from helpers import assert_close, perturb_bases, randomize_masks
from strategies import (
    TinyResNet,
    TwiceUsedConv,
    WSConv2d,
    conv_configs,
    functional_conv_models,
    random_graph_models,
)

spaces = st.sampled_from(["ip", "sp"])


def quiet_transform(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 'same' padding with even kernels warns in torch
        return ipfx.transform(model, **kwargs)


def run(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return model(x)


# -- function preservation -------------------------------------------------------------------------
@given(conv_configs(), spaces, st.booleans())
def test_transform_preserves_any_convolution(cfg, space, train):
    model = cfg.build().train(train)
    x = cfg.example_input()
    t = quiet_transform(model, space=space)
    assert_close(run(t, x), run(model, x), kind="transform: single conv")
    (info,) = ipfx.rewritten_weights(t)
    assert info.name == "weight" or info.name.endswith("weight")
    assert info.shape == tuple(model.weight.shape)
    expected_space = "sp" if cfg.kernel_numel == 1 else space
    assert info.space == expected_space


@given(random_graph_models(train=True), spaces)
def test_transform_preserves_random_graphs_in_train_and_eval(case, space):
    model, x = case
    t = quiet_transform(model, space=space)
    # in train mode batch norm updates its running stats, in both models alike
    assert_close(run(t, x), run(model, x), kind="transform: random graph (train)")
    model.eval()
    t.eval()
    assert_close(run(t, x), run(model, x), kind="transform: random graph (eval)")
    n_kernels = sum(1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)))
    n_raw = sum(1 for n, _ in model.named_parameters() if not n.endswith(("weight", "bias")))
    assert len(ipfx.rewritten_weights(t)) == n_kernels + n_raw


@given(functional_conv_models(), spaces)
def test_transform_rewrites_functional_kernels(case, space):
    model, x = case
    t = quiet_transform(model, space=space)
    assert_close(run(t, x), run(model, x), kind="transform: functional kernel")
    names = {w.name for w in ipfx.rewritten_weights(t)}
    kernels = {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert names == kernels
    for n in kernels:  # "w" -> "w.coeff", "block.kernel" -> "block.kernel.coeff"
        assert f"{n}.coeff" in t.state_dict() and f"{n}.mask" in t.state_dict()


def test_weight_standardisation_keeps_its_semantics():
    torch.manual_seed(0)
    model = nn.Sequential(WSConv2d(3, 4, 3, padding=1), nn.ReLU(), WSConv2d(4, 2, 3))
    x = torch.randn(2, 3, 8, 8)
    t = ipfx.transform(model)
    assert_close(t(x), model(x), kind="transform: weight standardisation")
    randomize_masks(t, 0.5)
    perturb_bases(t)
    # the module's own forward still standardises whatever weight the coefficients compose
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for i in ("0", "2"):
            reference.get_submodule(i).weight.copy_(t.get_submodule(i).compose())
    assert_close(t(x), reference(x), kind="transform: weight standardisation")


def test_kernels_computed_from_inputs_are_left_alone():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 3 * 3 * 3 * 3)

        def forward(self, x):
            kernel = self.proj(x.mean((2, 3))).mean(0).reshape(3, 3, 3, 3)
            return F.conv2d(x[:, :3], kernel)

    model = Dynamic()
    x = torch.randn(2, 4, 6, 6)
    t = ipfx.transform(model)
    assert [w.name for w in ipfx.rewritten_weights(t)] == ["proj.weight"]
    assert_close(t(x), model(x), kind="transform: dynamic kernel")


# -- state -------------------------------------------------------------------------------------------
def test_state_dict_names_follow_the_contract():
    model = TinyResNet(seed=0)
    t = ipfx.transform(model)
    sd = t.state_dict()
    for name, p in model.named_parameters():
        if name.endswith(".weight") and p.dim() in (2, 4):
            prefix = name[: -len(".weight")]
            assert f"{prefix}.coeff" in sd and f"{prefix}.mask" in sd, name
            assert name not in sd
            k = p[0, 0].numel() if p.dim() == 4 else 1
            assert (f"{prefix}.basis" in sd) == (k > 1), name
        else:
            assert name in sd, name  # batch norm, biases: unchanged names
    for name, b in model.named_buffers():
        assert torch.equal(sd[name], b), name  # running stats kept


def test_masks_are_persistent_buffers_and_start_all_ones():
    t = ipfx.transform(TinyResNet(seed=1))
    for m in t.modules():
        if isinstance(m, ipfx.BasisWeight):
            assert "mask" in dict(m.named_buffers())
            assert "mask" not in m._non_persistent_buffers_set
            assert torch.all(m.mask == 1)
    assert ipfx.sparsity(t) == 0.0


def test_spaces_and_basis_options():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, (1, 3)))
    ip = ipfx.transform(model)
    assert all(isinstance(ip.get_submodule(i).basis, nn.Parameter) for i in "012")
    assert torch.allclose(ip.get_submodule("0").basis, ipfx.form.bases.dct_basis((3, 3)).float())
    sp = ipfx.transform(model, space="sp")
    for i in "012":
        m = sp.get_submodule(i)
        assert not isinstance(m.basis, nn.Parameter) and "basis" in dict(m.named_buffers())
        assert torch.equal(m.basis, torch.eye(m.basis.shape[0]))
    fixed = ipfx.transform(model, basis="dct", train_basis=False)
    assert not any(n.endswith("basis") for n, _ in fixed.named_parameters())
    assert "0.basis" in fixed.state_dict()
    shared = ipfx.transform(model, share_basis=True)
    assert shared.get_submodule("0").basis is shared.get_submodule("1").basis
    assert shared.get_submodule("2").basis is not shared.get_submodule("0").basis  # other kernel shape
    assert {"0.basis", "1.basis", "2.basis"} <= set(shared.state_dict())
    assert sum(1 for n, _ in shared.named_parameters() if n.endswith("basis")) == 2
    rnd = ipfx.transform(model, basis="random")
    b = rnd.get_submodule("0").basis
    assert torch.allclose(b @ b.T, torch.eye(9), atol=1e-5) and not torch.allclose(b, torch.eye(9))
    x = torch.randn(1, 3, 9, 9)
    for t in (ip, sp, fixed, shared, rnd):
        assert_close(t(x), model(x), kind="transform: basis options")


def test_shared_basis_trains_as_one_parameter():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
    t = ipfx.transform(model, share_basis=True)
    t(torch.randn(1, 2, 5, 5)).square().sum().backward()
    basis = t.get_submodule("0").basis
    assert basis.grad is not None and basis.grad.abs().sum() > 0  # gradient pooled from both layers


def test_config_filters_and_overrides():
    model = TinyResNet(seed=0)
    names = [n for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() in (2, 4)]
    only_fc = ipfx.transform(model, config=ipfx.TransformConfig(include=["fc.*"]))
    assert [w.name for w in ipfx.rewritten_weights(only_fc)] == [n for n in names if n.startswith("fc.")]
    no_stem = ipfx.transform(model, config=ipfx.TransformConfig(exclude=["conv1*"]))
    assert all(not w.name.startswith("conv1") for w in ipfx.rewritten_weights(no_stem))
    convs_only = ipfx.transform(model, config=ipfx.TransformConfig(include_linear=False))
    assert all(w.kind != "linear" for w in ipfx.rewritten_weights(convs_only))
    k3 = ipfx.transform(model, config=ipfx.TransformConfig(kernel_sizes=[(3, 3)]))
    assert all(w.shape[2:] == (3, 3) for w in ipfx.rewritten_weights(k3) if w.kind != "linear")
    mixed = ipfx.transform(model, config=ipfx.TransformConfig(overrides={"layer1.*": {"space": "sp"}}))
    for w in ipfx.rewritten_weights(mixed):
        if w.basis != "none":
            assert w.space == ("sp" if w.name.startswith("layer1.") else "ip"), w
    x = model.example_input(batch=2)
    for t in (only_fc, no_stem, convs_only, k3, mixed):
        assert_close(t(x), model(x), kind="transform: config", rtol=1e-6)


def test_listing_of_rewritten_weights():
    t = ipfx.transform(TinyResNet(seed=0))
    infos = ipfx.rewritten_weights(t)
    assert infos and all(i.kept == i.total for i in infos)
    assert "fc.weight" in str(infos[-1]) and "linear" in str(infos[-1])


# -- what must be kept ---------------------------------------------------------------------------------
def test_original_model_is_not_mutated():
    model = TinyResNet(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    t = ipfx.transform(model)
    randomize_masks(t, 0.3)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(1.0)
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not isinstance(m, ipfx.BasisWeight) for m in model.modules())


def test_dtype_device_training_flag_and_frozen_parameters_are_kept():
    model = TinyResNet(seed=0).double().eval()
    model.conv1.weight.requires_grad_(False)
    t = ipfx.transform(model)
    assert not t.training and all(not m.training for m in t.modules())
    stem = t.get_submodule("conv1")
    assert stem.coeff.dtype == stem.basis.dtype == stem.mask.dtype == torch.float64
    assert not stem.coeff.requires_grad and not stem.basis.requires_grad
    assert all(p.requires_grad for n, p in t.named_parameters() if not n.startswith("conv1."))
    x = model.example_input(batch=1, dtype=torch.float64)
    assert t(x).dtype == torch.float64
    t.train()
    assert all(m.training for m in t.modules())


def test_module_called_twice_gets_one_coefficient_set():
    model = TwiceUsedConv(seed=0)
    t = ipfx.transform(model)
    convs = [w for w in ipfx.rewritten_weights(t) if w.kind == "conv"]
    assert len(convs) == len({w.prefix for w in convs})
    shared = [n for n in t.graph.nodes if n.op == "get_attr" and n.target.endswith(".coeff")]
    assert len(shared) == len({n.target for n in shared})
    x = model.example_input(batch=2)
    assert_close(t(x), model(x), kind="transform: module called twice")


def test_tied_weights_are_rewritten_once():
    a = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Sequential(a, nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1))
    model[2].weight = a.weight
    t = ipfx.transform(model)
    assert len(ipfx.rewritten_weights(t)) == 1
    x = torch.randn(1, 3, 6, 6)
    assert_close(t(x), model(x), kind="transform: tied weights")


# -- serialisation ----------------------------------------------------------------------------------
def _prepared(seed=0):
    t = ipfx.transform(TinyResNet(seed=seed))
    randomize_masks(t, 0.4, seed=seed)
    perturb_bases(t, seed=seed)
    return t


def test_state_dict_round_trip_into_a_fresh_transform():
    t = _prepared()
    fresh = ipfx.transform(TinyResNet(seed=5))
    fresh.load_state_dict(t.state_dict(), strict=True)
    x = TinyResNet(seed=0).example_input(batch=2)
    assert_close(fresh(x), t(x), kind="serialisation: state_dict", rtol=0)
    assert ipfx.sparsity(fresh) == ipfx.sparsity(t) > 0


def test_deepcopy_and_whole_module_save_load_keep_everything():
    t = _prepared()
    x = TinyResNet(seed=0).example_input(batch=2)
    y = t(x)
    c = copy.deepcopy(t)
    assert_close(c(x), y, kind="serialisation: deepcopy", rtol=0)
    buf = io.BytesIO()
    torch.save(t, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert_close(loaded(x), y, kind="serialisation: torch.save", rtol=0)
    assert ipfx.sparsity(loaded) == ipfx.sparsity(t)
    # a reloaded model can still be lowered: lowering reads the graph, not node metadata
    for target in ("dense", "fused"):
        assert_close(ipfx.lower(loaded, target)(x), y, kind=f"serialisation: lower({target}) after load")


# -- gradients and masks ------------------------------------------------------------------------------
def test_masked_coefficients_get_zero_gradient():
    t = _prepared()
    x = TinyResNet(seed=0).example_input(batch=2)
    t(x).square().sum().backward()
    for m in t.modules():
        if isinstance(m, ipfx.BasisWeight):
            assert torch.all(m.coeff.grad[m.mask == 0] == 0)
            assert m.coeff.grad[m.mask == 1].abs().sum() > 0
            if m.trains_basis:
                assert m.basis.grad is not None  # the basis gets a dense gradient


def test_all_ones_mask_leaves_outputs_and_gradients_unchanged():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    t = ipfx.transform(model, space="sp")
    model(x).sum().backward()
    t(x).sum().backward()
    conv = t.get_submodule("0")
    # spatial basis: dL/dcoeff = dL/dW (reshaped), exactly the original weight gradient
    assert torch.allclose(conv.coeff.grad.reshape(model[0].weight.shape), model[0].weight.grad)
    assert torch.allclose(t.get_submodule("2").coeff.grad, model[2].weight.grad)


@settings(max_examples=10)
@given(st.integers(0, 2**16), spaces)
def test_optimizer_steps_never_let_masked_coefficients_act(seed, space):
    torch.manual_seed(seed)
    model = TinyResNet(seed=seed)
    t = ipfx.transform(model, space=space)
    randomize_masks(t, 0.3, seed=seed)
    opt = torch.optim.SGD(t.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    x = model.example_input(batch=4, seed=seed)
    target = torch.randint(0, 10, (4,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(t(x), target).backward()
        opt.step()
    t.eval()
    y = t(x)
    with torch.no_grad():  # whatever the masked coefficients hold, they do not reach the output
        for m in t.modules():
            if isinstance(m, ipfx.BasisWeight):
                m.coeff[m.mask == 0] = torch.randn(int((m.mask == 0).sum())) * 100
    assert_close(t(x), y, kind="masks: optimizer steps", rtol=0)
    assert_close(ipfx.lower(t)(x), y, kind="masks: optimizer steps, lowered")


def pad_same(x, kernel_size, stride):
    """TensorFlow-style 'same' padding computed from the input size at run time (as in timm)."""
    ih, iw = x.shape[-2:]
    (kh, kw), (sh, sw) = kernel_size, stride
    ph = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
    pw = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


torch.fx.wrap("pad_same")  # a leaf function for torch.fx, the way timm registers its own


class RuntimeSamePadConv(nn.Conv2d):
    def forward(self, x):
        x = pad_same(x, self.weight.shape[-2:], self.stride)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_padding_computed_at_run_time_keeps_its_semantics():
    torch.manual_seed(0)
    model = nn.Sequential(RuntimeSamePadConv(3, 4, (3, 4), stride=2), nn.ReLU(), RuntimeSamePadConv(4, 2, 3))
    t = ipfx.transform(model)
    assert len(ipfx.rewritten_weights(t)) == 2
    for size in ((9, 9), (10, 7)):  # the padding follows the input size
        x = torch.randn(1, 3, *size)
        assert_close(t(x), model(x), kind="transform: run-time padding")
    randomize_masks(t, 0.5)
    x = torch.randn(2, 3, 11, 8)
    with torch.no_grad():
        assert_close(ipfx.lower(t, "fused")(x), t(x), kind="lower: fused, run-time padding")


def test_sp_composes_each_weight_with_one_elementwise_op_and_ip_with_one_product():
    """SP's basis is the identity: its graph skips the product (as cheap as torch.nn.utils.prune)."""
    model = TinyResNet(seed=0).eval()
    x = model.example_input(batch=2)
    for space in ("sp", "ip"):
        t = ipfx.transform(model, space=space)
        calls = [n.target for n in t.graph.nodes if n.op == "call_function"]
        weights = ipfx.rewritten_weights(t)
        with_basis = sum(1 for w in weights if w.basis != "none")
        assert calls.count(torch.mul) == len(weights)
        assert calls.count(torch.matmul) == (with_basis if space == "ip" else 0)
        assert all(f"{w.prefix}.basis" in t.state_dict() for w in weights if w.basis != "none")
        randomize_masks(t, 0.5)
        module = t.get_submodule(weights[0].prefix)
        assert torch.equal(module.compose(), module.fold()), "the eager compose is the graph's"
        assert_close(ipfx.lower(t)(x), t(x), kind=f"transform: {space} compose")
