"""The three small layers SegGPT's blocks and decoder need, written here rather than imported from timm.

Importing ``timm.layers`` imports torchvision (about 2 s on 2 CPU cores), and every workflow job that loads the model
paid it. These match timm's ``Mlp``, ``LayerNorm2d`` and ``DropPath`` in parameter names, initialisation order,
random draws and numerics (tests/test_model.py holds them against timm's).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Mlp(nn.Module):
    """fc1 -> activation -> fc2, as a ViT block's MLP (no dropout: SegGPT trains without it)."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth: in training, drop the residual branch of whole samples, scaling the kept ones up."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def trunc_normal_(tensor: Tensor, std: float = 1.0, bound: float = 2.0) -> Tensor:
    """Normal(0, std) initialisation cut at +-bound (absolute, not in stds), by inverse-CDF sampling: one uniform
    draw per element, as timm draws it, so that a seed gives timm's weights (torch's own version draws otherwise)."""

    def cdf(x: float) -> float:
        return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))

    low, high = cdf(-bound / std), cdf(bound / std)
    with torch.no_grad():
        tensor.uniform_(2.0 * low - 1.0, 2.0 * high - 1.0).erfinv_()
        return tensor.mul_(std * math.sqrt(2.0)).clamp_(min=-bound, max=bound)
