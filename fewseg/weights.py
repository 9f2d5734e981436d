"""Loading and converting SegGPT checkpoints.

Three layouts are understood:

* ``fewseg``: a flat state dict of :class:`fewseg.model.SegGPT` (Painter parameter names);
* ``painter``: the original BAAI release, the same names wrapped as ``{"model": state_dict}``;
* ``hf``: ``transformers``' ``SegGptForImageSegmentation`` (``model.embeddings...``, ``decoder...``).

Usage as a converter: ``python -m fewseg.weights INPUT OUTPUT [--to fewseg|painter|hf]``; the output
is written as safetensors or a torch pickle according to its suffix.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pickle
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fewseg.errors import WeightsError
from fewseg.model import SegGPT, SegGPTConfig

__all__ = [
    "WeightsError",
    "checkpoint_filter_fn",
    "convert_main",
    "detect_format",
    "infer_config",
    "load_pretrained",
    "load_state_dict",
    "to_hf_state_dict",
    "to_painter_state_dict",
]

Format = Literal["fewseg", "painter", "hf"]


# fewseg / Painter name <-> HF name, for parameters outside the blocks (exact names or module prefixes).
_TOP_LEVEL = [
    ("patch_embed.proj.", "model.embeddings.patch_embeddings.projection."),
    ("mask_token", "model.embeddings.mask_token"),
    ("segment_token_x", "model.embeddings.segment_token_input"),
    ("segment_token_y", "model.embeddings.segment_token_prompt"),
    ("type_token_cls", "model.embeddings.type_token_semantic"),
    ("type_token_ins", "model.embeddings.type_token_instance"),
    ("pos_embed", "model.embeddings.position_embeddings"),
    ("norm.", "model.encoder.layernorm."),
    ("decoder_embed.", "decoder.decoder_embed."),
    ("decoder_pred.0.", "decoder.decoder_pred.conv."),
    ("decoder_pred.1.", "decoder.decoder_pred.layernorm."),
    ("decoder_pred.3.", "decoder.decoder_pred.head."),
]
# Inside block N: "blocks.N." <-> "model.encoder.layers.N.".
_IN_BLOCK = [
    ("attn.", "attention."),
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("mlp.fc1.", "mlp.lin1."),
    ("mlp.fc2.", "mlp.lin2."),
]
_KNOWN_PREFIXES = tuple(a for a, _ in _TOP_LEVEL) + ("blocks.", "model.embeddings.", "model.encoder.", "decoder.")
_OURS_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")
_HF_BLOCK = re.compile(r"^model\.encoder\.layers\.(\d+)\.(.*)$")

# Keys that identify each layout; also what infer_config needs.
_REQUIRED = (
    "patch_embed.proj.weight",
    "pos_embed",
    "mask_token",
    "blocks.0.attn.qkv.weight",
    "blocks.0.attn.rel_pos_h",
    "blocks.0.attn.rel_pos_w",
    "blocks.0.mlp.fc1.weight",
    "decoder_embed.weight",
)


def _rename(key: str, pairs: Sequence[tuple[str, str]]) -> str | None:
    for src, dst in pairs:
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src) :]
    return None


def _hf_to_ours(key: str) -> str:
    m = _HF_BLOCK.match(key)
    if m:
        inner = _rename(m.group(2), [(b, a) for a, b in _IN_BLOCK])
        return f"blocks.{m.group(1)}.{inner if inner is not None else m.group(2)}"
    renamed = _rename(key, [(b, a) for a, b in _TOP_LEVEL])
    return key if renamed is None else renamed


def _ours_to_hf(key: str) -> str:
    m = _OURS_BLOCK.match(key)
    if m:
        inner = _rename(m.group(2), _IN_BLOCK)
        return f"model.encoder.layers.{m.group(1)}.{inner if inner is not None else m.group(2)}"
    renamed = _rename(key, _TOP_LEVEL)
    return key if renamed is None else renamed


def _unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Strip the Painter ``{"model": ...}`` wrapper and a DistributedDataParallel ``module.`` prefix."""
    inner = state_dict.get("model")
    if isinstance(inner, Mapping) and not isinstance(inner, Tensor):
        state_dict = inner
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def _short_list(keys: Sequence[str] | set[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"[{shown}{more}]"


def _mismatch_error(
    what: str,
    missing: Sequence[str] | set[str] = (),
    unexpected: Sequence[str] | set[str] = (),
    shapes: Sequence[str] = (),
) -> WeightsError:
    lines = [what]
    lines.append(f"  missing keys ({len(missing)}): {_short_list(missing)}")
    lines.append(f"  unexpected keys ({len(unexpected)}): {_short_list(unexpected)}")
    if shapes:
        lines.append(f"  shape mismatches ({len(shapes)}): {_short_list(shapes)}")
    return WeightsError("\n".join(lines))


def detect_format(state_dict: Mapping[str, Any]) -> Format:
    """Which layout a loaded checkpoint uses; raises :class:`WeightsError` for anything else."""
    if not isinstance(state_dict, Mapping):
        raise WeightsError(f"expected a mapping of parameter names to tensors, got {type(state_dict).__name__}")
    wrapped = isinstance(state_dict.get("model"), Mapping)
    keys = set(_unwrap(state_dict))
    if all(k in keys for k in _REQUIRED):
        return "painter" if wrapped else "fewseg"
    hf_required = {_ours_to_hf(k) for k in _REQUIRED}
    if hf_required <= keys:
        return "hf"
    raise _mismatch_error(
        "not a SegGPT checkpoint in fewseg, Painter or Hugging Face layout",
        missing=[k for k in _REQUIRED if k not in keys],
        unexpected=[k for k in keys if not k.startswith(_KNOWN_PREFIXES)],
    )


def _resize_rel_pos(rel_pos: Tensor, length: int) -> Tensor:
    """Linear resampling of a relative-position table, as done at run time for other lengths."""
    resized = F.interpolate(rel_pos.float().T[None], size=length, mode="linear")
    return resized[0].T.to(rel_pos.dtype)


def _resize_pos_embed(pos_embed: Tensor, grid: int) -> Tensor:
    """Bicubic resampling of the absolute position table, keeping the leading class-token row."""
    cls_row, table = pos_embed[:, :1], pos_embed[:, 1:]
    g = math.isqrt(table.shape[1])
    table = table.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False)
    table = table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)
    return torch.cat([cls_row, table], dim=1)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: SegGPT | None = None) -> dict[str, Tensor]:
    """Convert any supported layout to fewseg names.

    With ``model``, position tables whose size differs from the model's (another canvas or pretrain
    grid) are resampled to fit it.
    """
    fmt = detect_format(state_dict)
    state = _unwrap(state_dict)
    out = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            continue
        out[_hf_to_ours(key) if fmt == "hf" else key] = value
    if model is not None:
        target = model.state_dict()
        for key, value in out.items():
            want = target.get(key)
            if want is None or want.shape == value.shape:
                continue
            if key.endswith((".attn.rel_pos_h", ".attn.rel_pos_w")) and value.shape[1:] == want.shape[1:]:
                out[key] = _resize_rel_pos(value, want.shape[0])
            elif key == "pos_embed" and value.shape[2] == want.shape[2]:
                out[key] = _resize_pos_embed(value, math.isqrt(want.shape[1] - 1))
    return out


def to_hf_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """Any supported layout to ``SegGptForImageSegmentation`` names."""
    return {_ours_to_hf(k): v for k, v in checkpoint_filter_fn(state_dict).items()}


def to_painter_state_dict(state_dict: Mapping[str, Any]) -> dict[str, dict[str, Tensor]]:
    """Any supported layout to the original release's ``{"model": state_dict}``."""
    return {"model": checkpoint_filter_fn(state_dict)}


# Width from which a model trains with activation checkpointing by default (ViT-L: 1024).
LARGE_MODEL_DIM = 1024


def infer_config(state_dict: Mapping[str, Any], **overrides: Any) -> SegGPTConfig:
    """Architecture read off the tensor shapes of a checkpoint (any supported layout).

    Not stored in the tensors: ``merge_index`` (default 2, lowered to the first feature layer for very
    shallow models), ``feature_layers`` (default evenly spaced, ``(i + 1) * depth // n - 1``),
    ``layer_norm_eps``, ``drop_path_rate`` and the loss settings. Pass them as keyword overrides.
    """
    sd = checkpoint_filter_fn(state_dict)
    dim, _, kh, kw = sd["patch_embed.proj.weight"].shape
    if kh != kw:
        raise WeightsError(f"non-square patch kernel {kh}x{kw} is not supported")
    patch = kh
    depth = 1 + max(int(m.group(1)) for k in sd if (m := _OURS_BLOCK.match(k)))
    head_dim = sd["blocks.0.attn.rel_pos_h"].shape[1]
    grid_h = (sd["blocks.0.attn.rel_pos_h"].shape[0] + 1) // 2
    grid_w = (sd["blocks.0.attn.rel_pos_w"].shape[0] + 1) // 2
    if grid_h % 2:
        raise WeightsError(f"canvas grid height {grid_h} is odd; a SegGPT canvas stacks two equal tiles")
    dec_out, dec_in = sd["decoder_embed.weight"].shape
    n_features = dec_in // dim
    fields: dict[str, Any] = {
        "embed_dim": dim,
        "depth": depth,
        "num_heads": dim // head_dim,
        "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        "patch_size": patch,
        "tile_size": (grid_h // 2 * patch, grid_w * patch),
        "pretrain_grid": math.isqrt(sd["pos_embed"].shape[1] - 1),
        "decoder_dim": dec_out // (patch * patch),
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        # ViT-L sizes train with per-block activation checkpointing unless told otherwise, as the preset does
        "grad_checkpointing": dim >= LARGE_MODEL_DIM,
    }
    feature_layers = overrides.pop(
        "feature_layers", tuple((i + 1) * depth // n_features - 1 for i in range(n_features))
    )
    if len(feature_layers) != n_features:
        raise WeightsError(f"decoder_embed takes {n_features} feature layers, got feature_layers={feature_layers}")
    fields["feature_layers"] = tuple(feature_layers)
    fields["merge_index"] = overrides.pop("merge_index", min(2, min(feature_layers)))
    fields.update(overrides)
    return SegGPTConfig(**fields)


def _read(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # Training checkpoints often carry their argparse arguments next to the weights.
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling / header errors of many kinds
        raise WeightsError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc


def load_state_dict(model: SegGPT, state_dict: Mapping[str, Any], source: str = "state dict") -> SegGPT:
    """Strictly load any supported layout into ``model``; mismatches raise :class:`WeightsError`."""
    sd = checkpoint_filter_fn(state_dict, model)
    target = model.state_dict()
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [
        f"{k}: {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in target.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise _mismatch_error(f"{source} does not match the SegGPT model", missing, unexpected, shapes)
    model.load_state_dict(sd, strict=True)
    return model


def load_pretrained(path: str | Path, *, config: SegGPTConfig | None = None, **overrides: Any) -> SegGPT:
    """Build a SegGPT from a .pth/.pt/.bin or .safetensors file in any supported layout.

    The architecture comes from ``config`` or is inferred from the tensors; ``overrides`` replace config
    fields (e.g. ``merge_index``, ``feature_layers``; a different ``tile_size`` resamples the position
    tables).
    """
    path = Path(path)
    state = _read(path)
    if config is None and isinstance(state, Mapping) and state.get("format") == "fewseg-base-model":
        # fewseg's own model files record the architecture, including what the tensors cannot tell.
        config = SegGPTConfig.from_dict(state["config"])
    try:
        if config is None:
            detect_format(state)
            config = infer_config(state, **overrides)
        else:
            if overrides:
                config = dataclasses.replace(config, **overrides)
            if not _is_known(state):
                # List the keys the requested model expects, without allocating it.
                with torch.device("meta"):
                    expected = list(SegGPT(config).state_dict())
                got = list(state) if isinstance(state, Mapping) else []
                raise _mismatch_error(
                    "not a SegGPT checkpoint in fewseg, Painter or Hugging Face layout",
                    [k for k in expected if k not in got],
                    [k for k in got if k not in expected],
                )
        model = SegGPT(config)
        load_state_dict(model, state, source="checkpoint")
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc}") from exc
    return model


def _is_known(state: Any) -> bool:
    try:
        detect_format(state)
    except WeightsError:
        return False
    return True


def _save(state: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        flat = _unwrap(state)  # safetensors holds one flat mapping; Painter names equal fewseg names
        save_file({k: v.contiguous() for k, v in flat.items()}, str(path))
    else:
        torch.save(dict(state), path)


def convert_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fewseg.weights",
        description="Convert a SegGPT checkpoint between fewseg, Painter and Hugging Face layouts.",
    )
    parser.add_argument("input", type=Path, help="checkpoint (.pth/.pt/.bin or .safetensors), any layout")
    parser.add_argument("output", type=Path, help="output file; .safetensors or a torch pickle by suffix")
    parser.add_argument("--to", choices=("fewseg", "painter", "hf"), default="fewseg", help="output layout")
    args = parser.parse_args(argv)
    try:
        state = _read(args.input)
        source = detect_format(state)
        converted: Mapping[str, Any]
        if args.to == "hf":
            converted = to_hf_state_dict(state)
        elif args.to == "painter":
            converted = to_painter_state_dict(state)
        else:
            converted = checkpoint_filter_fn(state)
    except (FileNotFoundError, WeightsError) as exc:
        message = str(exc) if str(args.input) in str(exc) else f"{args.input}: {exc}"
        print(f"error: {message}", file=sys.stderr)
        return 1
    _save(converted, args.output)
    print(f"{args.input} ({source}) -> {args.output} ({args.to})")
    return 0


if __name__ == "__main__":
    raise SystemExit(convert_main())
