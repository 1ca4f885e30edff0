"""Partial tracing: models torch.fx cannot trace as a whole still get every reachable weight rewritten."""

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


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
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
    from ipfx.partial import capture_tree

    import copy

    _, report = capture_tree(copy.deepcopy(Detector()), TransformConfig())
    assert set(report.traced) == {"stem"}  # lone conv/linear children stay modules, parametrized
    t = ipfx.transform(Detector())
    captures = {w.name: w.capture for w in ipfx.rewritten_weights(t)}
    assert captures == {"stem.0.weight": "symbolic", "gate.conv.weight": "parametrized",
                        "head.conv.weight": "parametrized", "head.cls.weight": "parametrized",
                        "fc.weight": "parametrized"}
    assert {path for path, _, _ in report.untraced} == {"", "gate", "head"}  # control flow, list iteration
    assert "kept as Python code: <root> (Detector)" in str(report)


def test_config_patterns_see_full_names_in_partial_traces():
    t = ipfx.transform(Detector(), config=ipfx.TransformConfig(exclude=["head.*"]))
    names = {w.name for w in ipfx.rewritten_weights(t)}
    assert "head.conv.weight" not in names and "gate.conv.weight" in names
