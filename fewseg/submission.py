"""The challenge submission: one zip, ``<query stem>.png`` files at its top level, written reproducibly."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fewseg.io import InputError, atomic_path, read_label

FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp: same bytes on every run


def write_submission(
    zip_path: str | os.PathLike,
    predictions: Mapping[str, str | os.PathLike],
    sizes: Mapping[str, tuple[int, int]],
    max_class: int,
) -> list[str]:
    """Zip one uint8 PNG per query stem, checking each is single-band, in range and at the query's size."""
    names = []
    with atomic_path(zip_path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for stem in sorted(predictions):
            path = Path(predictions[stem])
            ids = read_label(path)
            if ids.shape != tuple(sizes[stem]):
                raise InputError(path, f"prediction is {ids.shape}, the query is {tuple(sizes[stem])}")
            if ids.size and int(ids.max()) > max_class:
                raise InputError(path, f"class id {int(ids.max())} is beyond {max_class}")
            info = zipfile.ZipInfo(f"{stem}.png", date_time=FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, path.read_bytes())
            names.append(info.filename)
    return names


def read_submission(zip_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Decode a submission zip back to stem -> id map (for tests and checks)."""
    import io as _io

    from PIL import Image

    out = {}
    with zipfile.ZipFile(zip_path) as zf:
        for name in zf.namelist():
            with Image.open(_io.BytesIO(zf.read(name))) as im:
                out[Path(name).stem] = np.asarray(im).copy()
    return out
