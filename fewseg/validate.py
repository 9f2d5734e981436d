"""Check a whole dataset before any heavy job: train, support and query tiles, labels and the support split.

The workflow runs :func:`validate_dataset` first and makes every training and inference job wait for its verdict,
so a bad query tile is reported in seconds instead of after hours of base training. It reads raster headers
(bands, data type, size, and where each block of pixels lies in the file, which finds a truncated GeoTIFF without
decoding it) and the values of every label; image pixels are decoded later, by the conversion stages.

What is read from a file does not depend on the config, so it is cached per file (path, size and modification
time): a rerun over thousands of tiles only stats them. The verdict itself is recomputed from the cached facts and
the config each time. Every problem found is reported at once (up to ``max_listed``), not only the first.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from fewseg.convert import (
    _class_ids,
    _fmt_ids,
    _fmt_pixels,
    _label_without_image,
    _list_tiles,
    image_without_label,
    query_is_train_tile,
    shots_problem,
    split_stems,
    support_allowed,
    support_class,
)
from fewseg.io import InputError, atomic_path

PathLike = str | os.PathLike

CACHE_VERSION = 1


class DatasetErrors(InputError):
    """Several bad inputs at once: each line names a file and its problem."""

    def __init__(self, problems: Sequence[InputError], max_listed: int):
        self.problems = list(problems)
        shown = self.problems[:max_listed]
        head = f"{len(self.problems)} problems in the input data" + (
            f" (the first {len(shown)} listed)" if len(shown) < len(self.problems) else ""
        )
        if len(self.problems) == 1:
            super().__init__(shown[0].path, shown[0].problem)
        else:
            super().__init__(None, head + ":\n" + "\n".join(f"  {p}" for p in shown))


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset must look like, from the config: its folders, class ids and support split."""

    root: Path
    train_dir: str
    test_dir: str
    base: tuple[int, ...]
    novel: tuple[int, ...]
    shots: int
    ignore_index: int | None = 255
    split_lists: Mapping[str, Any] | None = None
    query_labels: Path | None = None

    @classmethod
    def from_settings(cls, root: PathLike, settings: Mapping[str, Any]) -> DatasetSpec:
        """Build from the rule's params: ``dataset`` (the config's dataset slice), ``base`` and ``novel``."""
        d = settings["dataset"]
        split_lists = d.get("split_lists")
        if isinstance(split_lists, str | os.PathLike):
            from fewseg.io import read_json

            split_lists = read_json(split_lists)
        labels = d.get("query_labels")
        return cls(
            root=Path(root),
            train_dir=d["train_dir"],
            test_dir=d["test_dir"],
            base=tuple(settings["base"]),
            novel=tuple(settings["novel"]),
            shots=d["shots"],
            ignore_index=d["ignore_index"],
            split_lists=split_lists,
            query_labels=None if labels is None else Path(root) / labels,
        )


# ---------------------------------------------------------------------------------------------------------------
# Facts about one file (cached)


def _data_end(src: rasterio.DatasetReader) -> int:
    """Largest byte offset that the raster's pixel blocks reach; 0 where the driver does not say (not a TIFF)."""
    end = 0
    bands = [1] if src.interleaving is None or src.interleaving.name == "PIXEL" else range(1, src.count + 1)
    for band in bands:
        block_h, block_w = src.block_shapes[band - 1]
        for row in range(-(-src.height // block_h)):
            for col in range(-(-src.width // block_w)):
                offset = src.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=band)
                size = src.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=band)
                if offset and size:
                    end = max(end, int(offset) + int(size))
    return end


def read_facts(path: Path, with_values: bool) -> dict[str, Any]:
    """Header facts of a raster and, for a label, the count of each value; ``{"error": ...}`` if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                facts: dict[str, Any] = {
                    "bands": src.count,
                    "dtypes": sorted(set(src.dtypes)),
                    "height": src.height,
                    "width": src.width,
                }
                end, size = _data_end(src), path.stat().st_size
                if end > size:
                    facts["error"] = f"truncated file: its pixel data runs to byte {end}, but the file has {size} bytes"
                elif with_values and src.count == 1 and facts["dtypes"] == ["uint8"]:
                    counts = np.bincount(src.read(1).ravel(), minlength=256)
                    facts["values"] = {str(v): int(counts[v]) for v in np.flatnonzero(counts)}
    except (RasterioError, OSError) as err:
        return {"error": f"not a readable GeoTIFF ({err})"}
    return facts


@dataclass
class FactCache:
    """Per-file facts keyed by absolute path, valid while the file's size and modification time are unchanged."""

    path: Path | None
    entries: dict[str, dict] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    @classmethod
    def load(cls, path: PathLike | None) -> FactCache:
        if path is None or not Path(path).is_file():
            return cls(None if path is None else Path(path))
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError):
            return cls(Path(path))  # an unreadable cache is rebuilt, never trusted
        if data.get("version") != CACHE_VERSION:
            return cls(Path(path))
        return cls(Path(path), data.get("files", {}))

    def facts(self, path: Path, with_values: bool) -> dict[str, Any]:
        stat = path.stat()
        key = os.path.abspath(path)
        entry = self.entries.get(key)
        if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
            if not with_values or "values" in entry["facts"] or "error" in entry["facts"]:
                self.hits += 1
                return entry["facts"]
        self.misses += 1
        facts = read_facts(path, with_values)
        self.entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "facts": facts}
        return facts

    def save(self) -> None:
        if self.path is None:
            return
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps({"version": CACHE_VERSION, "files": self.entries}, sort_keys=True))


# ---------------------------------------------------------------------------------------------------------------
# Checks


class _Problems:
    """Collects InputErrors instead of stopping at the first."""

    def __init__(self) -> None:
        self.items: list[InputError] = []

    def add(self, path: PathLike | None, problem: str) -> None:
        self.items.append(InputError(path, problem))

    def listing(self, folder: Path, what: str) -> dict[str, Path]:
        try:
            return _list_tiles(folder, what)
        except InputError as err:
            self.items.append(err)
            return {}


def _check_raster(problems: _Problems, path: Path, facts: dict, bands: int, what: str) -> bool:
    """Header checks shared by images and labels; True when the file can be used."""
    if "error" in facts:
        problems.add(path, facts["error"])
        return False
    ok = True
    if facts["bands"] != bands:
        kind = "RGB" if bands == 3 else "class ids"
        problems.add(path, f"{what}: expected {bands} band{'s' if bands > 1 else ''} ({kind}), found {facts['bands']}")
        ok = False
    if facts["dtypes"] != ["uint8"]:
        problems.add(path, f"{what}: expected uint8 pixels, found {', '.join(facts['dtypes'])}")
        ok = False
    return ok


def _check_pair(
    problems: _Problems, cache: FactCache, image: Path, label: Path, allowed: set[int], allowed_text: str
) -> np.ndarray | None:
    """Image and label headers, equal sizes, allowed label values.

    Returns the label's value counts whenever the label itself is usable, so that a bad image does not also
    show up as a missing support tile of its class.
    """
    image_facts = cache.facts(image, with_values=False)
    label_facts = cache.facts(label, with_values=True)
    image_ok = _check_raster(problems, image, image_facts, 3, "image")
    if not _check_raster(problems, label, label_facts, 1, "label"):
        return None
    if image_ok and (label_facts["height"], label_facts["width"]) != (image_facts["height"], image_facts["width"]):
        problems.add(
            label,
            f"label size {label_facts['height']}x{label_facts['width']} (height x width) differs from its image "
            f"{image.name} ({image_facts['height']}x{image_facts['width']})",
        )
    counts = np.zeros(256, dtype=np.int64)
    for value, count in label_facts["values"].items():
        counts[int(value)] = count
    bad = [int(v) for v in np.flatnonzero(counts) if int(v) not in allowed]
    if bad:
        problems.add(label, f"label values outside the configured classes: {_fmt_pixels(counts, bad)}; {allowed_text}")
        return None
    return counts


def _ignore(spec: DatasetSpec) -> set[int]:
    return set() if spec.ignore_index is None else {int(spec.ignore_index)}


def _ignore_text(spec: DatasetSpec) -> str:
    return "" if spec.ignore_index is None else f" and {spec.ignore_index} (ignore)"


def _check_train(spec: DatasetSpec, problems: _Problems, cache: FactCache) -> dict[str, Path]:
    images_dir = spec.root / spec.train_dir / "images"
    labels_dir = spec.root / spec.train_dir / "labels"
    images = problems.listing(images_dir, "image")
    labels = problems.listing(labels_dir, "label")
    if not images or not labels:
        return images
    base = _class_ids(spec.base, "classes/base", spec.ignore_index)
    allowed = {0, *base} | _ignore(spec)
    allowed_text = f"train labels may hold 0, the base classes {_fmt_ids(base)}" + _ignore_text(spec)
    for stem in sorted(images.keys() | labels.keys()):
        if stem not in labels:
            problems.add(images[stem], image_without_label(stem, labels_dir))
        elif stem not in images:
            problems.add(labels[stem], _label_without_image(stem, images_dir))
        else:
            _check_pair(problems, cache, images[stem], labels[stem], allowed, allowed_text)
    return images


def _check_test(spec: DatasetSpec, problems: _Problems, cache: FactCache, train_stems: set[str]) -> dict[str, Any]:
    images_dir = spec.root / spec.test_dir / "images"
    labels_dir = spec.root / spec.test_dir / "labels"
    images = problems.listing(images_dir, "image")
    labels = problems.listing(labels_dir, "label")
    if not images:
        return {"support": {}, "queries": 0}
    novel = _class_ids(spec.novel, "classes/novel", spec.ignore_index)
    for stem in sorted(labels.keys() - images.keys()):
        problems.add(labels[stem], _label_without_image(stem, images_dir))

    try:
        listed, support_stems, query_stems = split_stems(
            images, labels, images_dir, labels_dir, novel, spec.split_lists
        )
    except InputError as err:
        problems.items.append(err)
        return {"support": {}, "queries": 0}
    if not query_stems:
        problems.add(images_dir, "no query tiles: every image has a label, so all are taken as support tiles")

    allowed, allowed_text = support_allowed(novel, spec.ignore_index)
    support: dict[int, list[str]] = {c: [] for c in novel}
    for stem in support_stems:
        counts = _check_pair(problems, cache, images[stem], labels[stem], allowed, allowed_text)
        if counts is None:
            continue
        try:
            support[support_class(labels[stem], counts, novel, None if listed is None else listed[stem])].append(stem)
        except InputError as err:
            problems.items.append(err)
    where = "in the split lists" if listed is not None else f"among the labels in {labels_dir}"
    for cls in novel:
        problem = shots_problem(cls, support[cls], spec.shots, where)
        if problem:
            problems.add(labels_dir, problem)

    all_classes = {0, *spec.base, *novel} | _ignore(spec)
    for stem in query_stems:
        path = images[stem]
        if stem in train_stems:
            problems.add(path, query_is_train_tile(stem))
        facts = cache.facts(path, with_values=False)
        image_ok = _check_raster(problems, path, facts, 3, "query image")
        if spec.query_labels is not None:
            label = spec.query_labels / f"{stem}.tif"
            _check_query_label(problems, cache, label, facts if image_ok else None, all_classes)
    return {"support": {str(c): s for c, s in support.items()}, "queries": len(query_stems)}


def _check_query_label(
    problems: _Problems, cache: FactCache, path: Path, image: dict | None, allowed: set[int]
) -> None:
    """Query ground truth, where the config names a folder of it: present, the image's size (when the image is
    readable), known values."""
    if not path.is_file():
        problems.add(path, "query label missing: dataset/query_labels is set, so every query tile needs one")
        return
    facts = cache.facts(path, with_values=True)
    if not _check_raster(problems, path, facts, 1, "query label"):
        return
    if image is not None and (facts["height"], facts["width"]) != (image["height"], image["width"]):
        problems.add(
            path,
            f"query label size {facts['height']}x{facts['width']} differs from its image "
            f"({image['height']}x{image['width']})",
        )
        return
    bad = sorted(int(v) for v in facts["values"] if int(v) not in allowed)
    if bad:
        problems.add(path, f"query label values outside the configured classes: {bad}")


def validate_dataset(spec: DatasetSpec, *, cache_path: PathLike | None = None, max_listed: int = 20) -> dict[str, Any]:
    """Check every input file and the support split; raise :class:`DatasetErrors` listing all problems.

    Returns a summary (tile counts, support tiles per class, cache use) for the job's log and output.
    """
    cache = FactCache.load(cache_path)
    problems = _Problems()
    try:
        if not spec.root.is_dir():
            raise InputError(spec.root, "dataset folder not found")
        train = _check_train(spec, problems, cache)
        test = _check_test(spec, problems, cache, set(train))
    finally:
        cache.save()
    if problems.items:
        raise DatasetErrors(problems.items, max_listed)
    return {
        "root": str(spec.root),
        "train_tiles": len(train),
        "support": test["support"],
        "query_tiles": test["queries"],
        "files_read": cache.misses,
        "files_cached": cache.hits,
    }
