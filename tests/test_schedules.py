"""Pruning schedules (IMP, GMP, RigL, SET) checked against their definitions, in both spaces.

Every test drives a schedule with a tiny training loop (SGD with momentum on fixed batches) on
``TinyResNet`` transformed with ``space="ip"`` and ``space="sp"``, and recomputes what the schedule must
have done independently of ``ipfx.pruning``: the cubic formula of GMP, IMP's checkpoint values, RigL's
dense gradient through a lowered plain model (``dL/dC = dL/dW_flat @ B^T``), the drop/grow sets.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ipfx
from ipfx.errors import IPFXValueError, NotTransformedError
from ipfx.pruning import schedules
from helpers import brute_force_dense_grads
from strategies import TinyResNet

SPACES = ("ip", "sp")


# -- fixtures and helpers ------------------------------------------------------------------------------
def make_model(space: str, seed: int = 0, dtype=torch.float32) -> nn.Module:
    return ipfx.transform(TinyResNet(seed=seed, width=4).to(dtype), space=space)


def batches(n: int, seed: int, dtype=torch.float32, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 16, 16, generator=g, dtype=torch.float64).to(dtype),
             torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def weights(model):
    return [m for m in model.modules() if isinstance(m, ipfx.BasisWeight)]


def masks(model) -> list[torch.Tensor]:
    return [m.mask.bool().clone() for m in weights(model)]


def kept(model) -> int:
    return sum(int(m.mask.sum()) for m in weights(model))


def total(model) -> int:
    return sum(m.mask.numel() for m in weights(model))


def optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def train_step(model, opt, batch) -> None:
    x, y = batch
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def row_norms(m: ipfx.BasisWeight) -> torch.Tensor:
    return torch.ones(()) if m.basis is None else m.basis.detach().norm(dim=1)


def top(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest entries by full sort (not topk), as a boolean mask."""
    flat = score.reshape(-1)
    out = torch.zeros(flat.shape, dtype=torch.bool)
    out[torch.argsort(flat, descending=True, stable=True)[:k]] = True
    return out.reshape(score.shape)


# -- GMP --------------------------------------------------------------------------------------------------
def cubic(t, s_i, s_f, t0, t_end):
    t = min(max(t, t0), t_end)
    return s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0)) ** 3


@pytest.mark.parametrize("space", SPACES)
def test_gmp_follows_the_cubic_schedule_exactly(space):
    model = make_model(space)
    opt = optimizer(model)
    data = batches(2, seed=1)
    s_i, s_f, t0, t_end, freq = 0.1, 0.85, 2, 11, 3
    sched = schedules.GMP(model, s_f, start_step=t0, end_step=t_end, frequency=freq, initial_sparsity=s_i)
    n = total(model)
    assert kept(model) == n and sched.t == 0
    pruning_steps = {2, 5, 8, 11}
    expected_kept = n
    previous = masks(model)
    for t in range(1, 15):
        train_step(model, opt, data[t % 2])
        changed = sched.step()
        assert sched.t == t
        assert sched.target_sparsity(t) == pytest.approx(cubic(t, s_i, s_f, t0, t_end), abs=1e-12)
        if t in pruning_steps:
            expected_kept = round((1 - cubic(t, s_i, s_f, t0, t_end)) * n)
        assert changed == (t in pruning_steps)
        assert kept(model) == expected_kept, t
        assert ipfx.sparsity(model) == pytest.approx(1 - expected_kept / n, abs=0)
        assert sched.sparsity == ipfx.sparsity(model)
        now = masks(model)
        assert all(not (a & ~b).any() for a, b in zip(now, previous)), "a masked coefficient came back"
        if changed:  # removed coefficients are zeroed
            assert all(not m.coeff[~a].any() for m, a in zip(weights(model), now))
        previous = now
    assert ipfx.sparsity(model) == pytest.approx(1 - round((1 - s_f) * n) / n, abs=0)


def test_gmp_prunes_the_smallest_magnitudes():
    model = make_model("ip")
    ws = weights(model)
    with torch.no_grad():
        ws[1].basis.mul_(torch.linspace(0.5, 2.0, 9)[:, None])  # non-unit rows: scores use |c| * ||F_j||
    score = torch.cat([(m.coeff.detach().abs() * row_norms(m)).reshape(-1) for m in ws])
    sched = schedules.GMP(model, 0.6, start_step=1, end_step=2, frequency=1, allow_empty=True)
    sched.step()
    n = total(model)
    k = round((1 - sched.target_sparsity(1)) * n)
    expected = top(score, k)
    got = torch.cat([m.mask.bool().reshape(-1) for m in weights(model)])
    assert torch.equal(got, expected)


def test_gmp_start_step_zero_prunes_at_construction_and_layerwise_scope():
    model = make_model("sp")
    n = [m.mask.numel() for m in weights(model)]
    schedules.GMP(model, 0.5, start_step=0, end_step=4, frequency=2, initial_sparsity=0.3, scope="layerwise")
    assert kept(model) == round(0.7 * sum(n))


# -- IMP --------------------------------------------------------------------------------------------------
def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".mask")}


@pytest.mark.parametrize("space", SPACES)
def test_imp_prunes_and_rewinds_exactly(space):
    model = make_model(space)
    opt = optimizer(model)
    data = batches(2, seed=2)
    rounds, per_round, fraction, rewind = 3, 4, 0.3, 2
    sched = schedules.IMP(model, rounds=rounds, steps_per_round=per_round, fraction=fraction,
                          rewind_step=rewind, optimizer=opt)
    n = total(model)
    saved = None
    previous = masks(model)
    positions = []
    for t in range(1, 19):
        train_step(model, opt, data[t % 2])
        before = snapshot(model)
        changed = sched.step()
        positions.append(sched.run_position)
        if t == rewind:
            saved = snapshot(model)
            assert not changed
        # every round retrains from the rewind point for as long as the first run did after it
        is_round_end = t > rewind and (t - rewind) % per_round == 0 and (t - rewind) // per_round <= rounds
        assert changed == is_round_end
        if is_round_end:
            r = (t - rewind) // per_round
            assert kept(model) == round((1 - fraction) ** r * n)
            assert sched.rounds_done == r
            assert not opt.state, "optimizer state must be cleared at a rewind"
            assert any(not torch.equal(before[k], saved[k]) for k in saved), "training moved nothing"
            state = model.state_dict()
            for key, value in saved.items():
                if key.endswith(".coeff"):
                    mask = state[key[: -len("coeff")] + "mask"].bool()
                    assert torch.equal(state[key][mask], value[mask]), key
                    assert not state[key][~mask].any(), key
                else:  # basis (IP), batch norm parameters and statistics, biases
                    assert torch.equal(state[key], value), key
            if space == "ip":
                assert any(k.endswith(".basis") for k in saved)
        else:
            assert all(torch.equal(a, b) for a, b in zip(masks(model), previous))
        previous = masks(model)
    assert kept(model) == round((1 - fraction) ** rounds * n)
    # where a learning-rate schedule reads: back to the rewind point at every round's end
    assert positions == [1, 2, 3, 4, 5] + [2, 3, 4, 5] * 3 + [2]


def test_imp_rewind_step_zero_restores_the_initial_weights():
    model = make_model("ip")
    initial = snapshot(model)
    opt = optimizer(model)
    sched = schedules.IMP(model, rounds=1, steps_per_round=3, fraction=0.5)
    for batch in batches(3, seed=3):
        train_step(model, opt, batch)
        sched.step()
    state = model.state_dict()
    assert kept(model) == round(0.5 * total(model))
    for key, value in initial.items():
        if key.endswith(".coeff"):
            mask = state[key[: -len("coeff")] + "mask"].bool()
            assert torch.equal(state[key] , value * mask), key
        else:
            assert torch.equal(state[key], value), key


# -- RigL and SET -----------------------------------------------------------------------------------------
def expected_drop_grow(ws, old, coeffs, norms, grow_scores, fraction):
    """The definition: per tensor, keep the n-k largest |c|*||F||, grow the k best others."""
    out = []
    for m, mask, c, nrm, g in zip(ws, old, coeffs, norms, grow_scores):
        n = int(mask.sum())
        k = round(fraction * n)
        drop = torch.where(mask, c.abs() * nrm, torch.full_like(c, -math.inf))
        remaining = top(drop, n - k)
        grow = torch.where(remaining, torch.full_like(g, -math.inf), g)
        out.append(remaining | top(grow, k))
    return out


@pytest.mark.parametrize("space", SPACES)
def test_rigl_swaps_by_magnitude_and_dense_gradient(space):
    dtype = torch.float64
    model = make_model(space, dtype=dtype)
    opt = optimizer(model)
    train = batches(2, seed=4, dtype=dtype)
    grow_data = batches(1, seed=5, dtype=dtype)
    alpha, end, freq = 0.4, 9, 2
    sched = schedules.RigL(model, 0.7, end_step=end, data=grow_data, loss_fn=F.cross_entropy,
                           frequency=freq, alpha=alpha, optimizer=opt)
    n = total(model)
    assert kept(model) == round(0.3 * n)  # ERK initial pruning meets the sparsity exactly
    counts = [int(m.mask.sum()) for m in weights(model)]
    assert len(set(c / m.mask.numel() for c, m in zip(counts, weights(model)))) > 1  # ERK is not uniform
    updates = 0
    for t in range(1, 12):
        train_step(model, opt, train[t % 2])
        ws = weights(model)
        old = masks(model)
        coeffs = [m.coeff.detach().clone() for m in ws]
        norms = [row_norms(m).clone() for m in ws]
        bn = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
        dense = brute_force_dense_grads(model, grow_data[0]) if t % freq == 0 and t < end else None
        changed = sched.step()
        assert [int(m.mask.sum()) for m in ws] == counts
        assert kept(model) == round(0.3 * n)
        assert all(p.grad is None for p in model.parameters()), "the extra pass must not leave gradients"
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in bn.items()), "batch-norm statistics changed"
        if dense is None:
            assert not changed
            assert all(torch.equal(a, b) for a, b in zip(masks(model), old))
            continue
        updates += 1
        fraction = alpha / 2 * (1 + math.cos(math.pi * t / end))
        assert sched.update_fraction(t) == pytest.approx(fraction, rel=1e-12)
        for got, want, mask in zip(sched.last_gradients, dense, old):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert any(g[~mask].abs().sum() > 0 for g, mask in zip(sched.last_gradients, old)), "not dense"
        expected = expected_drop_grow(ws, old, coeffs, norms, [d.abs() for d in dense], fraction)
        new = masks(model)
        assert all(torch.equal(a, b) for a, b in zip(new, expected))
        assert changed and any(not torch.equal(a, b) for a, b in zip(new, old))
        for m, a, b, c in zip(ws, new, old, coeffs):
            assert not m.coeff[a & ~b].any(), "regrown coefficients must start at zero"
            assert torch.equal(m.coeff.detach()[a & b], c[a & b]), "surviving coefficients must not change"
            assert not m.coeff[~a].any()
            buf = opt.state[m.coeff]["momentum_buffer"]
            assert not buf[a != b].any(), "momentum of swapped coefficients is reset"
    assert updates == 4


@pytest.mark.parametrize("space", SPACES)
def test_set_swaps_randomly_at_constant_sparsity(space):
    model = make_model(space)
    opt = optimizer(model)
    train = batches(2, seed=6)
    zeta, end, freq = 0.3, 8, 2
    sched = schedules.SET(model, 0.8, end_step=end, frequency=freq, zeta=zeta, scope="layerwise", seed=7)
    n = total(model)
    counts = [int(m.mask.sum()) for m in weights(model)]
    assert kept(model) == round(0.2 * n)
    history = []
    for t in range(1, 11):
        train_step(model, opt, train[t % 2])
        ws = weights(model)
        old = masks(model)
        coeffs = [m.coeff.detach().clone() for m in ws]
        changed = sched.step()
        new = masks(model)
        assert [int(m.mask.sum()) for m in ws] == counts
        assert changed == (t % freq == 0 and t < end)
        if not changed:
            assert all(torch.equal(a, b) for a, b in zip(new, old))
            continue
        assert sched.update_fraction(t) == zeta
        for m, a, b, c in zip(ws, new, old, coeffs):
            k = round(zeta * int(b.sum()))
            score = torch.where(b, c.abs() * row_norms(m), torch.full_like(c, -math.inf))
            remaining = top(score, int(b.sum()) - k)
            assert not (remaining & ~a).any(), "a large-magnitude coefficient was dropped"
            assert int((a & ~remaining).sum()) == k
            assert not m.coeff[a & ~b].any(), "regrown coefficients must start at zero"
        history.append(new)
    assert len(history) == 3

    # seeded: the same seed gives the same masks, another seed other masks
    def run(seed):
        m = make_model(space)
        o = optimizer(m)
        s = schedules.SET(m, 0.8, end_step=end, frequency=freq, zeta=zeta, scope="layerwise", seed=seed)
        for t in range(1, 11):
            train_step(m, o, train[t % 2])
            s.step()
        return masks(m)

    assert all(torch.equal(a, b) for a, b in zip(run(7), history[-1]))
    assert not all(torch.equal(a, b) for a, b in zip(run(8), history[-1]))


def test_dense_gradients_leave_the_model_unchanged():
    model = make_model("ip")
    ipfx.prune(model, "random", 0.5, seed=0)
    with torch.no_grad():
        for m in weights(model):  # masked coefficients drifted away from zero (momentum does this)
            m.coeff.add_(0.01 * (1 - m.mask))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    found = ipfx.pruning.targets.targets(model)
    batch = batches(1, seed=8)[0]
    grads = schedules.dense_gradients(model, found, batch[0], batch[1], F.cross_entropy)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())
    want = brute_force_dense_grads(model, batch)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


# -- resuming -----------------------------------------------------------------------------------------------
TRAIN = batches(3, seed=10)
GROW = batches(3, seed=11)


def build(kind: str, model, opt):
    if kind == "GMP":
        return schedules.GMP(model, 0.8, start_step=1, end_step=9, frequency=2, initial_sparsity=0.2)
    if kind == "IMP":
        return schedules.IMP(model, rounds=3, steps_per_round=3, fraction=0.4, rewind_step=1, optimizer=opt)
    if kind == "RigL":
        return schedules.RigL(model, 0.7, end_step=11, data=GROW, loss_fn=F.cross_entropy, frequency=2,
                              alpha=0.5, optimizer=opt)
    return schedules.SET(model, 0.7, end_step=11, frequency=2, zeta=0.4, seed=3, optimizer=opt)


def run_steps(model, opt, sched, start, stop) -> int:
    changes = 0
    for t in range(start, stop):
        train_step(model, opt, TRAIN[t % len(TRAIN)])
        changes += sched.step()
    return changes


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only: schedule state holds tensors, numbers and strings only


@pytest.mark.parametrize("schedule_first", [False, True], ids=["model-first", "schedule-first"])
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("kind", ["GMP", "IMP", "RigL", "SET"])
def test_resumed_run_ends_with_the_same_masks(kind, space, schedule_first):
    steps, split = 12, 5
    model = make_model(space)
    opt = optimizer(model)
    sched = build(kind, model, opt)
    assert run_steps(model, opt, sched, 0, steps) > 0
    reference = masks(model)
    reference_state = model.state_dict()

    model = make_model(space)
    opt = optimizer(model)
    sched = build(kind, model, opt)
    run_steps(model, opt, sched, 0, split)
    saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    del model, opt, sched

    fresh = make_model(space, seed=1)  # other initial values: everything must come from the checkpoint
    fresh_opt = optimizer(fresh)
    if schedule_first:
        fresh_sched = build(kind, fresh, fresh_opt)
        fresh.load_state_dict(saved["model"])
        fresh_opt.load_state_dict(saved["opt"])
    else:
        fresh.load_state_dict(saved["model"])
        fresh_opt.load_state_dict(saved["opt"])
        fresh_sched = build(kind, fresh, fresh_opt)
    fresh_sched.load_state_dict(saved["sched"])
    assert fresh_sched.t == split
    assert run_steps(fresh, fresh_opt, fresh_sched, split, steps) > 0
    assert all(torch.equal(a, b) for a, b in zip(masks(fresh), reference))
    assert all(torch.equal(v, reference_state[k]) for k, v in fresh.state_dict().items())


def test_state_dict_of_another_schedule_is_refused():
    model = make_model("sp")
    state = schedules.GMP(model, 0.5, start_step=1, end_step=3).state_dict()
    with pytest.raises(IPFXValueError, match="GMP schedule, not to SET"):
        schedules.SET(model, 0.5, end_step=3).load_state_dict(state)


# -- errors ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return ipfx.transform(nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 1)))


@pytest.mark.parametrize("make, match", [
    (lambda m: schedules.GMP(m, 1.0, start_step=0, end_step=5), "final_sparsity must be a number in \\[0, 1\\)"),
    (lambda m: schedules.GMP(m, -0.1, start_step=0, end_step=5), "final_sparsity"),
    (lambda m: schedules.GMP(m, 0.5, start_step=0, end_step=5, initial_sparsity=0.6), "must not exceed"),
    (lambda m: schedules.GMP(m, 0.5, start_step=5, end_step=5), "end_step \\(5\\) must be larger"),
    (lambda m: schedules.GMP(m, 0.5, start_step=0, end_step=5, frequency=0), "frequency must be an integer"),
    (lambda m: schedules.GMP(m, 0.5, start_step=0, end_step=5, scope="per-layer"), "unknown scope"),
    (lambda m: schedules.IMP(m, rounds=2, steps_per_round=5, fraction=1.0), "fraction must be a number in \\(0, 1\\)"),
    (lambda m: schedules.IMP(m, rounds=2, steps_per_round=5, fraction=0.0), "fraction"),
    (lambda m: schedules.IMP(m, rounds=0, steps_per_round=5), "rounds must be an integer >= 1"),
    (lambda m: schedules.IMP(m, rounds=2, steps_per_round=5, rewind_step=-1), "rewind_step must be an integer"),
    (lambda m: schedules.RigL(m, 0.5, end_step=10), "needs data and loss_fn"),
    (lambda m: schedules.RigL(m, 0.5, end_step=10, data=[]), "needs loss_fn"),
    (lambda m: schedules.RigL(m, 1.5, end_step=10, data=[], loss_fn=F.mse_loss), "sparsity must be a number"),
    (lambda m: schedules.RigL(m, 0.5, end_step=10, data=[], loss_fn=F.mse_loss, alpha=0), "alpha"),
    (lambda m: schedules.RigL(m, 0.5, end_step=0, data=[], loss_fn=F.mse_loss), "end_step must be an integer"),
    (lambda m: schedules.SET(m, 0.5, end_step=10, zeta=1.5), "zeta"),
    (lambda m: schedules.SET(m, 0.5, end_step=10, init="snip"), "init must be"),
])
def test_invalid_arguments(tiny, make, match):
    with pytest.raises(IPFXValueError, match=match):
        make(tiny)


@pytest.mark.parametrize("kind", ["GMP", "IMP", "RigL", "SET"])
def test_untransformed_model_is_refused(kind):
    with pytest.raises(NotTransformedError, match="ipfx.transform"):
        build(kind, nn.Conv2d(2, 2, 3), None)


def test_rigl_with_empty_data_says_so(tiny):
    model = copy.deepcopy(tiny)
    sched = schedules.RigL(model, 0.5, end_step=10, data=[], loss_fn=F.mse_loss, frequency=1)
    with pytest.raises(IPFXValueError, match="yielded no batch"):
        sched.step()


def test_public_names():
    for name in ("IMP", "GMP", "RigL", "SET", "Schedule"):
        assert getattr(ipfx.pruning, name) is getattr(schedules, name)
