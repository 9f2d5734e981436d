"""Raster and file I/O: GeoTIFF and PNG reading with input checks, and writes that never leave half a file.

Every writer goes through :func:`atomic_path` / :func:`atomic_dir`: data lands under a temporary name in the same
folder and is renamed into place only once complete, so a job killed at any moment leaves either the old file or
nothing, never a truncated file that a rerun would take as finished.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

from fewseg.errors import InputError

IMAGE_SUFFIXES = (".tif", ".tiff")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------------------------
# Atomic writes


def _remove_stale_parts(path: Path, suffix: str) -> None:
    """Delete what a killed writer of ``path`` left: one writer per output at a time (Snakemake and the run lock
    see to that), so any temporary of the same output that exists now is a dead one."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.part{glob.escape(suffix)}"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(path, path.suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; outputs should read like any other file
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` as a whole when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(path, "")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically, keys sorted so the bytes depend only on the content."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(path, f"not valid JSON ({err})") from None


# ---------------------------------------------------------------------------------------------------------------
# GeoTIFF


def _open(path: Path):
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioIOError as err:
        raise InputError(path, f"not a readable GeoTIFF ({err})") from None


def _read_all(path: Path) -> tuple[np.ndarray, dict]:
    with _open(path) as src:
        try:
            data = src.read()
        except RasterioIOError as err:
            raise InputError(path, f"corrupt or truncated raster ({err.__cause__ or err})") from None
        profile = {"crs": src.crs, "transform": src.transform, "height": src.height, "width": src.width}
        dtypes = set(src.dtypes)
    if dtypes != {"uint8"}:
        raise InputError(path, f"expected uint8 pixels, found {', '.join(sorted(dtypes))}")
    return data, profile


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an RGB uint8 image (GeoTIFF or any PIL-readable file) as an (H, W, 3) array."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return _read_pil(path, mode="RGB")
    data, _ = _read_all(path)
    if data.shape[0] != 3:
        raise InputError(path, f"expected 3 bands (RGB), found {data.shape[0]}")
    return np.ascontiguousarray(data.transpose(1, 2, 0))


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a single-band uint8 label (GeoTIFF or PNG) as an (H, W) array of class ids."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return _read_pil(path, mode="L")
    data, _ = _read_all(path)
    if data.shape[0] != 1:
        raise InputError(path, f"expected 1 band (class ids), found {data.shape[0]}")
    return data[0]


def read_georef(path: str | os.PathLike) -> dict:
    """CRS and transform of a raster, to write predictions that line up with the imagery."""
    with _open(Path(path)) as src:
        return {"crs": src.crs, "transform": src.transform}


def _read_pil(path: Path, mode: str) -> np.ndarray:
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with Image.open(path) as im:
            im.load()
            if mode == "L" and im.mode not in ("L", "P"):
                raise InputError(path, f"expected a single-band 8-bit label, found mode {im.mode}")
            return np.asarray(im.convert(mode) if im.mode != mode else im).copy()
    except InputError:
        raise
    except Exception as err:  # PIL raises many types for broken files
        raise InputError(path, f"not a readable image ({err})") from None


def write_geotiff(path: str | os.PathLike, array: np.ndarray, *, crs=None, transform=None) -> None:
    """Write (H, W) or (H, W, C) uint8 data as a deflate-compressed GeoTIFF, atomically."""
    array = np.asarray(array)
    bands = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    profile = {
        "driver": "GTiff",
        "height": bands.shape[1],
        "width": bands.shape[2],
        "count": bands.shape[0],
        "dtype": bands.dtype.name,
        "compress": "deflate",
    }
    if crs is not None:
        profile["crs"] = crs
    if transform is not None:
        profile["transform"] = transform
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(bands)


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically and byte-for-byte reproducibly."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"{path}: PNG data must be uint8, got {array.dtype}")
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", optimize=False, compress_level=6)


def list_rasters(folder: str | os.PathLike) -> dict[str, Path]:
    """Map file stem -> path for the GeoTIFFs of a folder; duplicate stems are an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "folder not found")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        if path.stem in found:
            raise InputError(path, f"duplicate stem {path.stem!r} (also {found[path.stem].name})")
        found[path.stem] = path
    return found
