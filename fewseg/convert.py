"""Dataset conversion: validate the raw tiles and lay them out for training and inference.

Two entry points, one per kind of folder:

* :func:`convert_train` paints every train label with the fixed palette into an RGB mask (SegGPT reads labels as
  pictures) and writes an index of the tiles with their class statistics.
* :func:`split_support` splits a validation/test folder into the support set (labelled tiles, one folder per novel
  class, masks rewritten to binary {0, 1}) and the query set (the unlabelled remainder).

Real data is messy, so both functions first check *everything* (every file is opened and every pixel read, so a
truncated GeoTIFF is caught here and not hours later in training) and only then write. The first problem found
raises :class:`fewseg.io.InputError` naming the file and the problem; tiles are visited in sorted order, so the
same input always reports the same first problem. Output goes through :func:`fewseg.io.atomic_dir`: the output
folder appears whole or not at all, and a failed run leaves an earlier output untouched. Tiles are processed one
at a time, so memory does not grow with the number of tiles.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.errors import RasterioError

from fewseg import io
from fewseg.io import IMAGE_SUFFIXES, InputError
from fewseg.palette import as_palette, ids_to_rgb

PathLike = str | os.PathLike

__all__ = ["convert_train", "split_support"]

_MAX_LISTED = 8  # offending values / file names quoted in one message


# ---------------------------------------------------------------------------------------------------------------
# Train set


def convert_train(
    images_dir: PathLike,
    labels_dir: PathLike,
    out_dir: PathLike,
    *,
    palette: np.ndarray,
    base_ids: Sequence[int],
    ignore_index: int | None = 255,
) -> dict:
    """Validate the train set and paint each label with the palette into ``out_dir/masks/<stem>.png``.

    Every image needs a label of the same size and every label an image. Labels may hold 0, ``base_ids`` and
    ``ignore_index`` only. Ignore pixels are painted black like class 0 and counted in the index.

    Writes ``out_dir/index.json``::

        {"tiles": [{"stem", "image" (absolute path of the source image), "mask" (relative to out_dir),
                    "height", "width", "classes" (sorted ids present, ignore excluded),
                    "pixels" ({"<id>": count}, ignore included)}, ...],   # sorted by stem
         "palette": [[r, g, b], ...]}

    and returns that index (equal to the JSON file's content).
    """
    palette = as_palette(palette)
    base = _class_ids(base_ids, "base_ids", ignore_index)
    if base and max(base) >= len(palette):
        raise ValueError(f"class {max(base)} has no colour in a palette of {len(palette)} colours")
    images_dir, labels_dir, out_dir = Path(images_dir), Path(labels_dir), Path(out_dir)
    _check_out_dir(out_dir, images_dir, labels_dir)

    # --- validate everything -----------------------------------------------------------------------------------
    images = _list_tiles(images_dir, "image")
    labels = _list_tiles(labels_dir, "label")
    for stem in sorted(images.keys() | labels.keys()):
        if stem not in labels:
            raise InputError(images[stem], image_without_label(stem, labels_dir))
        if stem not in images:
            raise InputError(labels[stem], _label_without_image(stem, images_dir))

    allowed = {0, *base} | _ignore_set(ignore_index)
    allowed_text = f"train labels may hold 0, the base classes {_fmt_ids(base)}" + _ignore_text(ignore_index)
    tiles = []
    for stem in sorted(images):
        height, width, counts = _check_pair(images[stem], labels[stem], allowed, allowed_text)
        present = [int(v) for v in np.flatnonzero(counts)]
        tiles.append(
            {
                "stem": stem,
                "image": os.path.abspath(images[stem]),
                "mask": f"masks/{stem}.png",
                "height": height,
                "width": width,
                "classes": [v for v in present if v != ignore_index],
                "pixels": {str(v): int(counts[v]) for v in present},
            }
        )
    index = {"tiles": tiles, "palette": palette.tolist()}

    # --- write ---------------------------------------------------------------------------------------------------
    with io.atomic_dir(out_dir) as tmp:
        for tile in tiles:
            label = _read(io.read_label, labels[tile["stem"]])
            if ignore_index is not None:
                label = np.where(label == ignore_index, np.uint8(0), label)
            io.write_png(tmp / tile["mask"], np.ascontiguousarray(ids_to_rgb(label, palette)))
        io.write_json(tmp / "index.json", index)
    return index


# ---------------------------------------------------------------------------------------------------------------
# Validation / test set


def split_support(
    images_dir: PathLike,
    labels_dir: PathLike,
    out_dir: PathLike,
    *,
    novel_ids: Sequence[int],
    shots: int,
    ignore_index: int | None = 255,
    train_stems: Iterable[str] = (),
    train_images_dir: PathLike | None = None,
    split_lists: Mapping[str, Any] | None = None,
) -> dict:
    """Split a validation/test folder into support tiles (labelled) and query tiles (unlabelled).

    Each support label must hold exactly one novel class (plus 0 and ``ignore_index``); the tile goes to
    ``out_dir/<class id>/images/<stem>.tif`` (a byte copy of the GeoTIFF) and ``out_dir/<class id>/labels/<stem>.png``
    (binary uint8: 1 = the class, 0 = anything else, ignore pixels included). Every novel class needs at least
    ``shots`` support tiles. A query tile must not be a train tile: same stem as one of ``train_stems``, or, when
    ``train_images_dir`` is given, the same pixels as one of its images.

    ``split_lists`` (the challenge's split files), ``{"support": {"<cls>": [stems]}, "query": [stems]}``, replaces
    the inference of the split; listed names may carry a ``.tif``/``.tiff`` suffix, and images listed in neither
    list are left out.

    Writes ``out_dir/support.json`` ``{"<class id>": [stems]}`` and ``out_dir/query.json``
    ``{"queries": [{"stem", "image" (absolute path), "height", "width"}]}`` (sorted by stem) and returns
    ``{"support": ..., "queries": ...}`` with the same content.
    """
    novel = _class_ids(novel_ids, "novel_ids", ignore_index)
    if not novel:
        raise ValueError("novel_ids is empty")
    if isinstance(shots, bool) or not isinstance(shots, int | np.integer) or shots < 1:
        raise ValueError(f"shots must be a positive integer, got {shots!r}")
    images_dir, labels_dir, out_dir = Path(images_dir), Path(labels_dir), Path(out_dir)
    inputs = [images_dir, labels_dir] + ([Path(train_images_dir)] if train_images_dir is not None else [])
    _check_out_dir(out_dir, *inputs)
    train_stems = {train_stems} if isinstance(train_stems, str) else set(train_stems)

    # --- validate everything -----------------------------------------------------------------------------------
    images = _list_tiles(images_dir, "image")
    labels = _list_tiles(labels_dir, "label")
    for stem in sorted(labels):
        if stem not in images:
            raise InputError(labels[stem], _label_without_image(stem, images_dir))
    listed, support_stems, query_stems = split_stems(images, labels, images_dir, labels_dir, novel, split_lists)
    if not query_stems:
        raise InputError(images_dir, "no query tiles: every image has a label, so all are taken as support tiles")
    for stem in query_stems:  # cheap check first, before any pixel is read
        if stem in train_stems:
            raise InputError(images[stem], query_is_train_tile(stem))
    support = _classify_support(images, labels, support_stems, novel, listed, ignore_index)
    where = "in the split lists" if listed is not None else f"among the labels in {labels_dir}"
    for cls in novel:
        problem = shots_problem(cls, support[cls], shots, where)
        if problem:
            raise InputError(labels_dir, problem)
    queries = _query_records(images, query_stems, train_images_dir)

    # --- write ---------------------------------------------------------------------------------------------------
    support_json = {str(c): stems for c, stems in support.items()}
    with io.atomic_dir(out_dir) as tmp:
        for cls, stems in support.items():
            (tmp / str(cls) / "images").mkdir(parents=True)
            for stem in stems:
                shutil.copyfile(images[stem], tmp / str(cls) / "images" / f"{stem}.tif")
                label = _read(io.read_label, labels[stem])
                io.write_png(tmp / str(cls) / "labels" / f"{stem}.png", (label == cls).astype(np.uint8))
        io.write_json(tmp / "support.json", support_json)
        io.write_json(tmp / "query.json", {"queries": queries})
    return {"support": support_json, "queries": queries}


def split_stems(
    images: dict[str, Path],
    labels: dict[str, Path],
    images_dir: Path,
    labels_dir: Path,
    novel: list[int],
    split_lists: Mapping[str, Any] | None,
) -> tuple[dict[str, int] | None, list[str], list[str]]:
    """(listed support class per stem or None, support stems, query stems): from the split lists when given,
    otherwise labelled images are support tiles and the rest are queries."""
    if split_lists is None:
        return None, sorted(labels.keys() & images.keys()), sorted(images.keys() - labels.keys())
    listed, query_stems = _parse_split_lists(split_lists, novel, images, labels, images_dir, labels_dir)
    return listed, sorted(listed), query_stems


def support_allowed(novel: Sequence[int], ignore_index: int | None) -> tuple[set[int], str]:
    """Label values a support tile may hold, and how to say so."""
    allowed = {0, *novel} | _ignore_set(ignore_index)
    return allowed, f"support labels may hold 0, the novel classes {_fmt_ids(novel)}" + _ignore_text(ignore_index) + (
        " only"
    )


def support_class(label: Path, counts: np.ndarray, novel: Sequence[int], listed: int | None) -> int:
    """The one novel class a support label shows (``counts``: its value histogram); InputError otherwise."""
    found = [c for c in novel if counts[c]]
    if not found:
        raise InputError(
            label,
            f"support label holds no novel-class pixel (no {_fmt_ids(novel, 'or')}); "
            "a support tile must show exactly one novel class",
        )
    if len(found) > 1:
        raise InputError(
            label,
            f"support label holds {'two' if len(found) == 2 else len(found)} novel classes, "
            f"{_fmt_pixels(counts, found)}; a support tile must show exactly one novel class",
        )
    if listed is not None and listed != found[0]:
        raise InputError(
            label,
            f"listed in the split lists as a support tile of class {listed}, but its label holds class {found[0]}",
        )
    return found[0]


def shots_problem(cls: int, stems: Sequence[str], shots: int, where: str) -> str | None:
    """What is wrong with a class's support tiles, if they are fewer than ``shots``."""
    n = len(stems)
    if n >= shots:
        return None
    if n == 0:
        return f"novel class {cls} has no support tile {where} ({shots} needed)"
    tiles = f"{n} support tile{'s' if n != 1 else ''}"
    return f"novel class {cls} has only {tiles} {where} ({', '.join(stems)}); {shots} needed"


def query_is_train_tile(stem: str) -> str:
    return f"query tile {stem!r} is also a train tile (same stem in the train set); a query must not be trained on"


def _classify_support(
    images: dict[str, Path],
    labels: dict[str, Path],
    stems: list[str],
    novel: list[int],
    listed: dict[str, int] | None,
    ignore_index: int | None,
) -> dict[int, list[str]]:
    """Support stems per novel class, every pixel of each support pair read and checked."""
    allowed, allowed_text = support_allowed(novel, ignore_index)
    support: dict[int, list[str]] = {c: [] for c in novel}
    for stem in stems:
        _, _, counts = _check_pair(images[stem], labels[stem], allowed, allowed_text)
        support[support_class(labels[stem], counts, novel, None if listed is None else listed[stem])].append(stem)
    return support


def _query_records(
    images: dict[str, Path], query_stems: list[str], train_images_dir: PathLike | None
) -> list[dict[str, Any]]:
    """Each query's path and size, every pixel decoded; a query with the pixels of a train image is refused."""
    queries = []
    query_hashes: dict[str, str] = {}
    for stem in query_stems:
        image = _read(io.read_image, images[stem])
        queries.append(
            {"stem": stem, "image": os.path.abspath(images[stem]), "height": int(image.shape[0]),
             "width": int(image.shape[1])}
        )  # fmt: skip
        if train_images_dir is not None:
            query_hashes.setdefault(_pixel_hash(image), stem)
        del image
    if train_images_dir is not None:
        for train_path in _list_tiles(Path(train_images_dir), "train image").values():
            stem = query_hashes.get(_pixel_hash(_read(io.read_image, train_path)))
            if stem is not None:
                raise InputError(
                    images[stem],
                    f"query tile has the same pixels as train tile {train_path}; a query must not be trained on",
                )
    return queries


# ---------------------------------------------------------------------------------------------------------------
# Checks shared by both stages


def _class_ids(ids: Sequence[int], name: str, ignore_index: int | None) -> list[int]:
    """Configured class ids as a sorted list of distinct ints in 1..255, none equal to ``ignore_index``."""
    out = []
    for v in ids:
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or not 1 <= int(v) <= 255:
            raise ValueError(f"{name}: class ids are integers in 1..255 (0 is the background), got {v!r}")
        out.append(int(v))
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: repeated class id in {out}")
    if ignore_index is not None:
        if not 0 <= int(ignore_index) <= 255:
            raise ValueError(f"ignore_index must lie in 0..255, got {ignore_index}")
        if ignore_index == 0 or ignore_index in out:
            raise ValueError(f"ignore_index {ignore_index} is also a class id ({name} {out})")
    return sorted(out)


def _check_out_dir(out_dir: Path, *inputs: Path) -> None:
    """Refuse an output folder that is, or contains, an input folder: replacing it would delete the input."""
    out = out_dir.resolve()
    for folder in inputs:
        src = folder.resolve()
        if src == out or out in src.parents:
            raise InputError(out_dir, f"output folder would replace the input folder {folder}")


def _list_tiles(folder: Path, what: str) -> dict[str, Path]:
    """Stem -> path of a folder's GeoTIFFs; a missing or empty folder and clashing stems are errors."""
    tiles = io.list_rasters(folder)  # missing folder, duplicate stems (a.tif + a.tiff)
    if not tiles:
        others = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        held = "it is empty" if not others else f"it holds {_fmt_names(others)}"
        raise InputError(folder, f"no {what} GeoTIFFs (*.tif, *.tiff) in this folder; {held}")
    lower: dict[str, str] = {}
    for stem, path in tiles.items():
        if not path.is_file():
            raise InputError(path, "not a regular file (a folder or a broken link)")
        other = lower.setdefault(stem.lower(), stem)
        if other != stem:
            raise InputError(
                path,
                f"duplicate stem {stem!r}: differs from {tiles[other].name} only in letter case, "
                "so the two would share output files",
            )
    return tiles


def image_without_label(stem: str, labels_dir: Path) -> str:
    return f"image has no label: every train image needs one, expected {labels_dir / (stem + '.tif')}"


def _label_without_image(stem: str, images_dir: Path) -> str:
    return f"label has no image: no {stem}.tif or {stem}.tiff in {images_dir}"


def _read(reader: Callable[[Path], np.ndarray], path: Path) -> np.ndarray:
    """Run an io reader, turning any low-level read failure into an InputError that names the file."""
    try:
        return reader(path)
    except InputError:
        raise
    except (RasterioError, OSError) as err:
        raise InputError(path, f"not a readable GeoTIFF ({err})") from None


def _check_pair(
    image_path: Path, label_path: Path, allowed: set[int], allowed_text: str
) -> tuple[int, int, np.ndarray]:
    """Read (all pixels of) an image and its label; return height, width and the label's value histogram."""
    image = _read(io.read_image, image_path)  # 3 bands, uint8, every pixel decoded
    height, width = int(image.shape[0]), int(image.shape[1])
    del image
    label = _read(io.read_label, label_path)  # 1 band, uint8
    if label.shape != (height, width):
        raise InputError(
            label_path,
            f"label size {label.shape[0]}x{label.shape[1]} (height x width) differs from its image "
            f"{image_path.name} ({height}x{width})",
        )
    counts = np.bincount(label.ravel(), minlength=256)
    bad = [int(v) for v in np.flatnonzero(counts) if int(v) not in allowed]
    if bad:
        raise InputError(
            label_path, f"label values outside the configured classes: {_fmt_pixels(counts, bad)}; {allowed_text}"
        )
    return height, width, counts


def _parse_split_lists(
    split_lists: Mapping[str, Any],
    novel: list[int],
    images: dict[str, Path],
    labels: dict[str, Path],
    images_dir: Path,
    labels_dir: Path,
) -> tuple[dict[str, int], list[str]]:
    """Check the given split lists against the folder; return support stem -> class and the sorted query stems."""

    def problem(text: str) -> InputError:
        return InputError(images_dir, f"split lists: {text}")

    def stem_of(name: Any) -> str:
        # accra_2, accra_2.tif and images/accra_2.tif all name the same tile
        if not isinstance(name, str) or not name.strip():
            raise problem(f"{name!r} is not a tile name")
        path = Path(name.strip())
        return path.stem if path.suffix.lower() in IMAGE_SUFFIXES else path.name

    if not isinstance(split_lists, Mapping) or set(split_lists) != {"support", "query"}:
        keys = sorted(map(str, split_lists)) if isinstance(split_lists, Mapping) else type(split_lists).__name__
        raise problem(f'expected the keys "support" and "query", got {keys}')
    support, query = split_lists["support"], split_lists["query"]
    if not isinstance(support, Mapping):
        raise problem('"support" must map each novel class id to a list of stems')
    if isinstance(query, str) or not isinstance(query, Iterable):
        raise problem('"query" must be a list of stems')

    listed: dict[str, int] = {}
    for key in sorted(support, key=str):
        try:
            cls = int(key)
        except (TypeError, ValueError):
            raise problem(f"support class {key!r} is not a class id") from None
        if cls not in novel:
            raise problem(f"support class {cls} is not a novel class ({_fmt_ids(novel)})")
        stems = support[key]
        if isinstance(stems, str) or not isinstance(stems, Iterable):
            raise problem(f"the support of class {cls} must be a list of stems")
        for stem in sorted(stem_of(s) for s in stems):
            if stem not in images:
                raise InputError(
                    images_dir / f"{stem}.tif",
                    f"listed in the split lists as a support tile of class {cls}, "
                    f"but no image with this stem exists in {images_dir}",
                )
            if stem in listed:
                raise InputError(
                    images[stem],
                    f"listed twice in the split lists' support of class {cls}"
                    if listed[stem] == cls
                    else f"listed in the split lists as a support tile of both class {listed[stem]} and class {cls}",
                )
            if stem not in labels:
                raise InputError(
                    images[stem],
                    f"listed in the split lists as a support tile of class {cls}, but it has no label in {labels_dir}",
                )
            listed[stem] = cls
    query_stems = sorted(stem_of(s) for s in query)
    for stem in query_stems:
        if stem not in images:
            raise InputError(
                images_dir / f"{stem}.tif",
                f"listed in the split lists as a query tile, but no image with this stem exists in {images_dir}",
            )
        if stem in listed:
            raise InputError(
                images[stem],
                f"listed in the split lists both as a query tile and as a support tile of class {listed[stem]}",
            )
    if len(set(query_stems)) != len(query_stems):
        dup = next(s for s, t in zip(query_stems, query_stems[1:], strict=False) if s == t)
        raise InputError(images[dup], "listed twice in the split lists' query list")
    return listed, query_stems


def _pixel_hash(image: np.ndarray) -> str:
    """Hash of an image's size and pixel bytes: equal for the same picture, whatever the file's compression."""
    digest = hashlib.sha256(repr(image.shape).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Message formatting


def _ignore_set(ignore_index: int | None) -> set[int]:
    return set() if ignore_index is None else {int(ignore_index)}


def _ignore_text(ignore_index: int | None) -> str:
    return "" if ignore_index is None else f" and {ignore_index} (ignore)"


def _fmt_ids(ids: Sequence[int], conj: str = "and") -> str:
    ids = list(ids)
    if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}"
    if len(ids) <= 1:
        return "".join(map(str, ids))
    return f"{', '.join(map(str, ids[:-1]))} {conj} {ids[-1]}"


def _fmt_pixels(counts: np.ndarray, values: Sequence[int]) -> str:
    parts = [f"{v} ({int(counts[v])} px)" for v in values[:_MAX_LISTED]]
    if len(values) > _MAX_LISTED:
        parts.append(f"and {len(values) - _MAX_LISTED} more")
    return ", ".join(parts)


def _fmt_names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:3])
    return shown if len(names) <= 3 else f"{shown} and {len(names) - 3} more"
