"""nn.MultiheadAttention: its projection weights become coefficient subgraphs too (ipfx.capture.attention)."""

import torch
import torch.fx as fx
import torch.nn as nn
import pytest

import ipfx
from helpers import assert_close, isomorphic, randomize_masks

CONFIGS = [
    dict(batch_first=True),
    dict(batch_first=False),
    dict(kdim=5, vdim=6, batch_first=True),  # separate q/k/v projection weights
    dict(add_bias_kv=True, bias=False),
    dict(batch_first=True, add_zero_attn=True),
]


class Block(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, **kwargs)
        self.fc = nn.Linear(8, 3)

    def forward(self, x, k, v, mask):
        y, weights = self.attn(x, k, v, key_padding_mask=mask, need_weights=True)
        return self.fc(y), weights


def inputs(kwargs):
    g = torch.Generator().manual_seed(0)
    shape = (2, 4) if kwargs.get("batch_first") else (4, 2)
    x = torch.randn(*shape, 8, generator=g)
    k = torch.randn(*shape, kwargs.get("kdim", 8), generator=g)
    v = torch.randn(*shape, kwargs.get("vdim", 8), generator=g)
    mask = torch.tensor([[False, False, True, False], [False, True, False, False]])
    return x, k, v, mask


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_attention_weights_are_rewritten_and_lowered(kwargs):
    torch.manual_seed(0)
    model = Block(**kwargs).eval()
    args = inputs(kwargs)
    separate = "kdim" in kwargs
    if separate:  # three raw kernels in one module: no fallback can read them, and transform says so
        with pytest.warns(UserWarning, match="holds two or more raw kernels.*has no fallback"):
            t = ipfx.transform(model)
    else:
        t = ipfx.transform(model)
    projections = ["q_proj_weight", "k_proj_weight", "v_proj_weight"] if separate else ["in_proj_weight"]
    assert {w.name for w in ipfx.rewritten_weights(t)} == {
        "fc.weight", "attn.out_proj.weight", *(f"attn.{p}" for p in projections)}
    assert "attn.out_proj.coeff" in t.state_dict() and f"attn.{projections[0]}.coeff" in t.state_dict()
    with torch.no_grad():
        assert_close(t(*args), model(*args), kind="attention: transform")
        randomize_masks(t, 0.5)
        y = t(*args)
        dense = ipfx.lower(t)
        assert type(dense.attn) is nn.MultiheadAttention
        assert set(dense.state_dict()) == set(model.state_dict())
        assert isomorphic(dense, fx.symbolic_trace(model))
        assert_close(dense(*args), y, kind="attention: lower dense")
        assert_close(ipfx.lower(t, "fused")(*args), y, kind="attention: lower fused")


def test_attention_trains_with_masks_and_follows_the_training_flag():
    torch.manual_seed(0)
    model = Block(batch_first=True, dropout=0.5)
    t = ipfx.transform(model)
    randomize_masks(t, 0.5)
    args = inputs(dict(batch_first=True))
    t.train()
    t(*args)[0].square().sum().backward()
    coeff = t.attn.in_proj_weight
    assert torch.all(coeff.coeff.grad[coeff.mask == 0] == 0) and coeff.coeff.grad.abs().sum() > 0
    t.eval()  # dropout off: deterministic, like the original in eval mode
    with torch.no_grad():
        assert torch.equal(t(*args)[0], t(*args)[0])
        model.eval()
        assert_close(ipfx.lower(t).eval()(*args), t(*args), kind="attention: eval after train")
    report = ipfx.prune(t, "magnitude", 0.8)
    assert "attn.in_proj_weight" in report.as_dict()
