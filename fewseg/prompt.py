"""The learnable prompt of a novel class (method section 6) and the dense multi-scale crops it is trained on."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fewseg.data import query_half_patches
from fewseg.model import SegGPT


def crop_windows(size: int, crop_size: int, max_crop_size: int, stride: int) -> list[tuple[int, int, int]]:
    """Dense crops (y, x, side) of a ``size``-square tile: from the smallest crop and stride, both doubling while the
    crop is no larger than ``max_crop_size``. Positions run ``range(0, size - crop, stride)`` as in the published
    system (class 8 at 1024 px, crop 128, stride 16: 56 x 56 = 3,136 crops)."""
    windows = []
    crop, step = crop_size, stride
    while crop <= max_crop_size and crop <= size:
        positions = range(0, max(size - crop, 1), step)
        windows += [(y, x, crop) for y in positions for x in positions]
        crop, step = crop * 2, step * 2
    return windows


class LearnablePrompt(nn.Module):
    """A prompt image and a prompt label, both (1, 3, h, w) in normalised space, placed above the query."""

    def __init__(self, tile_size: Sequence[int], init_std: float = 0.01, generator: torch.Generator | None = None):
        super().__init__()
        h, w = tile_size
        self.prompt_image = nn.Parameter(torch.randn(1, 3, h, w, generator=generator) * init_std)
        self.prompt_label = nn.Parameter(torch.randn(1, 3, h, w, generator=generator) * init_std)

    def canvases(self, query: torch.Tensor, query_label: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Image and label canvases for a batch of query tiles (B, 3, h, w)."""
        b = query.shape[0]
        images = torch.cat([self.prompt_image.expand(b, -1, -1, -1), query], dim=2)
        lower = query_label if query_label is not None else torch.zeros_like(query)
        labels = torch.cat([self.prompt_label.expand(b, -1, -1, -1), lower], dim=2)
        return images, labels

    def forward(self, model: SegGPT, query: torch.Tensor) -> torch.Tensor:
        """Predicted label canvas for the queries; the loss is taken on the query half only."""
        images, labels = self.canvases(query)
        mask = torch.from_numpy(query_half_patches(model.config.grid_size))[None].to(query.device)
        return model(images, labels, mask)
