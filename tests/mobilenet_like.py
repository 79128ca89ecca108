"""A MobileNetV3-small-shaped network (torchvision's channel counts: 8, 16, 24, 40, 48, 72, 88,
96, 120, 144, 240, 288, 576, 1024), built here because torchvision has no CPU build matching the
pinned torch in this environment. Inverted residual blocks (1x1 expand, depthwise kxk, squeeze-
excitation, 1x1 project), hardswish, as in torchvision's ``mobilenet_v3_small``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# (in, kernel, expanded, out, squeeze-excitation, stride) of mobilenet_v3_small's blocks
BLOCKS = [
    (16, 3, 16, 16, True, 2), (16, 3, 72, 24, False, 2), (24, 3, 88, 24, False, 1),
    (24, 5, 96, 40, True, 2), (40, 5, 240, 40, True, 1), (40, 5, 240, 40, True, 1),
    (40, 5, 120, 48, True, 1), (48, 5, 144, 48, True, 1), (48, 5, 288, 96, True, 2),
    (96, 5, 576, 96, True, 1), (96, 5, 576, 96, True, 1),
]


def _squeeze(channels: int) -> int:
    """torchvision's ``_make_divisible(channels // 4, 8)``."""
    value = max(8, int(channels // 4 + 4) // 8 * 8)
    return value + 8 if value < 0.9 * (channels // 4) else value


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, _squeeze(channels), 1)
        self.fc2 = nn.Conv2d(_squeeze(channels), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(scale))))


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
          act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.Hardswish()) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, se: bool,
                 stride: int) -> None:
        super().__init__()
        layers = [] if expanded == cin else [_conv(cin, expanded, 1)]
        layers.append(_conv(expanded, expanded, kernel, stride, groups=expanded))
        if se:
            layers.append(SqueezeExcitation(expanded))
        layers.append(_conv(expanded, cout, 1, act=False))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV3Small(nn.Module):
    """``features`` -> pool -> ``classifier`` (576 -> 1024 -> classes), torchvision's layout."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(_conv(3, 16, 3, 2),
                                      *(InvertedResidual(*b) for b in BLOCKS),
                                      _conv(96, 576, 1))
        self.classifier = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(),
                                        nn.Linear(1024, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def conv_linear_weights(model: nn.Module) -> dict[str, int]:
    """``{weight name: numel}`` of every Conv2d/Linear weight."""
    return {f"{n}.weight": m.weight.numel() for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}
