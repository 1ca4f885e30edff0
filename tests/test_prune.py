"""ipfx.prune against the definitions of its methods, computed independently in the tests."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import ipfx
from ipfx.errors import IPFXValueError, NotTransformedError
from strategies import TinyResNet

spaces = pytest.mark.parametrize("space", ["ip", "sp"])


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(8, 8, 1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    ).double()


def batches(n=2, seed=0, batch=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (batch,), generator=g))
            for _ in range(n)]


def masks(model):
    return [m.mask.clone() for m in model.modules() if isinstance(m, ipfx.BasisWeight)]


def kernel_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def coeff_view(weight, basis):
    """Coefficient-space view of a weight-space tensor T: T_flat @ B^T (dL/dC = dL/dW @ B^T)."""
    if weight.dim() == 2 or weight[0, 0].numel() == 1:
        return weight
    return weight.reshape(weight.shape[0], weight.shape[1], -1) @ basis.T


def global_topk(scores, sparsity):
    flat = torch.cat([s.reshape(-1) for s in scores])
    k = round((1 - sparsity) * flat.numel())
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, k).indices] = True
    out, i = [], 0
    for s in scores:
        out.append(keep[i:i + s.numel()].reshape(s.shape).to(torch.float64))
        i += s.numel()
    return out


# -- definitions ------------------------------------------------------------------------------------
@spaces
def test_magnitude_is_the_global_topk_of_coefficient_magnitudes(space):
    t = ipfx.transform(small_cnn(), space=space)
    expected = global_topk([m.coeff.detach().abs() for m in t.modules() if isinstance(m, ipfx.BasisWeight)], 0.7)
    ipfx.prune(t, "magnitude", 0.7)
    assert all(torch.equal(a, b) for a, b in zip(masks(t), expected))


def test_magnitude_compares_layers_with_unit_norm_basis_rows():
    t = ipfx.transform(small_cnn())
    scaled = copy.deepcopy(t)
    with torch.no_grad():  # scale basis rows up and coefficients down: same function, same scores
        for m in scaled.modules():
            if isinstance(m, ipfx.BasisWeight) and m.basis is not None:
                s = torch.linspace(0.5, 4.0, m.basis.shape[0], dtype=m.basis.dtype)
                m.basis.mul_(s[:, None])
                m.coeff.div_(s)
    ipfx.prune(t, "magnitude", 0.6)
    ipfx.prune(scaled, "magnitude", 0.6)
    assert all(torch.equal(a, b) for a, b in zip(masks(t), masks(scaled)))


@spaces
def test_snip_is_the_topk_of_coefficient_times_gradient(space):
    model = small_cnn()
    data = batches(2)
    t = ipfx.transform(model, space=space)
    # independently: gradients of the original model's weights, mapped to coefficient space
    model.zero_grad()
    for x, y in data:
        F.cross_entropy(model(x), y).backward()
    bws = [m for m in t.modules() if isinstance(m, ipfx.BasisWeight)]
    scores = [(m.coeff.detach() * coeff_view(w.grad, m.basis)).abs() for m, w in zip(bws, kernel_weights(model))]
    expected = global_topk(scores, 0.8)
    ipfx.prune(t, "snip", 0.8, data=data, loss_fn=F.cross_entropy, batches=2)
    assert all(torch.equal(a, b) for a, b in zip(masks(t), expected))


@spaces
def test_grasp_prunes_the_largest_minus_coefficient_times_hessian_gradient(space):
    model = small_cnn().eval()
    data = batches(1)
    t = ipfx.transform(model, space=space).eval()
    weights = kernel_weights(model)
    x, y = data[0]
    g = torch.autograd.grad(F.cross_entropy(model(x) / 200.0, y), weights)
    grads = torch.autograd.grad(F.cross_entropy(model(x) / 200.0, y), weights, create_graph=True)
    hg = torch.autograd.grad(sum((a * b).sum() for a, b in zip(grads, g)), weights)
    bws = [m for m in t.modules() if isinstance(m, ipfx.BasisWeight)]
    # with an orthonormal basis, H_C g_C = (H_W g_W) B^T; GraSP removes the largest -C * H g
    grasp = [-(m.coeff.detach() * coeff_view(h, m.basis)) for m, h in zip(bws, hg)]
    expected = global_topk([-s for s in grasp], 0.5)
    ipfx.prune(t, "grasp", 0.5, data=data, loss_fn=F.cross_entropy)
    assert all(torch.equal(a, b) for a, b in zip(masks(t), expected))


def linear_chain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12, bias=False), nn.ReLU(), nn.Linear(12, 10, bias=False), nn.ReLU(),
                         nn.Linear(10, 3, bias=False)).double()


def test_synflow_scores_are_conserved_per_layer_on_a_linear_chain():
    from ipfx.pruning.scores import linearised_copy, synflow_scores_of

    model = linear_chain()
    t = ipfx.transform(model)
    ones = torch.ones(1, 6, dtype=torch.float64)
    work = linearised_copy(t)
    scores = synflow_scores_of(work, ones)
    # R = 1^T |W3| |W2| |W1| 1, computed from the original weights
    r = ones
    for w in kernel_weights(model):
        r = r @ w.detach().abs().T
    r = r.sum()
    for s in scores:  # each layer's scores sum to R (Tanaka et al., Theorem 1)
        assert torch.allclose(s.sum(), r, rtol=1e-10)


def test_synflow_conserves_in_ip_conv_chains_too():
    from ipfx.pruning.scores import linearised_copy, synflow_scores_of

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.Conv2d(4, 3, 3, bias=False), nn.Flatten(),
                          nn.Linear(3 * 2 * 2, 2, bias=False)).double()
    work = linearised_copy(ipfx.transform(model))
    scores = synflow_scores_of(work, torch.ones(1, 2, 6, 6, dtype=torch.float64))
    total = work(torch.ones(1, 2, 6, 6, dtype=torch.float64)).sum()
    for s in scores:
        assert torch.allclose(s.sum(), total, rtol=1e-10)


def test_synflow_avoids_layer_collapse_at_99_percent():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 8, 3, padding=1), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 4))
    t = ipfx.transform(model)
    report = ipfx.prune(t, "synflow", 0.99, example_inputs=(1, 3, 4, 4), allow_empty=True, iterations=20)
    assert all(row.kept > 0 for row in report.rows), str(report)
    assert ipfx.sparsity(t) == pytest.approx(0.99, abs=1 / report.total)


def test_synflow_leaves_the_model_and_bn_untouched_apart_from_masks():
    t = ipfx.transform(small_cnn())
    before = {k: v.clone() for k, v in t.state_dict().items()}
    ipfx.prune(t, "synflow", 0.5, example_inputs=torch.zeros(2, 3, 8, 8, dtype=torch.float64), iterations=5)
    for k, v in t.state_dict().items():
        if k.endswith("mask"):
            continue
        if k.endswith("coeff"):
            mask = t.state_dict()[k[: -len("coeff")] + "mask"]
            assert torch.equal(v, before[k] * mask), k
        else:
            assert torch.equal(v, before[k]), k


# -- allocation ---------------------------------------------------------------------------------------
@settings(max_examples=25)
@given(st.floats(0.0, 0.999), st.sampled_from(["global", "layerwise", "erk"]), st.sampled_from(["random", "magnitude"]))
def test_requested_sparsity_is_met(sparsity, scope, method):
    t = ipfx.transform(small_cnn())
    total = sum(m.mask.numel() for m in t.modules() if isinstance(m, ipfx.BasisWeight))
    expected_kept = round((1 - sparsity) * total)
    if expected_kept < 4:  # fewer coefficients than tensors: each keeps one unless allowed to empty
        with pytest.raises(IPFXValueError, match="allow_empty=True"):
            ipfx.prune(t, method, sparsity, scope=scope, seed=1)
        return
    report = ipfx.prune(t, method, sparsity, scope=scope, seed=1)
    if scope == "global":
        assert report.kept == expected_kept
    else:
        assert abs(report.kept - expected_kept) <= len(report.rows)
        if scope == "layerwise":
            for row in report.rows:
                assert abs(row.kept - (1 - sparsity) * row.total) <= 1 or row.kept == 1
    assert all(row.kept >= 1 for row in report.rows)
    assert ipfx.sparsity(t) == pytest.approx(report.sparsity)


def test_ties_are_broken_with_an_exact_count():
    t = ipfx.transform(small_cnn())
    with torch.no_grad():
        for m in t.modules():
            if isinstance(m, ipfx.BasisWeight):
                m.coeff.fill_(1.0)  # every magnitude ties
    report = ipfx.prune(t, "magnitude", 0.75, scope="layerwise")
    for row in report.rows:
        assert abs(row.kept - 0.25 * row.total) <= 1
    report = ipfx.prune(ipfx.transform(small_cnn()), "magnitude", 0.75)
    assert report.kept == round(0.25 * report.total)


def test_erk_densities_follow_the_formula():
    t = ipfx.transform(small_cnn())
    report = ipfx.prune(t, "random", 0.9, scope="erk")
    shapes = [m.weight_shape for m in t.modules() if isinstance(m, ipfx.BasisWeight)]
    raw = [sum(s) / math.prod(s) for s in shapes]
    free = [i for i, row in enumerate(report.rows) if row.kept < row.total]
    budget = round(0.1 * report.total) - sum(r.total for i, r in enumerate(report.rows) if i not in free)
    eps = budget / sum(raw[i] * report.rows[i].total for i in free)  # one epsilon for every non-dense layer
    for i in free:
        assert abs(report.rows[i].kept - eps * raw[i] * report.rows[i].total) <= 1
    assert abs(report.kept - round(0.1 * report.total)) <= 1


def test_keep_dense_first_and_last_and_never_an_empty_tensor():
    t = ipfx.transform(small_cnn())
    report = ipfx.prune(t, "magnitude", 0.8, keep_dense=("first", "5.*"))
    assert report.rows[0].kept == report.rows[0].total and report.rows[2].kept == report.rows[2].total
    assert report.kept == round(0.2 * report.total)
    report = ipfx.prune(ipfx.transform(small_cnn()), "magnitude", 0.4, keep_dense=("last",))
    assert report.rows[-1].kept == report.rows[-1].total and report.kept == round(0.6 * report.total)
    with pytest.raises(IPFXValueError, match="cannot be reached while keeping 2 layer"):
        ipfx.prune(ipfx.transform(small_cnn()), "magnitude", 0.9, keep_dense=("first", "last"))
    with torch.no_grad():  # a layer whose every coefficient is tiny would vanish under global magnitude
        t2 = ipfx.transform(small_cnn())
        t2.get_submodule("5").coeff.mul_(1e-6)
    assert ipfx.prune(copy.deepcopy(t2), "magnitude", 0.9).rows[2].kept >= 1
    assert ipfx.prune(t2, "magnitude", 0.9, allow_empty=True).rows[2].kept == 0


def test_pruning_is_monotone_and_zeroes_removed_coefficients():
    t = ipfx.transform(small_cnn())
    ipfx.prune(t, "random", 0.5, seed=0)
    first = masks(t)
    ipfx.prune(t, "magnitude", 0.8)
    for a, b in zip(first, masks(t)):
        assert torch.all(b <= a)  # nothing masked comes back
    for m in t.modules():
        if isinstance(m, ipfx.BasisWeight):
            assert torch.all(m.coeff[m.mask == 0] == 0)
    with pytest.raises(IPFXValueError, match=r"already pruned to sparsity 0\.7997.*only removes"):
        ipfx.prune(t, "magnitude", 0.3)


def test_random_is_seeded():
    a, b, c = (ipfx.transform(small_cnn()) for _ in range(3))
    ipfx.prune(a, "random", 0.5, seed=3)
    ipfx.prune(b, "random", 0.5, seed=3)
    ipfx.prune(c, "random", 0.5, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(masks(a), masks(b)))
    assert not all(torch.equal(x, y) for x, y in zip(masks(a), masks(c)))


def test_data_loader_and_batch_count():
    dataset = torch.utils.data.TensorDataset(torch.randn(12, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (12,)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    seen = []

    def loss(out, y):
        seen.append(len(y))
        return F.cross_entropy(out, y)

    t = ipfx.transform(small_cnn())
    ipfx.prune(t, "snip", 0.5, data=loader, loss_fn=loss, batches=2)
    assert seen == [4, 4]


def test_scoring_restores_batch_norm_statistics_and_gradients():
    t = ipfx.transform(small_cnn()).train()
    stats = t.get_submodule("1").running_mean.clone()
    ipfx.prune(t, "snip", 0.5, data=batches(2), loss_fn=F.cross_entropy, batches=2)
    assert torch.equal(t.get_submodule("1").running_mean, stats)
    assert all(p.grad is None for p in t.parameters())


def test_report_prints_a_table():
    t = ipfx.transform(TinyResNet(seed=0))
    report = ipfx.prune(t, "magnitude", 0.9)
    text = str(report)
    assert "magnitude pruning (ip)" in text and "layer1.0.conv1.weight" in text and "density" in text
    assert report.as_dict()["fc.weight"][1] == 160


# -- misuse ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.5", None, True])
def test_sparsity_out_of_range(bad):
    with pytest.raises(IPFXValueError, match=r"sparsity must be a number in \[0, 1\)"):
        ipfx.prune(ipfx.transform(small_cnn()), "random", bad)


@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_data_driven_methods_need_data_and_loss(method):
    t = ipfx.transform(small_cnn())
    with pytest.raises(IPFXValueError, match="needs data and loss_fn"):
        ipfx.prune(t, method, 0.5)
    with pytest.raises(IPFXValueError, match="needs loss_fn"):
        ipfx.prune(t, method, 0.5, data=batches(1))


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(IPFXValueError, match="unknown pruning method 'l1'.*random, magnitude, snip, grasp, synflow"):
        ipfx.prune(ipfx.transform(small_cnn()), "l1", 0.5)


def test_untransformed_model():
    with pytest.raises(NotTransformedError, match="ipfx.transform"):
        ipfx.prune(small_cnn(), "magnitude", 0.5)


def test_synflow_without_an_input_shape():
    with pytest.raises(IPFXValueError, match="example_inputs"):
        ipfx.prune(ipfx.transform(small_cnn()), "synflow", 0.5)


@pytest.mark.parametrize("method", ["snip", "grasp", "synflow"])
def test_scores_from_no_data_or_malformed_data_are_refused_and_leave_the_masks(method):
    """A DataLoader with drop_last=True and fewer samples than one batch yields nothing: a data-driven score
    from it would be all zeros (SNIP kept 1 of 216 weights of a layer). Each bad input is one clear error,
    and the masks stay as they were."""
    t = ipfx.transform(small_cnn())
    before = [m.clone() for m in masks(t)]
    x, y = batches(1, batch=3)[0]
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, drop_last=True)
    cases = [(empty, F.cross_entropy, "gave no batches"), ([], F.cross_entropy, "gave no batches"),
             ([x], F.cross_entropy, "must yield \\(inputs, targets\\) pairs, got a Tensor"),
             ([(x, y, y)], F.cross_entropy, "pairs, got a tuple of 3 items")]
    if method != "synflow":  # synflow uses the data for the input shape only
        cases.append(([(x, y)], lambda out, target: F.cross_entropy(out, target, reduction="none"),
                      "loss_fn must return one number"))
    for data, loss_fn, message in cases:
        with pytest.raises(IPFXValueError, match=message):
            ipfx.prune(t, method, 0.5, data=data, loss_fn=loss_fn)
        assert all(torch.equal(a, b) for a, b in zip(masks(t), before))
