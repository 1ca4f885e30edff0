"""Pruning under torch.distributed: 2 processes, gloo backend, CPU, each rank with different data.

One module-scoped fixture spawns the two workers once; they run every scenario, compare masks across
ranks themselves (``all_gather``) and save what they saw to ``rank<r>.pt``. The tests assert on those
files in the parent, and recompute the expected decisions single-process:

* ``ipfx.prune(..., "snip")``: the masks are identical on both ranks and equal the single-process
  decision on both ranks' batches together (gradients averaged over ranks before scoring), while
  each rank's own data alone would give different masks;
* ``ipfx.prune(..., "random", seed=rank)``: identical masks, rank 0's (broadcast);
* ``RigL`` on a ``DistributedDataParallel`` model: identical masks after every update, and the dense
  gradient used is the mean over ranks of the rank-local dense gradients (checked against a brute-force
  gradient through a lowered copy), not the local one.
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import ipfx
from ipfx.pruning import allocation, schedules, scores
from ipfx.pruning.targets import targets
from gloo import run_on_ranks
from helpers import brute_force_dense_grads
from strategies import TinyResNet

WORLD = 2
TIMEOUT_S = 180
SNIP_SPARSITY = 0.8


def make_model(dtype=torch.float32):
    return ipfx.transform(TinyResNet(seed=0, width=4).to(dtype), space="ip")


def rank_batches(rank: int, purpose: int, n: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * purpose + rank)
    return [(torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64).to(dtype),
             torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


def flat_masks(model) -> torch.Tensor:
    return torch.cat([t.mask.reshape(-1) for t in targets(model)])


# -- the workers -----------------------------------------------------------------------------------------
def _gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out


def _same_everywhere(tensor: torch.Tensor) -> bool:
    return all(torch.equal(t, tensor) for t in _gather(tensor))


def _run_scenarios(rank: int) -> dict:
    result: dict = {}

    # (a) one-shot pruning with rank-specific data / seeds
    model = make_model()
    ipfx.prune(model, "snip", SNIP_SPARSITY, data=rank_batches(rank, 1), loss_fn=F.cross_entropy)
    result["snip"] = flat_masks(model)
    result["snip_same"] = _same_everywhere(result["snip"])

    model = make_model()
    ipfx.prune(model, "random", SNIP_SPARSITY, seed=rank)
    result["random"] = flat_masks(model)
    result["random_same"] = _same_everywhere(result["random"])

    # (b) RigL on a DDP model, rank-specific training and growth data
    dtype = torch.float64
    model = make_model(dtype)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    grow = rank_batches(rank, 2, dtype=dtype)
    train = rank_batches(rank, 3, n=2, dtype=dtype)
    sched = schedules.RigL(ddp, 0.7, end_step=7, data=grow, loss_fn=F.cross_entropy, frequency=2, optimizer=opt)
    result["rigl_initial_same"] = _same_everywhere(flat_masks(model))
    updates = []
    for t in range(1, 9):
        x, y = train[t % 2]
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        local = brute_force_dense_grads(model, grow[0]) if sched.is_update_step(t) else None
        before = flat_masks(model)
        changed = sched.step()
        if local is None:
            continue
        used = torch.cat([g.reshape(-1) for g in sched.last_gradients])
        local = torch.cat([g.reshape(-1) for g in local])
        mean = torch.stack(_gather(local)).mean(0)
        after = flat_masks(model)
        updates.append({
            "t": t,
            "changed": changed and not torch.equal(before, after),
            "masks_same": _same_everywhere(after),
            "err_to_mean": float((used - mean).abs().max() / mean.abs().max()),
            "err_to_local": float((used - local).abs().max() / mean.abs().max()),
            "sparsity": sched.sparsity,
        })
    result["rigl_updates"] = updates
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    result["rigl_params_same"] = _same_everywhere(params)
    return result


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_on_ranks(_run_scenarios, str(tmp_path_factory.mktemp("distributed")), WORLD, TIMEOUT_S)


# -- the checks --------------------------------------------------------------------------------------------
def test_snip_masks_are_identical_and_use_the_gradients_of_all_ranks(results):
    assert all(r["snip_same"] for r in results)
    assert torch.equal(results[0]["snip"], results[1]["snip"])
    # single process: each rank's data alone, and both ranks' batches together (gradients summed)
    def snip_on(batches):
        model = make_model()
        found = targets(model)
        ctx = scores.ScoreContext(model, found, batches, F.cross_entropy, batches=len(batches))
        return scores.snip_scores(ctx), [t.module.weight_shape for t in found]

    per_rank = [snip_on(rank_batches(rank, 1))[0] for rank in range(WORLD)]
    together, shapes = snip_on(rank_batches(0, 1) + rank_batches(1, 1))

    def decide(values):
        keep = allocation.select(values, SNIP_SPARSITY, scope="global", shapes=shapes)
        return torch.cat([k.reshape(-1).float() for k in keep])

    local = [decide(v) for v in per_rank]
    assert not torch.equal(local[0], local[1]), "the ranks' data should disagree, or the test shows nothing"
    assert torch.equal(results[0]["snip"], decide(together))
    n = results[0]["snip"].numel()
    assert int(results[0]["snip"].sum()) == round((1 - SNIP_SPARSITY) * n)


def test_random_masks_with_different_seeds_are_rank_zeros(results):
    assert all(r["random_same"] for r in results)
    assert torch.equal(results[0]["random"], results[1]["random"])
    model = make_model()
    ipfx.prune(model, "random", SNIP_SPARSITY, seed=0)
    assert torch.equal(results[1]["random"], flat_masks(model))
    other = make_model()
    ipfx.prune(other, "random", SNIP_SPARSITY, seed=1)
    assert not torch.equal(flat_masks(other), flat_masks(model))


def test_rigl_under_ddp_uses_all_reduced_gradients_and_keeps_ranks_identical(results):
    assert all(r["rigl_initial_same"] for r in results)
    for r in results:
        assert [u["t"] for u in r["rigl_updates"]] == [2, 4, 6]
        for u in r["rigl_updates"]:
            assert u["changed"], u
            assert u["masks_same"], u
            assert u["sparsity"] == pytest.approx(r["rigl_updates"][0]["sparsity"], abs=0)
            assert u["err_to_mean"] < 1e-9, u
            assert u["err_to_local"] > 1e-3, u
        assert r["rigl_params_same"]
