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
