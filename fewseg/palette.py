"""Class-id <-> colour conversion.

SegGPT reads and writes labels as RGB pictures, so every class needs a colour: a fixed palette for the train masks
and for decoding, fresh random palettes during base training (so the model learns to read the prompt rather than to
memorise colours), and black/white for binary novel-class prompts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported only by the functions that need it, so data stages start fast
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BINARY_PALETTE = np.array([[0, 0, 0], [255, 255, 255]], dtype=np.uint8)


def as_palette(colors) -> np.ndarray:
    """Validate a list of RGB triples and return it as a (K, 3) uint8 array; colours must be distinct."""
    palette = np.asarray(colors, dtype=np.int64)
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"a palette is a list of [R, G, B] triples, got shape {palette.shape}")
    if palette.min() < 0 or palette.max() > 255:
        raise ValueError("palette values must lie in 0..255")
    if len({tuple(c) for c in palette.tolist()}) != len(palette):
        raise ValueError("palette colours must be distinct, or two classes would decode to one")
    return palette.astype(np.uint8)


def ids_to_rgb(ids: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Paint an (H, W) id map with ``palette`` (index = class id); ids beyond the palette are an error."""
    ids = np.asarray(ids)
    if ids.size and int(ids.max()) >= len(palette):
        raise ValueError(f"class id {int(ids.max())} has no colour in a palette of {len(palette)}")
    return palette[ids]


def rgb_to_ids(rgb: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Give each pixel the id of the nearest palette colour (L2 in RGB); exact for painted masks."""
    flat = np.asarray(rgb, dtype=np.float32).reshape(-1, 3)
    pal = np.asarray(palette, dtype=np.float32)
    # |x - p|^2 = |x|^2 - 2 x.p + |p|^2; |x|^2 is the same for every p, so it drops out of the argmin.
    scores = flat @ pal.T * -2.0 + (pal * pal).sum(1)[None]
    return scores.argmin(1).astype(np.uint8).reshape(np.shape(rgb)[:-1])


def decode_canvas(pred: torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """Decode predicted label pictures (B, 3, H, W) in normalised space to (B, H, W) uint8 ids."""
    import torch

    rgb = unnormalize(pred.float()).clamp_(0, 1)  # in [0, 1]; the palette is scaled instead
    pal = np.asarray(palette, dtype=np.float64)
    red, green, blue = rgb.unbind(1)

    def score(k: int) -> torch.Tensor:
        # The nearest colour c maximises x.c - |c|^2 / 2 (|x - c|^2 less the |x|^2 all colours share), here with
        # x = 255 rgb: three planes weighted, one pass each, instead of a difference, a square and a channel sum.
        c = pal[k]
        s = red * float(c[0] / 255.0)
        s.add_(green, alpha=float(c[1] / 255.0)).add_(blue, alpha=float(c[2] / 255.0))
        return s.sub_(float(c @ c) / (2 * 255.0**2))

    # One palette entry at a time: K passes over whole planes run far faster than an argmax over a short K axis
    # (a third of a small model's inference), and the strict > keeps the first of equally near colours.
    best = score(0)
    ids = torch.zeros(best.shape, dtype=torch.uint8, device=rgb.device)
    for k in range(1, len(pal)):
        s = score(k)
        ids.masked_fill_(s > best, k)
        torch.maximum(best, s, out=best)
    return ids.cpu().numpy()


def random_palette(num_classes: int, generator: np.random.Generator, min_distance: float = 48.0) -> np.ndarray:
    """Draw ``num_classes`` random colours that are pairwise at least ``min_distance`` apart in RGB."""
    colors: list[np.ndarray] = []
    while len(colors) < num_classes:
        candidate = generator.integers(0, 256, size=3)
        if all(np.linalg.norm(candidate - c) >= min_distance for c in colors):
            colors.append(candidate)
    return np.stack(colors).astype(np.uint8)


def normalize(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) values in [0, 1] -> ImageNet-normalised, SegGPT's input and output space."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return (rgb - mean) / std


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    import torch

    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x * std + mean


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 or (B, H, W, 3) -> normalised float tensor (B, 3, H, W)."""
    import torch

    arr = np.asarray(rgb)
    if arr.ndim == 3:
        arr = arr[None]
    t = torch.from_numpy(np.require(arr, np.uint8, ["C", "W"])).permute(0, 3, 1, 2).float() / 255.0
    return normalize(t)
