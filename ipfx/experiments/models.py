"""Models for experiments: CIFAR ResNets (He et al. 2016), CIFAR VGG-16, a small CNN, any torchvision model."""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import IPFXValueError

CIFAR_RESNETS = {"resnet20": 3, "resnet32": 5, "resnet56": 9}
BUILTIN = ("cnn", *CIFAR_RESNETS, "vgg16")


class _ShortcutA(nn.Module):
    """He et al.'s option A: subsample by the stride and zero-pad the new channels (no parameters)."""

    def __init__(self, stride: int, extra: int):
        super().__init__()
        self.stride, self.extra = stride, extra

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _ShortcutA(stride, cout - cin) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 3 stages of n basic blocks, widths w, 2w, 4w."""

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            blocks = [_Block(cin, cout, 1 if i == 0 else 2)] + [_Block(cout, cout, 1) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class CifarVGG(nn.Module):
    """VGG-16 with batch norm for small images; global pooling before one linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, config=_VGG16):
        super().__init__()
        layers, cin = [], in_channels
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks and a linear head: fast enough for the demo on 8x8 digits."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_model(name: str, num_classes: int, in_channels: int, width: int | None = None) -> nn.Module:
    """A built-in model by name, or any torchvision classification model (random weights, no download)."""
    if name == "cnn":
        return SmallCNN(num_classes, in_channels, width or 32)
    if name in CIFAR_RESNETS:
        return CifarResNet(CIFAR_RESNETS[name], num_classes, in_channels, width or 16)
    if name == "vgg16":
        return CifarVGG(num_classes, in_channels)
    import torchvision

    check_model_name(name)
    with warnings.catch_warnings():  # "the default weight initialization ... will be changed" (inception, googlenet)
        warnings.filterwarnings("ignore", message="The default weight initialization")
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        return nn.Sequential(_RepeatChannels(3), model)
    return model


def check_model_name(name: str) -> None:
    """Raise unless ``name`` is a built-in model or a torchvision classification model (checked before
    any data is read, so a typo costs nothing)."""
    if name in BUILTIN:
        return
    import torchvision

    known = set(torchvision.models.list_models(module=torchvision.models))
    if name not in known:
        raise IPFXValueError(
            f"unknown model {name!r}; built-in: {', '.join(BUILTIN)}; or a torchvision classification model "
            f"such as {', '.join(sorted(known)[:6])}, ... (torchvision.models.list_models())"
        )


class _RepeatChannels(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x):
        return x.expand(-1, self.channels, *x.shape[2:]) if x.shape[1] == 1 else x
