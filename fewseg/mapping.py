"""Prompt selection by global image embedding (method section 3).

Each tile set (train, query, support) is embedded once and saved on its own, so adding query tiles does not
recompute the train set. Ranking is cosine similarity of L2-normalised features.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fewseg.errors import ConfigError
from fewseg.io import InputError, atomic_path, read_image

log = logging.getLogger("fewseg.mapping")


def build_encoder(name: str, *, weights: str | None = None, pretrained: bool = False, seed: int = 0):
    """A timm image encoder without its classifier; weights from a local file, timm's cache, or seeded random."""
    import timm

    torch.manual_seed(seed)
    kwargs = {"num_classes": 0}
    if weights:
        if not Path(weights).is_file():
            raise InputError(weights, "encoder weights file not found")
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
        pretrained = True
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        raise ConfigError(f"mapping/encoder {name!r}: {err}") from None
    return model.eval()


def _preprocess(image: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    t = torch.from_numpy(resized).permute(2, 0, 1)
    return (t - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@torch.no_grad()
def embed_images(
    paths: Sequence[str | os.PathLike], encoder, image_size: int, batch_size: int = 16, progress=None
) -> np.ndarray:
    """(N, D) float32 L2-normalised features of the given images."""
    cfg = getattr(encoder, "pretrained_cfg", {}) or {}
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    feats = []
    for start in range(0, len(paths), batch_size):
        batch = torch.stack(
            [_preprocess(read_image(p), image_size, mean, std) for p in paths[start : start + batch_size]]
        )
        f = encoder(batch).float()
        feats.append(torch.nn.functional.normalize(f.flatten(1), dim=1).numpy())
        if progress:
            progress(len(batch))
    return np.concatenate(feats) if feats else np.zeros((0, 0), dtype=np.float32)


def save_embeddings(path: str | os.PathLike, stems: Sequence[str], features: np.ndarray, meta: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, stems=np.asarray(stems), features=features, **{k: np.asarray(v) for k, v in meta.items()})


def load_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    with np.load(path) as data:
        return [str(s) for s in data["stems"]], data["features"]


def rank_prompts(query: np.ndarray, train: np.ndarray, top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine similarities of the top_n train tiles per query, best first (ties by index)."""
    sim = query @ train.T
    order = np.argsort(-sim, axis=1, kind="stable")[:, :top_n]
    return order, np.take_along_axis(sim, order, axis=1)


def novel_similarity(query: np.ndarray, support: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Mean cosine similarity of each query to each class's support tiles."""
    return {cls: (query @ feats.T).mean(axis=1) for cls, feats in support.items()}


def build_mapping(
    query_stems: Sequence[str],
    query_feats: np.ndarray,
    train_stems: Sequence[str],
    train_feats: np.ndarray,
    support: dict[int, tuple[list[str], np.ndarray]],
    *,
    top_n: int,
    novel_filter: dict,
) -> dict:
    """The prompts of every query, the query-support similarities, and the filter/force lists when enabled."""
    order, sims = rank_prompts(query_feats, train_feats, top_n)
    prompts = {
        q: [{"stem": train_stems[j], "similarity": round(float(s), 6)} for j, s in zip(order[i], sims[i], strict=True)]
        for i, q in enumerate(query_stems)
    }
    novel = novel_similarity(query_feats, {c: f for c, (_, f) in support.items()})
    similarity = {q: {str(c): round(float(novel[c][i]), 6) for c in sorted(novel)} for i, q in enumerate(query_stems)}
    lists: dict[str, dict[str, list[str]]] = {}
    if novel_filter["enabled"]:
        for c, (low, high) in sorted(novel_filter["thresholds"].items()):
            if c not in novel:
                continue
            lists[str(c)] = {
                "filter": [q for i, q in enumerate(query_stems) if novel[c][i] <= low],
                "force": [q for i, q in enumerate(query_stems) if novel[c][i] >= high],
            }
    return {"prompts": prompts, "novel_similarity": similarity, "novel_lists": lists}
