"""Inference (SPEC section 7): tiled base prediction with a prompt ensemble and seam repair, and novel classes
under their learned prompts.

Geometry lives in small pure functions (tile boxes, seam crops, seam bands) so it can be tested on arrays with
known answers; the model is only called through :func:`predict_canvases`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fewseg.data import resize_image, resize_nearest
from fewseg.model import SegGPT
from fewseg.palette import BINARY_PALETTE, decode_canvas, to_tensor

log = logging.getLogger("fewseg.infer")

Box = tuple[int, int, int, int]  # y0, x0, y1, x1 in working-size pixels


# ---------------------------------------------------------------------------------------------------------------
# Geometry


def tile_boxes(size: int, grid: int) -> list[Box]:
    """A grid x grid cut of a size x size map, row-major; the last row/column absorbs any remainder."""
    edges = [round(i * size / grid) for i in range(grid + 1)]
    return [(edges[r], edges[c], edges[r + 1], edges[c + 1]) for r in range(grid) for c in range(grid)]


@dataclass(frozen=True)
class SeamCrop:
    """A crop centred on a seam of the tiling, and which of its patches are re-predicted."""

    box: Box
    band_rows: tuple[int, int] | None  # patch rows of the band inside the crop's grid, or None for the full height
    band_cols: tuple[int, int] | None


def seam_crops(size: int, grid: int, patches: int, band: int) -> list[SeamCrop]:
    """Seam-repair crops of a grid x grid tiling (SPEC section 7).

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


# ---------------------------------------------------------------------------------------------------------------
# Model calls


@torch.no_grad()
def predict_canvases(
    model: SegGPT,
    images: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray,
    *,
    ensemble: bool,
    device: torch.device,
    precision: str = "fp32",
) -> torch.Tensor:
    """Run the model on uint8 canvases (B, 2h, w, 3); ``mask`` is (num_patches,) or (B, num_patches)."""
    x = to_tensor(images).to(device)
    y = to_tensor(labels).to(device)
    m = torch.from_numpy(np.atleast_2d(mask)).to(device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with ctx:
        return model(x, y, m, feature_ensemble=ensemble and len(images) > 1).float()


def _label_half(pred: torch.Tensor, palette: np.ndarray, h: int) -> np.ndarray:
    return decode_canvas(pred[:, :, h:], palette)


# ---------------------------------------------------------------------------------------------------------------
# Base classes


@dataclass
class BasePrompt:
    """A prompt train tile at the working size: its image and its colour mask."""

    image: np.ndarray
    mask_rgb: np.ndarray


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
    precision: str = "fp32",
    progress: Callable[[], None] | None = None,
) -> np.ndarray:
    """Base-class ids for one query image at its own size."""
    cfg = model.config
    h, w = cfg.tile_size
    patches = cfg.tile_size[0] // cfg.patch_size
    work = resize_image(query, working_size)
    pairs = prompt_pairs([p.image for p in prompts], grid)
    prompt_imgs = [resize_image(prompts[p].image[y0:y1, x0:x1], (h, w)) for p, (y0, x0, y1, x1) in pairs]
    prompt_masks = [resize_nearest(prompts[p].mask_rgb[y0:y1, x0:x1], (h, w)) for p, (y0, x0, y1, x1) in pairs]
    full_query = canvas_mask(np.ones((patches, cfg.tile_size[1] // cfg.patch_size), dtype=bool))
    ids = np.zeros((working_size, working_size), dtype=np.uint8)
    for y0, x0, y1, x1 in tile_boxes(working_size, grid):
        q = resize_image(work[y0:y1, x0:x1], (h, w))
        images = np.stack([np.concatenate([pi, q]) for pi in prompt_imgs])
        labels = np.stack([np.concatenate([pm, pm]) for pm in prompt_masks])
        pred = predict_canvases(model, images, labels, full_query, ensemble=True, device=device, precision=precision)
        tile_ids = _label_half(pred[:1], palette, h)[0]
        ids[y0:y1, x0:x1] = resize_nearest(tile_ids, (y1 - y0, x1 - x0))
        if progress:
            progress()
    if seam_repair and grid > 1:
        ids = repair_seams(
            model, work, ids, prompt_imgs, prompt_masks, palette, grid=grid, band=seam_band, device=device,
            precision=precision,
        )  # fmt: skip
    return resize_nearest(ids, query.shape[:2])


def repair_seams(
    model: SegGPT,
    work: np.ndarray,
    ids: np.ndarray,
    prompt_imgs: Sequence[np.ndarray],
    prompt_masks: Sequence[np.ndarray],
    palette: np.ndarray,
    *,
    grid: int,
    band: int,
    device: torch.device,
    precision: str = "fp32",
) -> np.ndarray:
    """Re-predict bands around the tiling's seams with the first pass's colours as context (SPEC section 7)."""
    cfg = model.config
    h, w = cfg.tile_size
    patches = h // cfg.patch_size
    size = ids.shape[0]
    out = ids.copy()
    colours = palette[ids]
    ensemble = len(prompt_imgs) > 1
    for crop in seam_crops(size, grid, patches, band):
        y0, x0, y1, x1 = crop.box
        side = y1 - y0
        q = resize_image(work[y0:y1, x0:x1], (h, w))
        known = resize_nearest(colours[y0:y1, x0:x1], (h, w))
        qmask = band_mask(crop, patches)
        images = np.stack([np.concatenate([pi, q]) for pi in prompt_imgs])
        labels = np.stack([np.concatenate([pm, known]) for pm in prompt_masks])
        pred = predict_canvases(
            model, images, labels, canvas_mask(qmask), ensemble=ensemble, device=device, precision=precision
        )
        tile_ids = resize_nearest(_label_half(pred[:1], palette, h)[0], (side, side))
        pixel_band = resize_nearest(qmask.astype(np.uint8), (side, side)) > 0
        region = out[y0:y1, x0:x1]
        region[pixel_band] = tile_ids[pixel_band]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Novel classes


def predict_novel(
    model: SegGPT,
    query: np.ndarray,
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
) -> np.ndarray:
    """Binary mask (H, W) of one novel class under its learned prompt, at the query's own size."""
    cfg = model.config
    h, w = cfg.tile_size
    patches = h // cfg.patch_size
    work = resize_image(query, working_size)
    p_img = prompt_image.to(device)
    p_lab = prompt_label.to(device)
    boxes = tile_boxes(working_size, grid)
    mask = np.zeros((working_size, working_size), dtype=np.uint8)
    full_query = canvas_mask(np.ones((patches, w // cfg.patch_size), dtype=bool))
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start : start + batch_size]
        tiles = np.stack([resize_image(work[y0:y1, x0:x1], (h, w)) for y0, x0, y1, x1 in chunk])
        pred = _novel_forward(model, tiles, None, full_query, p_img, p_lab, device, precision)
        for (y0, x0, y1, x1), m in zip(chunk, decode_canvas(pred[:, :, h:], BINARY_PALETTE), strict=True):
            mask[y0:y1, x0:x1] = resize_nearest(m, (y1 - y0, x1 - x0))
    if seam_repair and grid > 1:
        crops = seam_crops(working_size, grid, patches, band=seam_band)
        out = mask.copy()
        colours = BINARY_PALETTE[mask]
        for crop in crops:
            y0, x0, y1, x1 = crop.box
            side = y1 - y0
            q = resize_image(work[y0:y1, x0:x1], (h, w))[None]
            known = resize_nearest(colours[y0:y1, x0:x1], (h, w))[None]
            qmask = band_mask(crop, patches)
            pred = _novel_forward(model, q, known, canvas_mask(qmask), p_img, p_lab, device, precision)
            m = resize_nearest(decode_canvas(pred[:, :, h:], BINARY_PALETTE)[0], (side, side))
            pixel_band = resize_nearest(qmask.astype(np.uint8), (side, side)) > 0
            region = out[y0:y1, x0:x1]
            region[pixel_band] = m[pixel_band]
        mask = out
    return resize_nearest(mask, query.shape[:2])


@torch.no_grad()
def _novel_forward(model, tiles, known, mask, p_img, p_lab, device, precision) -> torch.Tensor:
    q = to_tensor(tiles).to(device)
    lower = to_tensor(known).to(device) if known is not None else torch.zeros_like(q)
    b = q.shape[0]
    images = torch.cat([p_img.expand(b, -1, -1, -1), q], dim=2)
    labels = torch.cat([p_lab.expand(b, -1, -1, -1), lower], dim=2)
    m = torch.from_numpy(np.atleast_2d(mask)).to(device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with ctx:
        return model(images, labels, m).float()
