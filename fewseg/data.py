"""Training samples for the base model and the prompts, drawn lazily and reproducibly.

Nothing here materialises the O(N^2) list of train pairs or holds every decoded tile: pairs come from an affine
permutation of the pair indices (O(1) memory), and decoded tiles sit in a small LRU cache. Every random choice of a
step derives from (seed, step), so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter

from fewseg.io import read_image, read_label
from fewseg.palette import BINARY_PALETTE, random_palette, rgb_to_ids

# ---------------------------------------------------------------------------------------------------------------
# Pairs without the pair list


def num_pairs(n: int) -> int:
    return n * (n - 1) // 2


def pair_at(k: int, n: int) -> tuple[int, int]:
    """The k-th unordered pair (i < j) of n items in row-major order, computed, not looked up."""
    if not 0 <= k < num_pairs(n):
        raise IndexError(f"pair {k} out of range for {n} items")
    # Row i holds pairs (i, i+1..n-1); find the row by solving the triangular sum, then fix rounding.
    i = int(n - 2 - math.floor(math.sqrt(-8 * k + 4 * n * (n - 1) - 7) / 2.0 - 0.5))
    start = i * (2 * n - i - 1) // 2
    while start > k:
        i -= 1
        start = i * (2 * n - i - 1) // 2
    while start + (n - i - 1) <= k:
        start += n - i - 1
        i += 1
    return i, i + 1 + (k - start)


class LazyPermutation:
    """A seeded bijection of range(size): k -> (a k + b) mod size with gcd(a, size) = 1; O(1) memory."""

    def __init__(self, size: int, seed: Sequence[int] | int):
        rng = np.random.default_rng(seed)
        self.size = size
        self.b = int(rng.integers(0, max(size, 1)))
        a = int(rng.integers(1, max(size, 2)))
        while math.gcd(a, size) != 1:
            a = a % (size - 1) + 1 if size > 2 else 1
        self.a = a

    def __call__(self, k: int) -> int:
        return (self.a * k + self.b) % self.size


# ---------------------------------------------------------------------------------------------------------------
# Tiles


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bicubic resize of an (H, W, 3) uint8 image to ``size`` (side, or (h, w))."""
    h, w = (size, size) if isinstance(size, int) else size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))


def resize_nearest(array: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map or colour mask."""
    h, w = (size, size) if isinstance(size, int) else size
    if array.shape[:2] == (h, w):
        return array
    return np.asarray(Image.fromarray(array).resize((w, h), Image.NEAREST))


class TileStore:
    """Train tiles resized to the working size, decoded to class ids, with a bounded LRU cache."""

    def __init__(self, tiles: Sequence[dict], working_size: int, palette: np.ndarray, cache_size: int = 64):
        self.tiles = list(tiles)
        self.working_size = working_size
        self.palette = palette
        self.cache_size = cache_size
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.tiles)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        tile = self.tiles[i]
        image = resize_image(read_image(tile["image"]), self.working_size)
        if "mask" in tile:
            ids = rgb_to_ids(read_image(tile["mask"]), self.palette)
        else:
            ids = read_label(tile["label"])
        ids = resize_nearest(ids, self.working_size)
        if self.cache_size:
            self._cache[i] = (image, ids)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return image, ids


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma)))


def flip(arrays: Sequence[np.ndarray], horizontal: bool, vertical: bool) -> list[np.ndarray]:
    out = []
    for a in arrays:
        if horizontal:
            a = a[:, ::-1]
        if vertical:
            a = a[::-1]
        out.append(np.ascontiguousarray(a))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Masks over the canvas's patch grid (row-major, prompt half first)


def query_half_patches(grid: tuple[int, int]) -> np.ndarray:
    """Inference mask over a canvas's (rows, cols) patch grid: the query half is masked, the prompt half kept.

    The one definition of the model's masks: ``torch.from_numpy(mask)[None]`` is a batch-1 mask of the model.
    """
    rows, cols = grid
    mask = np.zeros((rows, cols), dtype=bool)
    mask[rows // 2 :] = True
    return mask.reshape(-1)


def random_patches(grid: tuple[int, int], ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Training mask: round(ratio * patches) patches, drawn uniformly over the whole canvas with ``rng``."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    n = grid[0] * grid[1]
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: int(round(ratio * n))]] = True
    return mask


# ---------------------------------------------------------------------------------------------------------------
# Base-training sample


def base_sample(
    store: TileStore,
    first: int,
    second: int,
    rng: np.random.Generator,
    *,
    tile: tuple[int, int],
    grid: tuple[int, int],
    num_colors: int,
    mask_ratio: float,
    blur_prob: float,
    blur_sigma: Sequence[float],
    fixed_palette: np.ndarray | None = None,
    random_palette_prob: float = 1.0,
    binary_prob: float = 0.0,
) -> dict:
    """One training canvas from two train tiles (method section 5).

    A fresh random palette paints both labels; the same flips and crop location apply to both tiles; blur touches
    images only. Same class set in both crops: mask the query half; otherwise a random share of all patches.
    With ``random_palette_prob`` below 1, some samples use ``fixed_palette`` instead: a shortcut for tiny models
    with little training time (the published system always draws a random palette).

    With ``binary_prob`` above 0, that share of samples shows one class (present in both crops) white on black
    instead: the very task a novel-class prompt poses at inference, on real textures (not in the published system).
    """
    if rng.random() < 0.5:
        first, second = second, first
    (img_a, ids_a), (img_b, ids_b) = store.get(first), store.get(second)
    th, tw = tile
    size = store.working_size
    y = int(rng.integers(0, size - th + 1))
    x = int(rng.integers(0, size - tw + 1))
    crops = [a[y : y + th, x : x + tw] for a in (img_a, ids_a, img_b, ids_b)]
    crops = flip(crops, bool(rng.random() < 0.5), bool(rng.random() < 0.5))
    img_a, ids_a, img_b, ids_b = crops
    marked = mark_one_class(ids_a, ids_b, rng) if binary_prob > 0 and rng.random() < binary_prob else None
    if marked is not None:
        ids_a, ids_b = marked
        palette = BINARY_PALETTE
    else:
        use_random = fixed_palette is None or rng.random() < random_palette_prob
        palette = random_palette(num_colors, rng) if use_random else fixed_palette[:num_colors]
    if rng.random() < blur_prob:
        img_a = blur(img_a, float(rng.uniform(*blur_sigma)))
    if rng.random() < blur_prob:
        img_b = blur(img_b, float(rng.uniform(*blur_sigma)))
    return pair_canvas((img_a, ids_a), (img_b, ids_b), palette, grid, mask_ratio, rng)


def mark_one_class(
    ids_a: np.ndarray, ids_b: np.ndarray, rng: np.random.Generator, skip_zero: bool = False
) -> tuple[np.ndarray, np.ndarray] | None:
    """Both label arrays with one class they share as 1 and all else 0, the task a novel-class prompt sets; None
    when they share no class. ``skip_zero`` prefers any shared class other than 0 where there is one."""
    shared = np.intersect1d(ids_a, ids_b)
    if skip_zero and (shared > 0).any():
        shared = shared[shared > 0]
    if not len(shared):
        return None
    cls = shared[int(rng.integers(0, len(shared)))]
    return (ids_a == cls).astype(np.uint8), (ids_b == cls).astype(np.uint8)


def pair_canvas(
    prompt: tuple[np.ndarray, np.ndarray],
    query: tuple[np.ndarray, np.ndarray],
    palette: np.ndarray,
    grid: tuple[int, int],
    mask_ratio: float,
    rng: np.random.Generator,
) -> dict:
    """Stack a (prompt, query) pair of (image, ids) into one training canvas with its patch mask (method
    section 5): the same class set in both halves masks the query half; otherwise a random share of all patches."""
    (img_a, ids_a), (img_b, ids_b) = prompt, query
    same = set(np.unique(ids_a).tolist()) == set(np.unique(ids_b).tolist())
    mask = query_half_patches(grid) if same else random_patches(grid, mask_ratio, rng)
    return {
        "image": np.concatenate([img_a, img_b], axis=0),
        "label": np.concatenate([palette[ids_a], palette[ids_b]], axis=0),
        "ids": np.concatenate([ids_a, ids_b], axis=0),
        "palette": palette,
        "mask": mask,
    }
