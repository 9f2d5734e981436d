"""Pasting novel-class predictions onto the running label map, one class at a time (method section 7)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def filter_decision(similarity: float | None, thresholds: Sequence[float] | None) -> str:
    """Novel-class filtering by query-support similarity: "skip", "force" or "normal".

    At or below ``low`` the class is never pasted on this query; at or above ``high`` it is pasted regardless of the
    background check; in between the usual rules apply.
    """
    if thresholds is None or similarity is None:
        return "normal"
    low, high = thresholds
    if similarity <= low:
        return "skip"
    if similarity >= high:
        return "force"
    return "normal"


def background_share(base_ids: np.ndarray, class_mask: np.ndarray) -> tuple[int, int]:
    """Pixels of a labelled class that the base prediction leaves at 0, and the class's pixels: (at 0, all)."""
    if base_ids.shape != class_mask.shape:
        raise ValueError(f"base prediction {base_ids.shape} and class mask {class_mask.shape} differ in size")
    where = class_mask.astype(bool)
    return int((base_ids[where] == 0).sum()), int(where.sum())


def resolve_background_check(setting: bool | str, share: float | None, min_share: float) -> bool:
    """The background check to apply: ``setting`` itself, or for "auto" whether ``share`` reaches ``min_share``.

    The check assumes the base model calls a novel object 0, as base training taught it (novel pixels are labelled 0
    in the train set); where it labels most of the class's support pixels as some base class, the check would throw
    most of the class away, so "auto" drops it.
    """
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"background check must be true, false or 'auto', got {setting!r}")
    if share is None:
        raise ValueError("background check 'auto' needs the base model's background share on the support tiles")
    return share >= min_share


def paste_class(
    current: np.ndarray,
    novel_mask: np.ndarray,
    cls: int,
    *,
    image: np.ndarray | None = None,
    background_check: bool = True,
    skip_nodata: bool = True,
    decision: str = "normal",
) -> np.ndarray:
    """Return ``current`` with class ``cls`` pasted where ``novel_mask`` is set.

    background_check: paste only where the current label is still 0. skip_nodata: never paste on pixels that are
    pure black in the query image (no data). decision "force" drops the background check, "skip" pastes nothing.
    """
    if current.shape != novel_mask.shape:
        raise ValueError(f"label map {current.shape} and class mask {novel_mask.shape} differ in size")
    out = current.copy()
    if decision == "skip":
        return out
    where = novel_mask.astype(bool)
    if background_check and decision != "force":
        where &= current == 0
    if skip_nodata and image is not None:
        if image.shape[:2] != current.shape:
            raise ValueError(f"query image {image.shape[:2]} and label map {current.shape} differ in size")
        where &= image.reshape(*image.shape[:2], -1).any(axis=-1)
    out[where] = cls
    return out
