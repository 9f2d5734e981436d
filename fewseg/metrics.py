"""The challenge metric (organizers' reference): IoU per class summed over the whole query set.

Intersections and unions are accumulated over all query tiles before dividing, so a class's IoU is not an average
of per-tile IoUs. Pixels labelled ``ignore_index`` in the truth are left out; class 0 is not averaged, but its
mistakes enlarge other classes' unions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

BASE_WEIGHT = 0.4
NOVEL_WEIGHT = 0.6


class ConfusionMatrix:
    """Accumulates a (K, K) confusion matrix, rows = truth, columns = prediction."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, truth: np.ndarray) -> None:
        if pred.shape != truth.shape:
            raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in size")
        keep = truth != self.ignore_index
        t = truth[keep].astype(np.int64)
        p = pred[keep].astype(np.int64)
        bad = (t >= self.num_classes) | (p >= self.num_classes)
        if bad.any():
            raise ValueError(f"class ids beyond {self.num_classes - 1} in prediction or truth")
        self.matrix += np.bincount(t * self.num_classes + p, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes
        )

    def iou(self) -> np.ndarray:
        """IoU per class; NaN for a class that appears in neither truth nor prediction."""
        inter = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def _mean(values: Iterable[float]) -> float:
    vals = [v for v in values if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def summarize(cm: ConfusionMatrix, base: Sequence[int], novel: Sequence[int], names: dict[int, str]) -> dict:
    """The challenge's figures: per-class IoU, base and novel mIoU and the weighted score."""
    iou = cm.iou()
    base_miou = _mean(iou[c] for c in base)
    novel_miou = _mean(iou[c] for c in novel)
    score = BASE_WEIGHT * base_miou + NOVEL_WEIGHT * novel_miou
    per_class = {
        str(c): {
            "name": names.get(c, str(c)),
            "iou": None if np.isnan(iou[c]) else float(iou[c]),
            "truth_pixels": int(cm.matrix[c].sum()),
            "predicted_pixels": int(cm.matrix[:, c].sum()),
        }
        for c in range(cm.num_classes)
    }
    return {
        "base_miou": base_miou,
        "novel_miou": novel_miou,
        "score": score,
        "weights": {"base": BASE_WEIGHT, "novel": NOVEL_WEIGHT},
        "per_class": per_class,
        "pixel_accuracy": float(np.trace(cm.matrix) / max(cm.matrix.sum(), 1)),
    }


def format_table(summary: dict) -> str:
    """A per-class table for logs and reports."""
    lines = [f"{'id':>3}  {'class':<28} {'IoU':>7} {'truth px':>10} {'pred px':>10}"]
    for cid, row in summary["per_class"].items():
        iou = "    n/a" if row["iou"] is None else f"{row['iou']:7.4f}"
        lines.append(f"{cid:>3}  {row['name'][:28]:<28} {iou} {row['truth_pixels']:>10} {row['predicted_pixels']:>10}")
    lines.append(
        f"base mIoU {summary['base_miou']:.4f}   novel mIoU {summary['novel_miou']:.4f}   "
        f"score (0.4 base + 0.6 novel) {summary['score']:.4f}"
    )
    return "\n".join(lines)
