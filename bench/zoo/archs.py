"""Architectures of the zoo. Every builder returns a model that takes ``[0, 1]`` inputs: the
normalisation is its first layer.

* ``small-cnn``          two conv blocks and two linear layers, for 28 x 28 grayscale;
* ``mlp``                a two-layer perceptron for tiny inputs (8 x 8 digits);
* ``preact-resnet18``    He et al. 2016 (identity mappings), the CIFAR-10 robustness workhorse;
* ``wide-resnet-28-10``  Zagoruyko & Komodakis 2016, the RobustBench CIFAR-10 standard;
* ``tv:NAME``            any torchvision ImageNet classifier by name; weights only from a local
  file or when a download is asked for explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core import Normalize
from ..core.fileio import read_state_dict
from ..core.registry import Registry

__all__ = ["ARCHS", "register_arch", "build", "SmallCNN", "MLP", "PreActResNet18", "WideResNet",
           "torchvision_model"]

ARCHS: Registry[Callable[..., nn.Module]] = Registry("architecture")
register_arch = ARCHS.register

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SmallCNN(nn.Module):
    """Conv(32)-ReLU-Pool-Conv(64)-ReLU-Pool-FC(128)-ReLU-FC(K) for 28 x 28 inputs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, mean=MNIST_MEAN, std=MNIST_STD,
                 image_size: int = 28) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


class MLP(nn.Module):
    """Flatten-FC(hidden)-ReLU-FC(K)."""

    def __init__(self, num_classes: int = 10, in_features: int = 64, hidden: int = 64,
                 mean=(0.5,), std=(0.5,)) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


class _PreActBlock(nn.Module):
    """Pre-activation basic block (He et al., ECCV 2016): BN-ReLU-conv twice, with a 1x1
    projection on the shortcut when the shape changes; ``dropout`` between the convolutions
    makes it the wide-ResNet block (Zagoruyko and Komodakis, BMVC 2016)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0
                 ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 for 32 x 32 inputs (He et al. 2016, "Identity Mappings in Deep ResNets")."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, mean=CIFAR10_MEAN,
                 std=CIFAR10_STD, width: int = 64) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        layers, in_planes = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = width * 2**i
            layers.append(nn.Sequential(_PreActBlock(in_planes, planes, stride),
                                        _PreActBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class _WideBlock(_PreActBlock):
    """The wide-ResNet block: :class:`_PreActBlock` with dropout between its convolutions."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__(in_planes, planes, stride, dropout)


class WideResNet(nn.Module):
    """WideResNet-depth-k for 32 x 32 inputs (Zagoruyko & Komodakis 2016); default WRN-28-10."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, depth: int = 28,
                 widen_factor: int = 10, dropout: float = 0.0, mean=CIFAR10_MEAN,
                 std=CIFAR10_STD) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, in_planes = [], widths[0]
        for i, stride in enumerate((1, 2, 2)):
            group = []
            for j in range(n):
                group.append(_WideBlock(in_planes, widths[i + 1], stride if j == 0 else 1, dropout))
                in_planes = widths[i + 1]
            blocks.append(nn.Sequential(*group))
        self.block1, self.block2, self.block3 = blocks
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def torchvision_model(name: str, *, weights_path: str | os.PathLike | None = None,
                      download: bool = False, num_classes: int = 1000) -> nn.Module:
    """A torchvision classifier behind ``Normalize`` (ImageNet statistics).

    Weights come from ``weights_path`` (a state dict, loaded with ``weights_only=True``, or a
    ``.safetensors`` file) or, only with ``download=True``, from torchvision's default weights.
    With neither, the model is randomly initialised.
    """
    # Deferred: torchvision takes seconds to import; only its architectures/datasets need it.
    import torchvision.models as tvm

    try:
        builder = tvm.get_model_builder(name)
    except ValueError:
        known = ", ".join(sorted(tvm.list_models(module=tvm)))
        raise ValueError(f"unknown torchvision model {name!r}; known: {known}") from None
    if download:
        net = builder(weights="DEFAULT")
    else:
        net = builder(weights=None, num_classes=num_classes)
        if weights_path is not None:

            net.load_state_dict(read_state_dict(weights_path))
    return nn.Sequential(Normalize(IMAGENET_MEAN, IMAGENET_STD), net)


register_arch("small-cnn")(SmallCNN)
register_arch("mlp")(MLP)
register_arch("preact-resnet18")(PreActResNet18)
register_arch("wide-resnet-28-10")(WideResNet)


def build(arch: str, **kwargs) -> nn.Module:
    """Instantiate a registered architecture, or ``tv:NAME`` for a torchvision model."""
    if arch.startswith("tv:"):
        return torchvision_model(arch[3:], **kwargs)
    try:
        return ARCHS.get(arch)(**kwargs)
    except KeyError as err:
        raise ValueError(f"{err.args[0]}, or tv:NAME for a torchvision model") from None
