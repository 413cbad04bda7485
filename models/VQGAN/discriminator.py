"""PatchGAN discriminator: judges overlapping patches, so it sharpens texture without a perceptual net."""
from __future__ import annotations

import torch
import torch.nn as nn


class Discriminator(nn.Module):
    def __init__(self, image_channels: int = 3, base_channels: int = 64, n_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(image_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for i in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(base_channels * prev, base_channels * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(base_channels * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(base_channels * mult, 1, 4, 1, 1))
        self.model = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
