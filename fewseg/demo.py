"""A small synthetic dataset in the exact layout of the OpenEarthMap few-shot challenge.

It lets the whole workflow run on a laptop CPU in minutes, and it is learnable: every class has its own colour,
texture and shape, drawn with mild shading and noise so that it is not a per-pixel lookup table.

Layout written under ``root`` (file names are ``<place>_<n>.tif``, train and test use different places)::

    trainset/images/<stem>.tif        RGB uint8 GeoTIFF
    trainset/labels/<stem>.tif        class ids, base classes 0..7 only
    testset/images/<stem>.tif         support and query tiles
    testset/labels/<stem>.tif         support tiles only: one novel class id where it is, 0 elsewhere
    testset_query_labels/<stem>.tif   full ground truth of the query tiles (0..11), for evaluation only
    manifest.json                     arguments, stems per split, class names and class pixel fractions

Scenes: a partition of the tile into a few large warped Voronoi regions of classes 0, 1, 2, 3, 4 and 6; one to
three roads (5) crossing the tile; buildings (7) with red-brown roofs. Novel objects: vehicles (8) on roads,
parking lots with white stall markings (9) beside roads, sport fields with white lines (10) and buildings with a
light gabled roof (11). Train tiles show novel objects too, labelled 0 ("background/other"), as the challenge's train
labels hold base classes only while its imagery shows every class; each support tile holds several instances of
exactly one novel class, labelled, and (``support_distractors``) the other novel classes unlabelled, as a query
shows them; query tiles hold a mix.

Every tile draws from its own random stream derived from ``seed``, so equal arguments give byte-identical files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from rasterio.crs import CRS
from rasterio.transform import Affine

from fewseg.io import atomic_dir, write_geotiff, write_json

DEMO_CLASSES: dict[int, str] = {
    0: "background/other",
    1: "tree",
    2: "rangeland",
    3: "bareland",
    4: "agriculture land type 1",
    5: "road type 1",
    6: "sea/lake/pond",
    7: "building type 1",
    8: "vehicle & cargo-trailer",
    9: "parking space",
    10: "sport field",
    11: "building type 2",
}
BASE_IDS = (1, 2, 3, 4, 5, 6, 7)
NOVEL_IDS = (8, 9, 10, 11)

TRAIN_PLACE = "demoville"
TEST_PLACE = "demotown"
CRS_EPSG = 32630  # WGS 84 / UTM zone 30N
PIXEL_SIZE = 0.5  # metres
_ORIGIN = (430000.0, 4580000.0)  # x (easting), y (northing) of the first tile's top-left corner

# Regions of the land-cover partition; roads and buildings are drawn on top.
_AREA_CLASSES = (0, 1, 2, 3, 4, 6)
_MIN_SUPPORT_FRACTION = 0.012  # each support tile holds at least this share of its novel class
_QUERY_PRESENCE = 0.6  # share of the query tiles that show each novel class
_ATTEMPTS = 30  # fresh draws of a tile whose objects found no room


# ---------------------------------------------------------------------------------------------------------------
# Drawing primitives


def _noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth value noise with features about ``cell`` pixels wide, zero mean and unit spread."""
    gh, gw = int(math.ceil(h / cell)) + 2, int(math.ceil(w / cell)) + 2
    grid = Image.fromarray(rng.standard_normal((gh, gw)).astype(np.float32))
    big = np.asarray(grid.resize((int(gw * cell), int(gh * cell)), Image.Resampling.BICUBIC))
    field = big[:h, :w].astype(np.float32)
    return (field - field.mean()) / (field.std() + 1e-6)


@dataclass
class _Rect:
    """A rotated rectangle: local coordinates ``u`` (along ``angle``) and ``v`` over its bounding window."""

    window: tuple[slice, slice]
    u: np.ndarray
    v: np.ndarray
    inside: np.ndarray


def _rect(shape, cy, cx, half_len, half_wid, angle, margin=0.0) -> _Rect | None:
    h, w = shape
    r = math.hypot(half_len, half_wid) + margin + 1.0
    y0, y1 = max(0, int(math.floor(cy - r))), min(h, int(math.ceil(cy + r)) + 1)
    x0, x1 = max(0, int(math.floor(cx - r))), min(w, int(math.ceil(cx + r)) + 1)
    if y0 >= y1 or x0 >= x1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy + 0.5 - cy, xx + 0.5 - cx
    c, s = math.cos(angle), math.sin(angle)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    inside = (np.abs(u) <= half_len + margin) & (np.abs(v) <= half_wid + margin)
    return _Rect((slice(y0, y1), slice(x0, x1)), u, v, inside)


@dataclass
class _Road:
    """A band of ``width`` pixels around a gently bent centre line through ``(y0, x0)`` at ``angle``."""

    y0: float
    x0: float
    angle: float
    width: float
    amp: float
    wavelength: float
    phase: float

    def coords(self, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distance along the road, signed distance from its centre line) of pixel centres."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        dy, dx = yy + 0.5 - self.y0, xx + 0.5 - self.x0
        t = dx * c + dy * s
        off = -dx * s + dy * c - self.amp * np.sin(2 * np.pi * t / self.wavelength + self.phase)
        return t, off

    def point(self, t: float, off: float) -> tuple[float, float, float]:
        """(y, x, local direction) of the point ``t`` along the road and ``off`` across it."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        k = 2 * math.pi / self.wavelength
        bend = self.amp * math.sin(k * t + self.phase) + off
        y = self.y0 + t * s + bend * c
        x = self.x0 + t * c - bend * s
        return y, x, self.angle + math.atan(self.amp * k * math.cos(k * t + self.phase))


class _Scene:
    """One tile being drawn: an RGB float image, its full label map and the footprints already taken."""

    def __init__(self, rng: np.random.Generator, size: int):
        self.rng = rng
        self.size = size
        self.shape = (size, size)
        self.img = np.zeros((size, size, 3), np.float32)
        self.label = np.zeros((size, size), np.uint8)
        self.taken = np.zeros((size, size), bool)  # buildings, lots, fields, vehicles
        self.shadow = np.ones((size, size), np.float32)
        self.roads: list[_Road] = []
        yy, xx = np.mgrid[0:size, 0:size]
        self.yy, self.xx = yy.astype(np.float32), xx.astype(np.float32)

    def jitter(self, rgb, amount: float = 10.0) -> np.ndarray:
        return np.asarray(rgb, np.float32) + self.rng.uniform(-amount, amount, 3).astype(np.float32)

    # -- base land cover ----------------------------------------------------------------------------------------

    def land_cover(self) -> None:
        rng, n = self.rng, self.size
        scale = (n / 256.0) ** 2
        count = int(np.clip(round(rng.uniform(7, 10) * scale), 6, 40))
        min_dist = 0.55 * n / math.sqrt(count)
        seeds: list[tuple[float, float]] = []
        for _ in range(count * 60):
            p = (rng.uniform(0, n), rng.uniform(0, n))
            if all(math.hypot(p[0] - q[0], p[1] - q[1]) >= min_dist for q in seeds):
                seeds.append(p)
            if len(seeds) == count:
                break
        classes = list(rng.permutation(_AREA_CLASSES))
        if rng.random() < 0.25:  # now and then a tile lacks one land-cover class
            classes.pop()
        while len(classes) < len(seeds):
            classes.append(int(rng.choice(_AREA_CLASSES)))
        classes = [int(c) for c in classes[: len(seeds)]]
        amp = 0.06 * n
        wy = self.yy + amp * _noise(rng, n, n, n / 4)
        wx = self.xx + amp * _noise(rng, n, n, n / 4)
        dist = np.stack([(wy - sy) ** 2 + (wx - sx) ** 2 for sy, sx in seeds])
        region = dist.argmin(0)
        for r, cls in enumerate(classes):
            self._paint(cls, region == r)

    def _paint(self, cls: int, mask: np.ndarray) -> None:
        """Give the pixels of ``mask`` class ``cls`` and a fresh patch of its texture."""
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if rows.size == 0:
            return
        win = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        m = mask[win]
        self.label[win][m] = cls
        self.img[win][m] = self._texture(cls, self.yy[win], self.xx[win])[m]

    def _texture(self, cls: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        rng, n = self.rng, self.size
        h, w = yy.shape
        if cls == 0:  # urban clutter: small blocks of grey and beige, a few dark specks
            cell = int(rng.integers(3, 7))
            t = rng.random((h // cell + 1, w // cell + 1)).astype(np.float32)
            t = np.repeat(np.repeat(t, cell, 0), cell, 1)[:h, :w, None]
            grey, beige = self.jitter((118, 118, 124), 6), self.jitter((200, 186, 160), 6)
            tex = grey * (1 - t) + beige * t
            tex *= np.where(rng.random((h, w)) < 0.04, 0.6, 1.0)[..., None]
        elif cls == 1:  # trees: dark green, blobby crowns with grain
            crowns = np.tanh(_noise(rng, h, w, 4.5) + 0.5 * _noise(rng, h, w, 2))
            tex = self.jitter((42, 86, 36), 6) * (0.78 + 0.28 * crowns)[..., None]
        elif cls == 2:  # rangeland: light olive, smooth
            tex = self.jitter((146, 168, 94), 8) * (1 + 0.04 * _noise(rng, h, w, 40))[..., None]
        elif cls == 3:  # bareland: tan with speckle
            tex = self.jitter((192, 148, 100), 8) * (1 + 0.05 * _noise(rng, h, w, 24))[..., None]
            u = rng.random((h, w))
            tex *= np.where(u < 0.08, 0.72, np.where(u > 0.95, 1.15, 1.0))[..., None]
        elif cls == 4:  # agriculture: yellow-green with parallel field rows
            a = rng.uniform(0, np.pi)
            period = rng.uniform(5, 9)
            rows = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * math.cos(a) + yy * math.sin(a)) / period)
            light, dark = self.jitter((186, 196, 84), 8), self.jitter((132, 156, 58), 8)
            tex = dark + (light - dark) * rows[..., None]
        elif cls == 5:  # road: dark grey, smooth
            tex = self.jitter((84, 85, 90), 4) * (1 + 0.03 * _noise(rng, h, w, 16))[..., None]
        elif cls == 6:  # water: blue, smooth, with a slight gradient
            a = rng.uniform(0, 2 * np.pi)
            ramp = (xx * math.cos(a) + yy * math.sin(a)) / n
            tex = self.jitter((38, 78, 150), 8) * (0.92 + 0.14 * ramp + 0.015 * _noise(rng, h, w, 48))[..., None]
        else:
            raise ValueError(f"no texture for class {cls}")
        return tex.astype(np.float32)

    # -- roads ----------------------------------------------------------------------------------------------------

    def roads_layer(self, count: int) -> None:
        rng, n = self.rng, self.size
        angles = rng.uniform(0, np.pi) + np.arange(count) * np.pi / count + rng.uniform(-0.3, 0.3, count)
        for a in angles:
            road = _Road(
                y0=float(rng.uniform(0.2, 0.8) * n),
                x0=float(rng.uniform(0.2, 0.8) * n),
                angle=float(a),
                width=float(rng.uniform(6, 12)),
                amp=float(rng.uniform(0, 0.05 * n)) if rng.random() < 0.6 else 0.0,
                wavelength=float(rng.uniform(1.5, 3.0) * n),
                phase=float(rng.uniform(0, 2 * np.pi)),
            )
            _, off = road.coords(self.yy, self.xx)
            self._paint(5, np.abs(off) <= road.width / 2)
            self.roads.append(road)

    # -- objects --------------------------------------------------------------------------------------------------

    def _free(self, rect: _Rect, *, allow=(0, 1, 2, 3, 4)) -> bool:
        """The footprint (margin included) lies on allowed land and touches no other object."""
        under = self.label[rect.window][rect.inside]
        if under.size == 0 or self.taken[rect.window][rect.inside].any():
            return False
        return bool(np.isin(under, allow).all())

    def _claim(self, rect: _Rect, mask: np.ndarray, cls: int, colour: np.ndarray) -> None:
        win = rect.window
        self.label[win][mask] = cls
        self.img[win][mask] = colour[mask] if colour.ndim == 3 else colour
        self.taken[win] |= mask

    def _beside_road(self, half_depth: float, gap: float) -> tuple[float, float, float] | None:
        if not self.roads:
            return None
        road = self.roads[int(self.rng.integers(len(self.roads)))]
        t = self.rng.uniform(-0.7, 0.7) * self.size
        side = 1 if self.rng.random() < 0.5 else -1
        y, x, a = road.point(t, side * (road.width / 2 + gap + half_depth))
        if not (0 <= y < self.size and 0 <= x < self.size):
            return None
        return y, x, a

    def building(self, kind: int, near_road: bool) -> int:
        """Try to place one building (class 7 or 11); return the pixels drawn."""
        rng = self.rng
        half_len, half_wid = rng.uniform(6, 15), rng.uniform(5, 10)
        if near_road and (spot := self._beside_road(half_wid, rng.uniform(4, 8))):
            cy, cx, a = spot
        else:
            cy, cx, a = rng.uniform(0, self.size), rng.uniform(0, self.size), rng.uniform(0, np.pi)
        if (big := _rect(self.shape, cy, cx, half_len, half_wid, a, margin=3)) is None or not self._free(big):
            return 0
        rect = _rect(self.shape, cy, cx, half_len, half_wid, a)
        # Shadow: the footprint shifted down-right darkens what lies beneath (its label does not change).
        sh = _rect(self.shape, cy + 2.5, cx + 2.5, half_len, half_wid, a)
        if sh is not None:
            self.shadow[sh.window][sh.inside] = 0.6
        edge = (np.abs(rect.u) > half_len - 1.5) | (np.abs(rect.v) > half_wid - 1.5)
        if kind == 7:  # red-brown roof, darker rim
            roof = self.jitter(((168, 76, 54), (150, 62, 46), (178, 96, 64))[int(rng.integers(3))], 8)
            tex = np.broadcast_to(roof, rect.u.shape + (3,)).copy()
            tex *= (1 + 0.03 * rng.standard_normal(rect.u.shape)).astype(np.float32)[..., None]
            tex[edge] *= 0.62
        else:  # light grey / blue-white gabled roof: ridge along the long axis, one slope shaded
            roof = self.jitter((204, 212, 226), 8)
            tex = np.broadcast_to(roof, rect.u.shape + (3,)).copy()
            tex[rect.v > 0] *= 0.88
            tex[np.abs(rect.v) < 0.8] = roof * 0.62
            tex[edge] *= 0.75
        self._claim(rect, rect.inside, kind, tex)
        return int(rect.inside.sum())

    def parking(self) -> int:
        rng = self.rng
        half_len, half_dep = rng.uniform(15, 25), rng.uniform(13, 20)
        if (spot := self._beside_road(half_dep, rng.uniform(1, 3))) is None:
            return 0
        cy, cx, a = spot
        big = _rect(self.shape, cy, cx, half_len, half_dep, a, margin=2)
        if big is None or not self._free(big, allow=(0, 1, 2, 3, 4, 5)):
            return 0
        rect = _rect(self.shape, cy, cx, half_len, half_dep, a)
        if not self._free(rect):
            return 0
        grey = self.jitter((132, 132, 136), 6)
        tex = np.broadcast_to(grey, rect.u.shape + (3,)).copy()
        tex *= (1 + 0.02 * rng.standard_normal(rect.u.shape)).astype(np.float32)[..., None]
        pitch = rng.uniform(5, 6.5)
        aisle = rng.uniform(3, 5)
        stalls = (np.abs(rect.v) > aisle) & (np.abs(rect.v) < half_dep - 1.5)
        stripes = stalls & (np.mod(rect.u + half_len, pitch) < 1.0) & (np.abs(rect.u) < half_len - 1)
        rim = (np.abs(rect.u) > half_len - 1.2) | (np.abs(rect.v) > half_dep - 1.2)
        tex[stripes | rim] = self.jitter((238, 238, 232), 4)
        self._claim(rect, rect.inside, 9, tex)
        return int(rect.inside.sum())

    def sport_field(self) -> int:
        rng = self.rng
        half_len, half_wid = rng.uniform(18, 30), rng.uniform(12, 19)
        half_wid = min(half_wid, 0.8 * half_len)
        a = (np.pi / 2) * int(rng.integers(2)) + rng.normal(0, 0.15)
        cy, cx = rng.uniform(0, self.size), rng.uniform(0, self.size)
        big = _rect(self.shape, cy, cx, half_len, half_wid, a, margin=3)
        if big is None or not self._free(big):
            return 0
        rect = _rect(self.shape, cy, cx, half_len, half_wid, a)
        turf = self.jitter((72, 160, 64), 8)
        dark = turf * 0.88
        mow = (np.mod(rect.u + half_len, 8.0) < 4.0)[..., None]
        tex = np.where(mow, turf, dark).astype(np.float32)
        line = np.abs(np.abs(rect.u) - (half_len - 2.0)) < 0.8
        line |= (np.abs(np.abs(rect.v) - (half_wid - 2.0)) < 0.8) & (np.abs(rect.u) <= half_len - 2.0)
        line |= np.abs(rect.u) < 0.7
        line |= np.abs(np.hypot(rect.u, rect.v) - 0.35 * half_wid) < 0.7
        line &= (np.abs(rect.u) <= half_len - 1.2) & (np.abs(rect.v) <= half_wid - 1.2)
        tex[line] = self.jitter((240, 242, 236), 4)
        self._claim(rect, rect.inside, 10, tex)
        return int(rect.inside.sum())

    def vehicle(self) -> int:
        rng = self.rng
        if not self.roads:
            return 0
        road = self.roads[int(rng.integers(len(self.roads)))]
        half_len, half_wid = rng.uniform(3.0, 4.0), rng.uniform(1.5, 2.0)
        lane = rng.uniform(-1, 1) * max(0.0, road.width / 2 - half_wid - 0.5)
        cy, cx, a = road.point(rng.uniform(-0.7, 0.7) * self.size, lane)
        if not (0 <= cy < self.size and 0 <= cx < self.size):
            return 0
        a += np.pi * int(rng.integers(2))
        big = _rect(self.shape, cy, cx, half_len + 1, half_wid, a)
        if big is None or not self._free(big, allow=(5,)):
            return 0
        rect = _rect(self.shape, cy, cx, half_len, half_wid, a)
        colours = ((235, 40, 35), (245, 215, 30), (40, 120, 245), (250, 140, 20), (225, 40, 210), (30, 215, 215))
        body = self.jitter(colours[int(rng.integers(len(colours)))], 10)
        tex = np.broadcast_to(body, rect.u.shape + (3,)).copy()
        tex[(rect.u > 0.15 * half_len) & (rect.u < 0.5 * half_len)] *= 0.45  # windscreen
        self._claim(rect, rect.inside, 8, tex)
        return int(rect.inside.sum())

    def place(self, cls: int, count: int, min_pixels: int = 0, tries: int = 400) -> None:
        """Place ``count`` objects of ``cls``, and more until they cover at least ``min_pixels``."""
        placed, pixels = 0, 0
        for _ in range(tries * max(1, count)):
            if placed >= count and pixels >= min_pixels:
                return
            if cls == 7 or cls == 11:
                got = self.building(cls, near_road=self.rng.random() < 0.5)
            elif cls == 8:
                got = self.vehicle()
            elif cls == 9:
                got = self.parking()
            elif cls == 10:
                got = self.sport_field()
            else:
                raise ValueError(f"class {cls} is not an object class")
            placed += got > 0
            pixels += got

    # -- finishing --------------------------------------------------------------------------------------------------

    def render(self) -> np.ndarray:
        """Shadows, soft optics, smooth illumination and sensor noise -> uint8 RGB."""
        rng, n = self.rng, self.size
        img = self.img * self.shadow[..., None]
        img = np.clip(img, 0, 255).astype(np.uint8)
        img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(0.6)), dtype=np.float32)
        img *= (1 + 0.05 * _noise(rng, n, n, n / 3))[..., None]
        img += rng.normal(0, 3.0, img.shape).astype(np.float32)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _draw_tile(rng: np.random.Generator, size: int, novel: dict[int, int], support_class: int | None):
    """Draw one tile; ``novel`` maps novel class -> instance count. Returns (image, full label).

    A scene with no room for its objects is drawn afresh (from the same random stream, so still reproducibly):
    a support tile needs at least 1% of its class, a query tile every class it was given.
    """
    for _ in range(_ATTEMPTS):
        img, lab = _draw_scene(rng, size, novel, support_class)
        if support_class is not None:
            if (lab == support_class).mean() >= 0.01:
                return img, lab
        elif all((lab == c).any() for c in novel):
            return img, lab
    if support_class is not None:
        raise RuntimeError(f"no room for class {support_class} in a {size} px support tile")
    return img, lab


def _draw_scene(rng: np.random.Generator, size: int, novel: dict[int, int], support_class: int | None):
    scene = _Scene(rng, size)
    scene.land_cover()
    scale = (size / 256.0) ** 2
    n_roads = int(rng.integers(1, 3))
    if support_class == 8 or (8 in novel and novel[8] > 12):
        n_roads += 1
    scene.roads_layer(n_roads)
    min_px = int(math.ceil(_MIN_SUPPORT_FRACTION * size * size))
    # Large objects first so that they find room, then buildings, then vehicles on the roads.
    for cls in (9, 10, 11):
        if cls in novel:
            scene.place(cls, novel[cls], min_pixels=min_px if cls == support_class else 0)
    scene.place(7, max(1, int(round(rng.uniform(5, 12) * scale))))
    if 8 in novel:
        scene.place(8, novel[8], min_pixels=min_px if support_class == 8 else 0)
    return scene.render(), scene.label


# ---------------------------------------------------------------------------------------------------------------
# Dataset


def _tile_rng(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, split, index]))


def _fractions(labels: list[np.ndarray], classes: Sequence[int]) -> dict[str, float]:
    """Share of the pixels of ``labels`` that hold each class."""
    counts = np.zeros(256, np.int64)
    for lab in labels:
        counts += np.bincount(lab.ravel(), minlength=256)
    total = max(1, int(counts.sum()))
    return {str(c): round(float(counts[c]) / total, 5) for c in classes}


def _presence(labels: list[np.ndarray], classes: Sequence[int]) -> dict[str, int]:
    """Number of tiles in which each class appears."""
    return {str(c): sum(bool((lab == c).any()) for lab in labels) for c in classes}


@dataclass(frozen=True)
class DemoSettings:
    """The demo dataset's counts, tile size, seed and novel classes (the config's ``demo`` section and ``seed``)."""

    n_train: int
    n_support_per_class: int
    n_query: int
    size: int
    seed: int
    novel_ids: tuple[int, ...]
    support_distractors: bool = True

    @classmethod
    def checked(
        cls,
        *,
        n_train: int,
        n_support_per_class: int,
        n_query: int,
        size: int,
        seed: int,
        novel_ids: Sequence[int],
        support_distractors: bool = True,
    ) -> DemoSettings:
        """Settings with ints for every count and sorted novel ids; a bad value is a ValueError naming it."""
        ids = [int(c) for c in novel_ids]
        if not ids or len(set(ids)) != len(ids) or not set(ids) <= set(NOVEL_IDS):
            raise ValueError(f"novel_ids must be distinct ids among {list(NOVEL_IDS)}, got {ids}")
        settings = cls(
            n_train=int(n_train), n_support_per_class=int(n_support_per_class), n_query=int(n_query),
            size=int(size), seed=int(seed), novel_ids=tuple(sorted(ids)), support_distractors=bool(support_distractors),
        )  # fmt: skip
        for name, low in (("n_train", 1), ("n_support_per_class", 1), ("n_query", 1), ("size", 64)):
            if getattr(settings, name) < low:
                raise ValueError(f"{name} must be at least {low}, got {getattr(settings, name)}")
        return settings

    @property
    def scale(self) -> float:
        """Object counts grow with the tile's area (they are set for 256 px tiles)."""
        return (self.size / 256.0) ** 2

    @property
    def n_support(self) -> int:
        return len(self.novel_ids) * self.n_support_per_class

    def georef(self, split: int, index: int) -> dict:
        """CRS and transform of a tile: every tile of every split has its own place on the ground."""
        span = self.size * PIXEL_SIZE
        x = _ORIGIN[0] + (index % 16) * (span + 100.0) + split * 20000.0
        y = _ORIGIN[1] - (index // 16) * (span + 100.0)
        return {"crs": CRS.from_epsg(CRS_EPSG), "transform": Affine(PIXEL_SIZE, 0.0, x, 0.0, -PIXEL_SIZE, y)}


def _query_classes(spec: DemoSettings, plan_rng: np.random.Generator) -> list[set[int]]:
    """Which novel classes each query shows: every class in at least _QUERY_PRESENCE of the queries, and each query
    at least one."""
    shown: list[set[int]] = [set() for _ in range(spec.n_query)]
    per_class = max(1, int(math.ceil(_QUERY_PRESENCE * spec.n_query)))
    for cls in spec.novel_ids:
        for q in plan_rng.permutation(spec.n_query)[:per_class]:
            shown[int(q)].add(cls)
    for s in shown:
        if not s:
            s.add(int(plan_rng.choice(spec.novel_ids)))
    return shown


def _query_counts(rng: np.random.Generator, classes: set[int], scale: float) -> dict[int, int]:
    base = {8: (8, 18), 9: (1, 2), 10: (1, 1), 11: (3, 6)}
    return {c: max(1, int(round(rng.integers(base[c][0], base[c][1] + 1) * scale))) for c in sorted(classes)}


def _support_counts(rng: np.random.Generator, cls: int, scale: float) -> dict[int, int]:
    base = {8: (24, 36), 9: (2, 3), 10: (2, 3), 11: (5, 8)}
    return {cls: max(1, int(round(rng.integers(base[cls][0], base[cls][1] + 1) * scale)))}


def _write_tile(root: Path, folders: tuple[str, str], stem: str, image: np.ndarray, label: np.ndarray, georef: dict):
    """The image and its label as ``<stem>.tif`` in the (image, label) folders under ``root``."""
    write_geotiff(root / folders[0] / f"{stem}.tif", image, **georef)
    write_geotiff(root / folders[1] / f"{stem}.tif", label, **georef)


def _write_train(tmp: Path, spec: DemoSettings) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """Train tiles show the novel classes as often as queries do, but label them 0, as the challenge's train set
    does: the base model then learns to call them background, which the overlay's background check relies on.
    Returns the stems, the written labels and the full labels (with the novel objects, for the manifest)."""
    stems, labels, scenes = [], [], []
    for i in range(spec.n_train):
        stem = f"{TRAIN_PLACE}_{i + 1}"
        rng = _tile_rng(spec.seed, 1, i)
        shown = {c for c in spec.novel_ids if rng.random() < _QUERY_PRESENCE}
        img, full = _draw_tile(rng, spec.size, _query_counts(rng, shown, spec.scale), None)
        lab = np.where(np.isin(full, NOVEL_IDS), 0, full).astype(np.uint8)
        _write_tile(tmp, ("trainset/images", "trainset/labels"), stem, img, lab, spec.georef(1, i))
        stems.append(stem)
        labels.append(lab)
        scenes.append(full)
    return stems, labels, scenes


def _write_support(
    tmp: Path, spec: DemoSettings, test_numbers: list[int]
) -> tuple[dict[str, list[str]], dict[str, list[np.ndarray]], dict[str, list[np.ndarray]]]:
    """Support tiles take test indices 0..n_support-1: each holds one novel class, labelled with it alone.

    With ``support_distractors`` a support image also shows the other novel classes as often as a query does,
    labelled 0 ("not this class", as the challenge's support labels say): prompts then see the look-alikes they
    must leave out (a parking lot's white lines beside a sport field's), as they do on real tiles.
    """
    stems: dict[str, list[str]] = {str(c): [] for c in spec.novel_ids}
    labels: dict[str, list[np.ndarray]] = {str(c): [] for c in spec.novel_ids}
    scenes: dict[str, list[np.ndarray]] = {str(c): [] for c in spec.novel_ids}
    t = 0
    for cls in spec.novel_ids:
        for _ in range(spec.n_support_per_class):
            rng = _tile_rng(spec.seed, 2, t)
            stem = f"{TEST_PLACE}_{test_numbers[t]}"
            counts = _support_counts(rng, cls, spec.scale)
            if spec.support_distractors:
                others = {c for c in spec.novel_ids if c != cls and rng.random() < _QUERY_PRESENCE}
                counts = {**_query_counts(rng, others, spec.scale), **counts}
            img, lab = _draw_tile(rng, spec.size, counts, cls)
            binary = np.where(lab == cls, cls, 0).astype(np.uint8)
            if not binary.any():
                raise RuntimeError(f"support tile {stem} came out without class {cls}")
            _write_tile(tmp, ("testset/images", "testset/labels"), stem, img, binary, spec.georef(2, t))
            stems[str(cls)].append(stem)
            labels[str(cls)].append(binary)
            scenes[str(cls)].append(lab)
            t += 1
    return stems, labels, scenes


def _write_queries(
    tmp: Path, spec: DemoSettings, test_numbers: list[int], shown: list[set[int]]
) -> tuple[list[str], list[np.ndarray]]:
    """Query tiles follow the support tiles in the test indices; their full labels go to a folder of their own."""
    stems, labels = [], []
    for q in range(spec.n_query):
        t = spec.n_support + q
        rng = _tile_rng(spec.seed, 2, t)
        stem = f"{TEST_PLACE}_{test_numbers[t]}"
        img, lab = _draw_tile(rng, spec.size, _query_counts(rng, shown[q], spec.scale), None)
        _write_tile(tmp, ("testset/images", "testset_query_labels"), stem, img, lab, spec.georef(2, t))
        stems.append(stem)
        labels.append(lab)
    return stems, labels


def _manifest(
    spec: DemoSettings,
    train: tuple[list[str], list[np.ndarray], list[np.ndarray]],
    support: tuple[dict[str, list[str]], dict[str, list[np.ndarray]], dict[str, list[np.ndarray]]],
    query: tuple[list[str], list[np.ndarray]],
) -> dict:
    train_stems, train_labels, train_scenes = train
    (support_stems, support_labels, support_scenes), (query_stems, query_labels) = support, query
    novel_ids = list(spec.novel_ids)
    all_ids = sorted(DEMO_CLASSES)
    return {
        "name": "fewseg demo dataset",
        "seed": spec.seed,
        "size": spec.size,
        "crs": f"EPSG:{CRS_EPSG}",
        "pixel_size_m": PIXEL_SIZE,
        "counts": {
            "train": spec.n_train,
            "support": spec.n_support,
            "support_per_class": spec.n_support_per_class,
            "query": spec.n_query,
        },
        "base_ids": list(BASE_IDS),
        "novel_ids": novel_ids,
        "classes": {str(k): v for k, v in DEMO_CLASSES.items()},
        "train": train_stems,
        "support": support_stems,
        "query": query_stems,
        "query_novel_classes": {
            stem: [c for c in novel_ids if (lab == c).any()]
            for stem, lab in zip(query_stems, query_labels, strict=True)
        },
        # support: the share of each novel class in its own support tiles.
        "class_fractions": {
            "train": _fractions(train_labels, all_ids),
            "support": {str(c): _fractions(support_labels[str(c)], [c])[str(c)] for c in novel_ids},
            "query": _fractions(query_labels, all_ids),
        },
        # novel objects drawn in the train images but labelled 0 there: share of pixels, and tiles showing them
        "train_unlabelled_novel": {
            "class_fractions": _fractions(train_scenes, novel_ids),
            "tiles_with_class": _presence(train_scenes, novel_ids),
        },
        # novel objects drawn in the support images of the other classes, labelled 0 there (support_distractors)
        "support_unlabelled_novel": {
            "tiles_with_class": {
                str(c): sum(int((lab == c).any()) for k, labs in support_scenes.items() if k != str(c) for lab in labs)
                for c in novel_ids
            },
        },
        "tiles_with_class": {
            "train": _presence(train_labels, all_ids),
            "support": {str(c): _presence(support_labels[str(c)], [c])[str(c)] for c in novel_ids},
            "query": _presence(query_labels, all_ids),
        },
    }


def make_demo_dataset(
    root: str | os.PathLike,
    *,
    n_train: int = 24,
    n_support_per_class: int = 3,
    n_query: int = 8,
    size: int = 256,
    seed: int = 0,
    novel_ids: Sequence[int] = NOVEL_IDS,
    support_distractors: bool = True,
) -> dict:
    """Write the demo dataset under root (atomically: the whole root appears at once, replacing an old one) and
    return its manifest.

    ``novel_ids`` picks which of the novel classes 8..11 get support tiles and appear in the queries (and, labelled 0,
    in the train images). The manifest (also written to ``root/manifest.json``) holds the arguments, the stems of
    the train tiles, of the support tiles per novel class and of the query tiles, the novel classes each query
    shows, the class names, and per split the share of pixels of each class (``class_fractions``; for the support
    split, the share of each novel class in its own tiles) and the number of tiles showing it
    (``tiles_with_class``), and the same two figures for the novel objects hidden under label 0 in the train tiles
    (``train_unlabelled_novel``), and the support tiles of other classes whose images show each novel class
    (``support_unlabelled_novel``). ``support_distractors`` draws the other novel classes into the support images
    too, labelled 0 (see :func:`_write_support`).
    """
    spec = DemoSettings.checked(
        n_train=n_train, n_support_per_class=n_support_per_class, n_query=n_query, size=size, seed=seed,
        novel_ids=novel_ids, support_distractors=support_distractors,
    )  # fmt: skip
    # The plan (which classes each query shows, the shuffled test tile numbers) has its own stream.
    plan_rng = _tile_rng(spec.seed, 0, 0)
    shown = _query_classes(spec, plan_rng)
    test_numbers = [int(k) + 1 for k in plan_rng.permutation(spec.n_support + spec.n_query)]
    with atomic_dir(Path(root)) as tmp:
        train = _write_train(tmp, spec)
        support = _write_support(tmp, spec, test_numbers)
        query = _write_queries(tmp, spec, test_numbers, shown)
        manifest = _manifest(spec, train, support, query)
        write_json(tmp / "manifest.json", manifest)
    return manifest
