"""SegGPT's size settings and presets, kept free of torch so the workflow can check a config without loading it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SegGPTConfig:
    """Architecture and loss hyper-parameters of a SegGPT model."""

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 16
    # One half of the canvas (h, w); the canvas is (2h, w) with the prompt on top and the query below.
    tile_size: tuple[int, int] = (448, 448)
    # Grid of the absolute position table (pretrained at 224 px / 16); resized bicubically to the canvas.
    pretrain_grid: int = 14
    # Blocks 0..merge_index run the image and label streams separately; their average continues.
    merge_index: int = 2
    feature_layers: tuple[int, ...] = (5, 11, 17, 23)
    decoder_dim: int = 64
    drop_path_rate: float = 0.1
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    loss_beta: float = 0.01
    # Recompute each transformer block in the backward pass instead of keeping its activations (the attention's
    # relative-position terms, the MLP's hidden layer): on in the vit_large preset and for ViT-L widths read off
    # weights (fewseg.weights).
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        tile = self.tile_size
        tile = (int(tile), int(tile)) if isinstance(tile, int) else tuple(int(t) for t in tile)
        object.__setattr__(self, "tile_size", tile)
        object.__setattr__(self, "feature_layers", tuple(int(i) for i in self.feature_layers))
        if len(tile) != 2:
            raise ValueError(f"tile_size must be (h, w), got {self.tile_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if tile[0] % self.patch_size or tile[1] % self.patch_size:
            raise ValueError(f"tile_size={tile} is not a multiple of patch_size={self.patch_size}")
        if not 0 <= self.merge_index < self.depth:
            raise ValueError(f"merge_index={self.merge_index} must lie in [0, depth={self.depth})")
        layers = self.feature_layers
        if not layers or list(layers) != sorted(set(layers)):
            raise ValueError(f"feature_layers must be non-empty, increasing and unique, got {layers}")
        # Features are taken from the merged stream, so none may precede the merge.
        if layers[0] < self.merge_index or layers[-1] >= self.depth:
            raise ValueError(
                f"feature_layers={layers} must lie in [merge_index={self.merge_index}, depth={self.depth})"
            )

    @property
    def canvas_size(self) -> tuple[int, int]:
        return 2 * self.tile_size[0], self.tile_size[1]

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.canvas_size
        return h // self.patch_size, w // self.patch_size

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SegGPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SegGPTConfig fields: {unknown}")
        return cls(**dict(d))


PRESETS: dict[str, SegGPTConfig] = {
    # The released model, about 370M parameters.
    "vit_large": SegGPTConfig(grad_checkpointing=True),
    # Small enough to fine-tune on a laptop CPU.
    "tiny": SegGPTConfig(
        embed_dim=128,
        depth=6,
        num_heads=4,
        patch_size=16,
        tile_size=(128, 128),
        pretrain_grid=8,
        merge_index=1,
        feature_layers=(1, 3, 5),
        decoder_dim=16,
        drop_path_rate=0.0,
    ),
    # For unit and workflow tests.
    "micro": SegGPTConfig(
        embed_dim=32,
        depth=3,
        num_heads=2,
        patch_size=16,
        tile_size=(64, 64),
        pretrain_grid=4,
        merge_index=0,
        feature_layers=(1, 2),
        decoder_dim=8,
        drop_path_rate=0.0,
    ),
}
