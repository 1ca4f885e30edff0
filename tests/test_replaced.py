"""A module of a transformed model replaced after ipfx.transform (ipfx.capture.replaced): an error that says
so on every call, never the old module's output."""

import copy

import pytest
import torch
import torch.nn as nn

import ipfx
from helpers import quiet
from test_every_input import Decoder


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act, self.fc = nn.ReLU(), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.act(self.bn(self.conv(x))).mean((2, 3)))


x = torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("example", [True, False])
@pytest.mark.parametrize("train", [False, True])
def test_a_replaced_head_raises_saying_what_to_do_instead_of_running_the_old_one(example, train):
    """The fine-tuning slip ``ip.fc = nn.Linear(8, 10)``: before, the call without example inputs returned the old
    head's 5 outputs (its fallback held the old head) and with them raised torch's AttributeError; now both raise
    the error naming `fc`, on every call."""
    model = Net().eval()
    t = quiet(ipfx.transform, model, example_inputs=(x,) if example else None)
    quiet(t, x)
    t.train(train)
    t.fc = nn.Linear(8, 10)
    for _ in range(2):
        with pytest.raises(ipfx.errors.IPFXValueError, match=r"replaced after ipfx.transform: `fc\.") as raised:
            quiet(t, x)
        assert "call ipfx.transform on it" in str(raised.value)


def test_replacing_a_module_the_graph_calls_by_name_uses_the_new_module():
    """A symbolically traced graph calls an unrewritten module by its name: the replacement runs (no error), as in
    the original model with the same replacement."""
    model = Net().eval()
    t = quiet(ipfx.transform, model)
    quiet(t, x)
    t.act = nn.Tanh()
    model.act = nn.Tanh()
    assert torch.allclose(quiet(t, x), model(x), atol=1e-6)


def test_a_module_replaced_while_the_fallback_runs_raises_and_copies_do_not():
    """A graph that runs its module's own forward (a branch tracing could not see) raised nothing when a module it
    shares with that forward was replaced, and computed with the old one; now it raises. A deep copy, moved or
    lowered model (whose shared modules are copied together) runs as before."""
    model = Decoder().eval()
    t = ipfx.transform(model)
    with pytest.warns(UserWarning, match="computes something else"):
        t(x)
    copied = copy.deepcopy(t)
    assert torch.allclose(quiet(copied, x), model(x), atol=1e-5)
    assert torch.allclose(quiet(t.to(torch.float32), x), model(x), atol=1e-5)
    shared = t.meta[ipfx.capture.replaced.SHARED]
    assert shared, "the graph and its fallback share unrewritten modules"
    owner, _, name = shared[0].rpartition(".")
    holder = t.get_submodule(owner) if owner else t
    setattr(holder, name, copy.deepcopy(getattr(holder, name)))
    with pytest.raises(ipfx.errors.IPFXValueError, match=f"`{shared[0]}` was replaced"):
        quiet(t, x)
    assert torch.allclose(quiet(copied, x), model(x), atol=1e-5)
