"""Real architectures: torchvision models transform and lower with their outputs preserved."""

import warnings

import pytest
import torch
import torch.nn as nn
import torchvision

import ipfx
from helpers import assert_close, perturb_bases, randomize_masks

KERNEL_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)

MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), (2, 3, 64, 64)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(weights=None), (2, 3, 64, 64)),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(weights=None), (2, 3, 64, 64)),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(weights=None), (1, 3, 64, 64)),
    "densenet121": (lambda: torchvision.models.densenet121(weights=None), (1, 3, 64, 64)),
    "inception_v3": (
        lambda: torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False),
        (1, 3, 80, 80),
    ),
    "r3d_18": (lambda: torchvision.models.video.r3d_18(weights=None), (1, 3, 4, 32, 32)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torchvision_model_transforms_and_lowers(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(shape)
    t = ipfx.transform(model)
    kernels = [n for n, m in model.named_modules() if isinstance(m, KERNEL_TYPES)]
    assert {w.name for w in ipfx.rewritten_weights(t)} == {f"{n}.weight" for n in kernels}
    with torch.no_grad():
        y = model(x)
        assert_close(t(x), y, kind="torchvision: transform", rtol=1e-4)
        randomize_masks(t, 0.5)
        perturb_bases(t, scale=0.1)
        y = t(x)
        assert_close(ipfx.lower(t)(x), y, kind="torchvision: lower dense", rtol=1e-4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            fused = ipfx.lower(t, "fused")
        assert_close(fused(x), y, kind="torchvision: lower fused", rtol=1e-4)
