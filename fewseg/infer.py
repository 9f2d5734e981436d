"""Inference (method section 7): tiled prediction under a prompt ensemble, with seam repair.

Base classes and novel classes take one path, :func:`predict_tiled`: base classes with the ensemble of every tile
of the top-k train tiles and the class palette, a novel class with its one learned prompt and the binary palette.
Geometry lives in small pure functions (tile boxes, seam crops, seam bands) so it can be tested on arrays with
known answers; the model is only called through :func:`predict_canvases`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fewseg.data import resize_image, resize_nearest
from fewseg.model import SegGPT
from fewseg.palette import BINARY_PALETTE, decode_canvas, to_tensor
from fewseg.runtime import autocast, compute_dtype

log = logging.getLogger("fewseg.infer")

Box = tuple[int, int, int, int]  # y0, x0, y1, x1 in working-size pixels


# ---------------------------------------------------------------------------------------------------------------
# Geometry


def tile_boxes(size: int, grid: int) -> list[Box]:
    """A grid x grid cut of a size x size map, row-major; the last row/column absorbs any remainder."""
    edges = [round(i * size / grid) for i in range(grid + 1)]
    return [(edges[r], edges[c], edges[r + 1], edges[c + 1]) for r in range(grid) for c in range(grid)]


def boxes_touching(region: np.ndarray, working_size: int, grid: int) -> list[bool]:
    """Which tiles of the grid x grid cut (at the working size) cover any pixel of ``region`` (at the image's size).

    A tile's extent is mapped back to the image with a pixel of margin, so that every region pixel that the final
    nearest resize reads from a tile counts for it.
    """
    h, w = region.shape[:2]
    touched = []
    for y0, x0, y1, x1 in tile_boxes(working_size, grid):
        ys = slice(max(0, y0 * h // working_size - 1), min(h, -(-y1 * h // working_size) + 1))
        xs = slice(max(0, x0 * w // working_size - 1), min(w, -(-x1 * w // working_size) + 1))
        touched.append(bool(region[ys, xs].any()))
    return touched


@dataclass(frozen=True)
class SeamCrop:
    """A crop centred on a seam of the tiling, and which of its patches are re-predicted."""

    box: Box
    band_rows: tuple[int, int] | None  # patch rows of the band inside the crop's grid, or None for the full height
    band_cols: tuple[int, int] | None


def seam_crops(size: int, grid: int, patches: int, band: int) -> list[SeamCrop]:
    """Seam-repair crops of a grid x grid tiling (method section 7).

    For every interior seam, crops of one tile's size centred on the seam between each pair of neighbouring tiles;
    on a 2 x 2 tiling that is the published five: top-middle, bottom-middle, left-middle, right-middle and the
    centre. In a crop across a vertical seam the band is +-``band`` patch columns around its middle; across a
    horizontal seam, patch rows; at a crossing (the centre), the square where both bands meet. ``patches`` is the
    number of patches per side of the model's tile.
    """
    tile = size // grid
    half = tile // 2
    mid = patches // 2
    lo, hi = max(mid - band, 0), min(mid + band, patches)
    crops: list[SeamCrop] = []
    for r in range(grid):
        for c in range(1, grid):  # vertical seams at x = c * tile
            crops.append(SeamCrop((r * tile, c * tile - half, (r + 1) * tile, c * tile + half), None, (lo, hi)))
    for r in range(1, grid):
        for c in range(grid):  # horizontal seams at y = r * tile
            crops.append(SeamCrop((r * tile - half, c * tile, r * tile + half, (c + 1) * tile), (lo, hi), None))
    for r in range(1, grid):
        for c in range(1, grid):  # crossings
            crops.append(
                SeamCrop((r * tile - half, c * tile - half, r * tile + half, c * tile + half), (lo, hi), (lo, hi))
            )
    return crops


def band_mask(crop: SeamCrop, patches: int) -> np.ndarray:
    """(patches, patches) bool: the patches of the crop's query half that are masked and re-predicted."""
    mask = np.ones((patches, patches), dtype=bool)
    if crop.band_rows is not None:
        rows = np.zeros(patches, dtype=bool)
        rows[crop.band_rows[0] : crop.band_rows[1]] = True
        mask &= rows[:, None]
    if crop.band_cols is not None:
        cols = np.zeros(patches, dtype=bool)
        cols[crop.band_cols[0] : crop.band_cols[1]] = True
        mask &= cols[None, :]
    return mask


def canvas_mask(query_patches: np.ndarray) -> np.ndarray:
    """Full-canvas patch mask (prompt half never masked) from the query half's (rows, cols) mask."""
    return np.concatenate([np.zeros_like(query_patches), query_patches], axis=0).reshape(-1)


def prompt_pairs(prompt_tiles: Sequence[np.ndarray], grid: int) -> list[tuple[int, Box]]:
    """Every tile of every prompt image: (prompt index, box). k prompts at grid 2 give 4k pairs per query tile."""
    return [(p, box) for p in range(len(prompt_tiles)) for box in tile_boxes(prompt_tiles[p].shape[0], grid)]


def prompt_halves(prompts: Sequence[BasePrompt], grid: int, tile: tuple[int, int]) -> tuple[list, list]:
    """Images and colour masks of every prompt pair, resized to the model tile (bicubic / nearest)."""
    pairs = prompt_pairs([p.image for p in prompts], grid)
    images = [resize_image(prompts[p].image[y0:y1, x0:x1], tile) for p, (y0, x0, y1, x1) in pairs]
    masks = [resize_nearest(prompts[p].mask_rgb[y0:y1, x0:x1], tile) for p, (y0, x0, y1, x1) in pairs]
    return images, masks


# ---------------------------------------------------------------------------------------------------------------
# Model calls


@dataclass(frozen=True)
class Prompts:
    """The prompt halves of a feature ensemble, normalised, and the palette that decodes its predictions.

    Base classes bring every tile of the top-k train tiles (k canvases per query tile, class colours); a novel
    class brings its one learned prompt (k = 1, the binary palette). Both then run the same code.
    """

    images: torch.Tensor  # (k, 3, h, w)
    labels: torch.Tensor  # (k, 3, h, w)
    palette: np.ndarray

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Prompts:
        return Prompts(self.images.detach().to(device, dtype), self.labels.detach().to(device, dtype), self.palette)


@torch.inference_mode()
def predict_canvases(
    model: SegGPT,
    images: torch.Tensor,
    labels: torch.Tensor,
    mask: np.ndarray,
    *,
    ensemble: int,
    device: torch.device,
    precision: str = "fp32",
) -> torch.Tensor:
    """Query halves (B / ensemble, 3, h, w), one per query, predicted for normalised canvases (B, 3, 2h, w).

    ``mask`` is (num_patches,) or (B, num_patches); ``ensemble`` is the number of consecutive canvases that share
    one query half (image, label half and mask) and are feature-ensembled (0 or 1: none).
    """
    m = torch.from_numpy(np.atleast_2d(mask)).to(device)
    with autocast(device, precision):
        return model(
            images.to(device), labels.to(device), m, feature_ensemble=ensemble if ensemble > 1 else False,
            query_only=True, shared_query=True,
        ).float()  # fmt: skip


# Test-time mirrors of a query tile, as the tensor dims to flip: none, left-right, up-down, both. Aerial tiles have no
# up or left, so each mirror is as likely a scene as the original; averaging their predictions (mirrored back)
# steadies small objects and thin structures at one forward per mirror.
FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))


def flip_dims(flips: int) -> tuple[tuple[int, ...], ...]:
    """The first ``flips`` mirrors of :data:`FLIPS` (1: the query as it is, 2: and left-right, 4: all)."""
    if flips not in (1, 2, 4):
        raise ValueError(f"flips must be 1, 2 or 4, not {flips}")
    return FLIPS[:flips]


@torch.inference_mode()
def predict_ensembled(
    model: SegGPT,
    queries: Sequence[np.ndarray],
    lowers: Sequence[np.ndarray] | None,
    masks: Sequence[np.ndarray],
    prompts: Prompts,
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    flips: int = 1,
) -> list[np.ndarray]:
    """Class ids of each query tile under the feature ensemble of all prompt canvases.

    Query tile i is paired with every prompt (k canvases); its label half is ``lowers[i]`` (first-pass colours
    for seam repair) or, with ``lowers`` None, blank (the whole query half is masked, so its content is never
    read), and ``masks[i]`` its query-half patch mask. As many query tiles as fit in ``batch_size`` canvases share
    one forward (at least one). ``flips`` > 1 averages the predictions of mirrored queries (see :data:`FLIPS`).
    """
    # Canvases are built in the dtype the patch embedding reads them in under autocast: the same values as
    # building them in fp32 and letting autocast cast them, with half the bytes to repeat and concatenate.
    dtype = compute_dtype(device, precision)
    prompts = prompts.to(device, dtype)
    k = len(prompts)
    per_forward = max(1, batch_size // k)
    out: list[np.ndarray] = []
    for start in range(0, len(queries), per_forward):
        idx = range(start, min(start + per_forward, len(queries)))
        q = to_tensor(np.stack([queries[i] for i in idx])).to(device, dtype)
        if lowers is None:
            lower = torch.zeros_like(q)
        else:
            lower = to_tensor(np.stack([lowers[i] for i in idx])).to(device, dtype)
        n = len(idx)  # canvas i * k + j: query tile i under prompt j
        pred = None
        for dims in flip_dims(flips):
            # A mirrored query half (image, label half and patch mask alike) under the same, unmirrored prompts;
            # its prediction is mirrored back before it joins the average.
            # The unmirrored pass (the only one by default) copies nothing.
            mirror = (lambda t, dims=dims: t.flip(dims)) if dims else (lambda t: t)
            axes = tuple(d - 2 for d in dims)  # (B, C, H, W) dims -> (H, W) axes of a patch mask
            images = torch.cat([prompts.images.repeat(n, 1, 1, 1), mirror(q).repeat_interleave(k, dim=0)], dim=2)
            labels = torch.cat([prompts.labels.repeat(n, 1, 1, 1), mirror(lower).repeat_interleave(k, dim=0)], dim=2)
            mask = np.stack([canvas_mask(np.flip(masks[i], axes)) for i in idx for _ in range(k)])
            one = mirror(predict_canvases(model, images, labels, mask, ensemble=k, device=device, precision=precision))
            pred = one if pred is None else pred.add_(one)
        out.extend(decode_canvas(pred.div_(flips), prompts.palette))
    return out


def predict_tiled(model: SegGPT, query: np.ndarray, prompts: Prompts, **settings: Any) -> np.ndarray:
    """Class ids (palette indices) of one query image at its own size: a grid x grid tiling at the working size,
    each tile under the prompt ensemble, then optional seam repair (method section 7); ``settings`` as for
    :func:`predict_tiled_many`."""
    return predict_tiled_many(model, [query], prompts, **settings)[0]


def predict_tiled_many(
    model: SegGPT,
    queries: Sequence[np.ndarray],
    prompts: Prompts,
    *,
    working_size: int,
    grid: int,
    seam_repair: bool,
    seam_band: int,
    device: torch.device,
    batch_size: int = 8,
    precision: str = "fp32",
    flips: int = 1,
    regions: Sequence[np.ndarray] | None = None,
    outside: int = 0,
) -> list[np.ndarray]:
    """:func:`predict_tiled` for several query images under the same prompts, their tiles (and then their seam
    crops) sharing forwards: a novel class's few tiles per query would otherwise fill a small part of each batch.
    ``batch_size`` counts canvases per forward.

    ``regions`` (one boolean map per query, at its size; without seam repair only): predict just the tiles that
    touch the region and give the others ``outside``. Each tile is predicted on its own, so the region's ids are
    those of the whole prediction, at a fraction of its cost when the region is small. ``flips``: mirrored copies
    of each tile (and seam crop) whose predictions are averaged (:func:`flip_dims`).
    """
    cfg = model.config
    h, w = cfg.tile_size
    patches = h // cfg.patch_size
    works = [resize_image(query, working_size) for query in queries]
    whole = np.ones((patches, w // cfg.patch_size), dtype=bool)
    boxes = tile_boxes(working_size, grid)
    if regions is None:
        wanted = [[True] * len(boxes) for _ in works]
    elif seam_repair and grid > 1:
        raise ValueError("predicting only a region's tiles leaves seam repair without its neighbours")
    else:
        wanted = [boxes_touching(region, working_size, grid) for region in regions]
    tiles = [
        resize_image(work[y0:y1, x0:x1], (h, w))
        for work, keep in zip(works, wanted, strict=True)
        for (y0, x0, y1, x1), k in zip(boxes, keep, strict=True)
        if k
    ]
    predicted = iter(predict_ensembled(
        model, tiles, None, [whole] * len(tiles), prompts, batch_size=batch_size, device=device, precision=precision,
        flips=flips,
    ))  # fmt: skip
    ids_per_query = []
    for keep in wanted:
        ids = np.full((working_size, working_size), outside, dtype=np.uint8)
        for (y0, x0, y1, x1), k in zip(boxes, keep, strict=True):
            if k:
                ids[y0:y1, x0:x1] = resize_nearest(next(predicted), (y1 - y0, x1 - x0))
        ids_per_query.append(ids)
    if seam_repair and grid > 1:
        ids_per_query = repair_seams(
            model, works, ids_per_query, prompts, grid=grid, band=seam_band, device=device, batch_size=batch_size,
            precision=precision, flips=flips,
        )  # fmt: skip
    return [resize_nearest(ids, query.shape[:2]) for ids, query in zip(ids_per_query, queries, strict=True)]


def repair_seams(
    model: SegGPT,
    works: Sequence[np.ndarray],
    ids_per_query: Sequence[np.ndarray],
    prompts: Prompts,
    *,
    grid: int,
    band: int,
    device: torch.device,
    batch_size: int = 8,
    precision: str = "fp32",
    flips: int = 1,
) -> list[np.ndarray]:
    """Re-predict bands around the tiling's seams with the first pass's colours as context (method section 7).

    Every crop reads the first pass only, so all crops of all the queries are predicted together and pasted
    afterwards. ``works``: the queries at the working size; ``ids_per_query``: their first-pass ids.
    """
    cfg = model.config
    h, w = cfg.tile_size
    patches = h // cfg.patch_size
    crops = seam_crops(ids_per_query[0].shape[0], grid, patches, band) if ids_per_query else []
    masks = [band_mask(crop, patches) for crop in crops]
    queries, lowers = [], []
    for work, ids in zip(works, ids_per_query, strict=True):
        colours = prompts.palette[ids]
        for y0, x0, y1, x1 in (crop.box for crop in crops):
            queries.append(resize_image(work[y0:y1, x0:x1], (h, w)))
            lowers.append(resize_nearest(colours[y0:y1, x0:x1], (h, w)))
    predicted = predict_ensembled(
        model, queries, lowers, masks * len(works), prompts, batch_size=batch_size, device=device, precision=precision,
        flips=flips,
    )  # fmt: skip
    n = len(crops)
    return [paste_bands(ids, crops, masks, predicted[i * n : (i + 1) * n]) for i, ids in enumerate(ids_per_query)]


def paste_bands(
    ids: np.ndarray, crops: Sequence[SeamCrop], masks: Sequence[np.ndarray], predicted: Sequence[np.ndarray]
) -> np.ndarray:
    """A copy of ``ids`` with each crop's re-predicted band (its patch mask, scaled to the crop) pasted in."""
    out = ids.copy()
    for crop, qmask, tile_ids in zip(crops, masks, predicted, strict=True):
        y0, x0, y1, x1 = crop.box
        side = y1 - y0
        tile_ids = resize_nearest(tile_ids, (side, side))
        pixel_band = resize_nearest(qmask.astype(np.uint8), (side, side)) > 0
        region = out[y0:y1, x0:x1]
        region[pixel_band] = tile_ids[pixel_band]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Base classes


@dataclass
class BasePrompt:
    """A prompt train tile at the working size: its image and its colour mask."""

    image: np.ndarray
    mask_rgb: np.ndarray


def base_prompts(prompts: Sequence[BasePrompt], grid: int, tile: tuple[int, int], palette: np.ndarray) -> Prompts:
    """The ensemble of every tile of every prompt train tile, decoded with the base classes' palette."""
    images, masks = prompt_halves(prompts, grid, tile)
    return Prompts(to_tensor(np.stack(images)), to_tensor(np.stack(masks)), palette)


def predict_base(
    model: SegGPT,
    query: np.ndarray,
    prompts: Sequence[BasePrompt],
    palette: np.ndarray,
    *,
    working_size: int,
    grid: int,
    seam_repair: bool,
    seam_band: int,
    device: torch.device,
    batch_size: int = 8,
    precision: str = "fp32",
    flips: int = 1,
    region: np.ndarray | None = None,
    outside: int = 0,
) -> np.ndarray:
    """Base-class ids for one query image at its own size (or only where ``region`` is, see predict_tiled_many)."""
    ensemble = base_prompts(prompts, grid, model.config.tile_size, palette)
    return predict_tiled_many(
        model, [query], ensemble, working_size=working_size, grid=grid, seam_repair=seam_repair, seam_band=seam_band,
        device=device, batch_size=batch_size, precision=precision, regions=None if region is None else [region],
        outside=outside, flips=flips,
    )[0]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Novel classes


def novel_prompts(prompt_image: torch.Tensor, prompt_label: torch.Tensor) -> Prompts:
    """A learned prompt (1, 3, h, w) pair as a one-canvas ensemble, decoded with the binary palette."""
    return Prompts(prompt_image, prompt_label, BINARY_PALETTE)


def predict_novel(
    model: SegGPT, query: np.ndarray, prompt_image: torch.Tensor, prompt_label: torch.Tensor, **settings: Any
) -> np.ndarray:
    """Binary mask (H, W) of one novel class under its learned prompt, at the query's own size; ``settings`` as
    for :func:`predict_novel_many`."""
    return predict_novel_many(model, [query], prompt_image, prompt_label, **settings)[0]


def predict_novel_many(
    model: SegGPT,
    queries: Sequence[np.ndarray],
    prompt_image: torch.Tensor,
    prompt_label: torch.Tensor,
    *,
    working_size: int,
    grid: int,
    seam_repair: bool,
    seam_band: int,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    flips: int = 1,
) -> list[np.ndarray]:
    """:func:`predict_novel` for several queries, whose tiles share forwards (one prompt serves them all)."""
    return predict_tiled_many(
        model, queries, novel_prompts(prompt_image, prompt_label), working_size=working_size, grid=grid,
        seam_repair=seam_repair, seam_band=seam_band, device=device, batch_size=batch_size, precision=precision,
        flips=flips,
    )  # fmt: skip
