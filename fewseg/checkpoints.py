"""fewseg's own files: the base model, a learned prompt (about 5 MB at ViT-L size), and resumable training state.

Every file is written to a temporary name and renamed into place, so a killed job never leaves a file that a rerun
would mistake for complete. A prompt records the fingerprint of the base model it was trained against; loading it
against another base model is an error rather than a silently wrong prediction.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fewseg.io import InputError, atomic_path
from fewseg.model import SegGPT, SegGPTConfig, build_model, fingerprint

BASE_FORMAT = "fewseg-base-model"
PROMPT_FORMAT = "fewseg-prompt"
FORMAT_VERSION = 1


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _load(path: str | os.PathLike, expected: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InputError(path, f"not a readable checkpoint ({err})") from None
    if not isinstance(data, dict) or data.get("format") != expected:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise InputError(path, f"expected a {expected} file, found {found!r}")
    return data


def save_base_model(path: str | os.PathLike, model: SegGPT, meta: dict | None = None) -> str:
    """Save the base model; returns its fingerprint."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fp = fingerprint(state)
    save_torch(
        path,
        {
            "format": BASE_FORMAT,
            "version": FORMAT_VERSION,
            "config": model.config.to_dict(),
            "state_dict": state,
            "fingerprint": fp,
            "meta": meta or {},
        },
    )
    return fp


def load_base_model(path: str | os.PathLike) -> tuple[SegGPT, dict]:
    """Load a base model saved by :func:`save_base_model`; returns (model, file metadata)."""
    data = _load(path, BASE_FORMAT)
    model = build_model(SegGPTConfig.from_dict(data["config"]))
    model.load_state_dict(data["state_dict"])
    return model, {"fingerprint": data["fingerprint"], **data.get("meta", {})}


def save_prompt(
    path: str | os.PathLike,
    prompt_image: torch.Tensor,
    prompt_label: torch.Tensor,
    *,
    cls: int,
    name: str,
    base_fingerprint: str,
    tile_size: tuple[int, int],
    meta: dict | None = None,
) -> None:
    save_torch(
        path,
        {
            "format": PROMPT_FORMAT,
            "version": FORMAT_VERSION,
            "cls": int(cls),
            "name": name,
            "tile_size": list(tile_size),
            "base_fingerprint": base_fingerprint,
            "prompt_image": prompt_image.detach().cpu().float().contiguous(),
            "prompt_label": prompt_label.detach().cpu().float().contiguous(),
            "meta": meta or {},
        },
    )


def load_prompt(path: str | os.PathLike, base_fingerprint: str | None = None) -> dict:
    """Load a learned prompt; refuse one trained against a different base model."""
    data = _load(path, PROMPT_FORMAT)
    if base_fingerprint is not None and data["base_fingerprint"] != base_fingerprint:
        raise InputError(
            path,
            f"prompt for class {data['cls']} was trained against base model {data['base_fingerprint']}, "
            f"not the base model in use ({base_fingerprint}): retrain the prompt",
        )
    return data


def load_resume(path: str | os.PathLike, settings_digest: str) -> dict | None:
    """Training state to resume from, or None when absent, unreadable or made with other settings."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        return None  # a state file is only ever replaced whole, but a foreign or damaged one is ignored
    if not isinstance(data, dict) or data.get("settings_digest") != settings_digest:
        return None
    return data
