"""Base fine-tuning (SPEC section 5) and two-phase prompt learning (SPEC section 6).

Both loops checkpoint every few steps and resume from the last checkpoint when rerun after a kill; because every
random draw of a step derives from (seed, step), a resumed run ends with the same weights as an uninterrupted one
on CPU.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fewseg.checkpoints import load_resume, save_base_model, save_prompt, save_torch
from fewseg.data import (
    LazyPermutation,
    TileStore,
    base_sample,
    blur,
    flip,
    num_pairs,
    pair_at,
    query_half_patches,
    resize_image,
    resize_nearest,
)
from fewseg.io import atomic_path, read_image, read_label
from fewseg.metrics import ConfusionMatrix
from fewseg.model import SegGPT, build_model
from fewseg.palette import BINARY_PALETTE, as_palette, decode_canvas, to_tensor
from fewseg.prompt import LearnablePrompt, crop_windows
from fewseg.runtime import autocast, pick_device
from fewseg.schedule import lr_at, set_lr

log = logging.getLogger("fewseg.train")


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers


def settings_digest(settings: dict, extra: str = "") -> str:
    blob = json.dumps(settings, sort_keys=True, default=str) + extra
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + salt) % (2**63)


def build_base_model(model_settings: dict) -> SegGPT:
    """The model to fine-tune: pretrained weights when configured, else the preset from scratch."""
    overrides = model_settings.get("overrides") or {}
    if model_settings.get("weights"):
        from fewseg.weights import load_pretrained

        return load_pretrained(model_settings["weights"], **overrides)
    return build_model(model_settings["preset"], **overrides)


def write_history(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot_history(path: str | os.PathLike, rows: Sequence[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    steps = [r["step"] for r in rows if "loss" in r]
    axes[0].plot(steps, [r["loss"] for r in rows if "loss" in r], lw=0.8)
    axes[0].set_title("training loss")
    axes[0].set_yscale("log")
    axes[1].plot(steps, [r["lr"] for r in rows if "lr" in r], lw=0.8)
    axes[1].set_title("learning rate")
    val = [(r["step"], r["val_miou"]) for r in rows if r.get("val_miou") not in (None, "")]
    if val:
        axes[2].plot(*zip(*val, strict=True), marker="o")
    axes[2].set_title("validation mIoU (held-out tiles)")
    for ax in axes:
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def _progress(total: int, initial: int, desc: str, stream, disable: bool = False) -> tqdm:
    return tqdm(
        total=total, initial=initial, desc=desc, file=stream, mininterval=5.0, ascii=True, dynamic_ncols=False,
        disable=disable,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Base training


def split_tiles(tiles: Sequence[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out whole tiles for validation (never crops of a train tile)."""
    n_val = int(round(len(tiles) * val_fraction))
    if n_val and len(tiles) - n_val < 2:
        n_val = max(0, len(tiles) - 2)
    order = np.random.default_rng([seed, 17]).permutation(len(tiles))
    val_ids = set(order[:n_val].tolist())
    return [t for i, t in enumerate(tiles) if i not in val_ids], [t for i, t in enumerate(tiles) if i in val_ids]


def _batch_tensors(samples: Sequence[dict], device: torch.device) -> tuple[torch.Tensor, ...]:
    images = to_tensor(np.stack([s["image"] for s in samples])).to(device)
    labels = to_tensor(np.stack([s["label"] for s in samples])).to(device)
    mask = torch.from_numpy(np.stack([s["mask"] for s in samples])).to(device)
    return images, labels, mask


@torch.no_grad()
def validate_base(model: SegGPT, store: TileStore, pairs: Sequence[tuple[int, int, int]], settings: dict, device):
    """mIoU of the base classes over the query half of held-out pairs.

    The pairs are painted with the configured palette, as inference paints its prompts, so the figure predicts the
    base metric (the published system validated with random palettes, which base inference never uses).
    """
    if not pairs:
        return None
    was_training = model.training
    model.eval()
    cfg = model.config
    num_colors = max(settings["base"]) + 1
    cm = ConfusionMatrix(num_colors)
    for first, second, seed in pairs:
        rng = np.random.default_rng(seed)
        sample = base_sample(
            store, first, second, rng, tile=cfg.tile_size, grid=cfg.grid_size, num_colors=num_colors,
            mask_ratio=1.0, blur_prob=0.0, blur_sigma=(0.1, 0.1), fixed_palette=store.palette,
            random_palette_prob=0.0,
        )  # fmt: skip
        sample["mask"] = query_half_patches(cfg.grid_size)
        images, labels, mask = _batch_tensors([sample], device)
        with autocast(device, settings["runtime"]["precision"]):
            pred = model(images, labels, mask)
        ids = decode_canvas(pred, sample["palette"])[0]
        h = cfg.tile_size[0]
        cm.update(ids[h:], sample["ids"][h:])
    model.train(was_training)
    iou = cm.iou()
    vals = [iou[c] for c in settings["base"] if not np.isnan(iou[c])]
    return float(np.mean(vals)) if vals else None


def train_base(
    tiles: Sequence[dict],
    out_model: str | os.PathLike,
    out_history: str | os.PathLike,
    out_plot: str | os.PathLike,
    checkpoint_dir: str | os.PathLike,
    settings: dict,
    progress_stream=None,
) -> dict:
    """Fine-tune SegGPT on pairs of train tiles; writes the best model (by held-out mIoU), history CSV and plot.

    Under a process group (see :mod:`fewseg.distributed`) each rank builds its share of every step's global batch
    (sample b of a micro-batch goes to rank b mod world) and gradients are summed over ranks; every sample draws
    its augmentation from its own (seed, step, index) stream and the loss is the mean over all masked pixels of
    the whole step, so the result does not depend on the number of processes (up to summation order).
    The checkpoint folder keeps ``best.pt`` (held-out mIoU) and ``last.pt`` (final step) beside the output.
    """
    from fewseg.collectives import all_reduce_grads, all_reduce_sum, rank_and_world

    t = settings["training"]
    seed = settings["seed"]
    rank, world = rank_and_world()
    main = rank == 0
    if t["batch_size"] % world:
        raise ValueError(f"base_training/batch_size {t['batch_size']} does not split over {world} processes")
    device = pick_device(settings["runtime"]["device"])
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    palette = as_palette(settings["palette"])
    torch.manual_seed(seed)
    model = build_base_model(settings["model"]).to(device)
    cfg = model.config
    train_tiles, val_tiles = split_tiles(tiles, t["val_tiles"], seed)
    if len(train_tiles) < 2:
        raise ValueError(f"base training needs at least 2 train tiles, {len(train_tiles)} left after the split")
    if t["working_size"] < max(cfg.tile_size):
        raise ValueError(f"base_training/working_size {t['working_size']} is below the model tile {cfg.tile_size}")
    store = TileStore(train_tiles, t["working_size"], palette, t["cache_tiles"])
    val_store = TileStore(val_tiles, t["working_size"], palette, t["cache_tiles"])
    val_rng = np.random.default_rng([seed, 23])
    val_pairs = []
    if len(val_tiles) >= 2:
        for _ in range(t["val_pairs"]):
            a, b = val_rng.choice(len(val_tiles), size=2, replace=False)
            val_pairs.append((int(a), int(b), int(val_rng.integers(2**31))))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or "token" in name or "pos_embed" in name or "rel_pos" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t["min_lr"], betas=tuple(t["betas"]),
    )  # fmt: skip
    num_colors = max(settings["base"]) + 1
    schedule = {
        "peak": t["lr"], "min_lr": t["min_lr"], "warmup": t["warmup_steps"],
        "first_cycle": t["first_cycle_steps"], "cycle_mult": t["cycle_mult"], "decay": t["peak_decay"],
    }  # fmt: skip
    ckpt_dir = Path(checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    resume_path, best_path, last_path = ckpt_dir / "resume.pt", ckpt_dir / "best.pt", ckpt_dir / "last.pt"
    digest = settings_digest(settings, str([x["stem"] for x in tiles]))
    history: list[dict] = []
    start, best = 0, -math.inf
    state = load_resume(resume_path, digest)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, best, history = state["step"], state["best"], state["history"]
        log.info("resuming base training at step %d of %d", start, t["steps"])
    model.train()
    pairs = num_pairs(len(train_tiles))
    per_step = t["batch_size"] * t["grad_accum"]
    steps_per_epoch = max(1, math.ceil(pairs / per_step))
    log.info(
        "base training: %d train tiles (%d pairs), %d held out; %d steps of %d samples; %s on %s x %d; %d parameters",
        len(train_tiles), pairs, len(val_tiles), t["steps"], per_step, cfg, device, world,
        sum(p.numel() for p in model.parameters()),
    )  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    pixels_per_patch = cfg.patch_size**2 * 3
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bar, bar_epoch = None, -1
    t0 = time.time()
    for step in range(start, t["steps"]):
        epoch = step // steps_per_epoch
        if epoch != bar_epoch:
            if bar is not None:
                bar.close()
            bar_epoch = epoch
            first = epoch * steps_per_epoch
            bar = _progress(
                min(steps_per_epoch, t["steps"] - first), step - first, f"epoch {epoch}", progress_stream, not main
            )
        lr = lr_at(step, **schedule)
        set_lr(optimizer, lr)
        torch.manual_seed(step_seed(seed, step, rank))  # drop-path draws
        optimizer.zero_grad(set_to_none=True)
        micro_batches = []
        for micro in range(t["grad_accum"]):
            samples = []
            for b in range(rank, t["batch_size"], world):
                g = step * per_step + micro * t["batch_size"] + b
                perm = LazyPermutation(pairs, [seed, g // pairs])
                i, j = pair_at(perm(g % pairs), len(train_tiles))
                samples.append(
                    base_sample(
                        store,
                        i,
                        j,
                        np.random.default_rng([seed, step, g]),
                        tile=cfg.tile_size,
                        grid=cfg.grid_size,
                        num_colors=num_colors,
                        mask_ratio=t["mask_ratio"],
                        blur_prob=t["blur_prob"],
                        blur_sigma=t["blur_sigma"],
                        fixed_palette=palette,
                        random_palette_prob=t["random_palette_prob"],
                    )  # fmt: skip
                )
            micro_batches.append(_batch_tensors(samples, device))
        # The step's loss is the mean over every masked pixel of every micro-batch on every rank.
        masked = sum(float(m.sum()) for _, _, m in micro_batches) * pixels_per_patch
        masked = float(all_reduce_sum(torch.tensor([masked], dtype=torch.float64)))
        total_t = torch.zeros((), dtype=torch.float64)
        for images, labels, mask in micro_batches:
            with autocast(device, settings["runtime"]["precision"]):
                pred = model(images, labels, mask)
                count = mask.sum() * pixels_per_patch
                loss_sum = model.loss(pred.float(), labels, mask) * count
            (loss_sum / masked).backward()
            total_t += float(loss_sum.detach())
        all_reduce_grads(params)
        total = float(all_reduce_sum(total_t)) / masked
        optimizer.step()
        row = {"step": step + 1, "loss": total, "lr": lr}
        done = step + 1
        if main and (done % t["val_every"] == 0 or done == t["steps"]):
            miou = validate_base(model, val_store, val_pairs, settings, device)
            row["val_miou"] = miou
            score = miou if miou is not None else -float(total)
            if val_pairs and score > best:
                best = score
                save_torch(best_path, {k: v.detach().cpu() for k, v in model.state_dict().items()})
            log.info("step %d: loss %.4f lr %.2e val mIoU %s", done, total, lr, miou)
        history.append(row)
        bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)
        if main and done % t["checkpoint_every"] == 0 and done < t["steps"]:
            save_torch(
                resume_path,
                {"step": done, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "best": best, "history": history, "settings_digest": digest},
            )  # fmt: skip
    if bar is not None:
        bar.close()
    elapsed = time.time() - t0
    if not main:
        return {"rank": rank, "seconds": elapsed}
    # The final step's weights, loadable like the output model (which is the best by held-out mIoU).
    save_base_model(last_path, model, {"chosen": "last", "steps": t["steps"], "processes": world})
    if val_pairs and best_path.is_file():
        model.load_state_dict(torch.load(best_path, map_location=device, weights_only=True))
        chosen = "best"
    else:
        chosen = "last"
    meta = {"chosen": chosen, "best_val_miou": best if val_pairs else None, "steps": t["steps"], "processes": world}
    if device.type == "cuda":
        meta["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        log.info("GPU peak memory %.0f MiB", meta["gpu_peak_mb"])
    fp = save_base_model(out_model, model.cpu(), meta)
    write_history(out_history, history)
    plot_history(out_plot, history, "base training")
    resume_path.unlink(missing_ok=True)
    log.info("base training done in %.1f s (%s weights, fingerprint %s)", elapsed, chosen, fp)
    return {**meta, "fingerprint": fp, "seconds": elapsed}


# ---------------------------------------------------------------------------------------------------------------
# Prompt training


class SupportCrops:
    """Dense multi-scale crops of a class's support tiles, at the working size."""

    def __init__(self, tiles: Sequence[dict], settings: dict, only_positive: bool):
        size = settings["working_size"]
        self.images, self.masks = [], []
        for tile in tiles:
            self.images.append(resize_image(read_image(tile["image"]), size))
            self.masks.append(resize_nearest(read_label(tile["label"]), size) > 0)
        windows = crop_windows(size, settings["crop_size"], settings["max_crop_size"], settings["stride"])
        self.items = []
        for t_idx, mask in enumerate(self.masks):
            integral = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
            for y, x, s in windows:
                inside = integral[y + s, x + s] - integral[y, x + s] - integral[y + s, x] + integral[y, x]
                if inside > 0 or not only_positive:
                    self.items.append((t_idx, y, x, s))

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, k: int, rng: np.random.Generator, tile: tuple[int, int], settings: dict):
        t_idx, y, x, s = self.items[k]
        image = self.images[t_idx][y : y + s, x : x + s]
        mask = self.masks[t_idx][y : y + s, x : x + s].astype(np.uint8)
        image = resize_nearest(image, tile)
        mask = resize_nearest(mask, tile)
        image, mask = flip([image, mask], bool(rng.random() < 0.5), bool(rng.random() < 0.5))
        factor = rng.uniform(*settings["brightness"])
        image = np.clip(image.astype(np.float32) * factor, 0, 255).astype(np.uint8)
        if rng.random() < settings["blur_prob"]:
            image = blur(image, float(rng.uniform(0.1, 1.0)))
        return image, mask


def _tiles_iou(
    model: SegGPT, prompt: LearnablePrompt, tiles: Sequence[dict], settings: dict, device, precision: str
) -> float | None:
    """IoU of the class on held-out support tiles, cut into non-overlapping crops of the largest crop size."""
    if not tiles:
        return None
    size = settings["working_size"]
    side = settings["crop_size"]
    while side * 2 <= settings["max_crop_size"]:
        side *= 2
    cm = ConfusionMatrix(2)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for tile in tiles:
            image = resize_image(read_image(tile["image"]), size)
            truth = (resize_nearest(read_label(tile["label"]), size) > 0).astype(np.uint8)
            for y in range(0, size - side + 1, side):
                for x in range(0, size - side + 1, side):
                    crop = resize_image(image[y : y + side, x : x + side], model.config.tile_size)
                    with autocast(device, precision):
                        pred = prompt(model, to_tensor(crop).to(device))
                    ids = decode_canvas(pred, BINARY_PALETTE)[0][model.config.tile_size[0] :]
                    cm.update(resize_nearest(ids, (side, side)), truth[y : y + side, x : x + side])
    model.train(was_training)
    return float(cm.iou()[1]) if not np.isnan(cm.iou()[1]) else 0.0


def train_prompt(
    base_model_path: str | os.PathLike,
    support_tiles: Sequence[dict],
    out_prompt: str | os.PathLike,
    out_history: str | os.PathLike,
    checkpoint_dir: str | os.PathLike,
    settings: dict,
    phase: int,
    init_prompt: str | os.PathLike | None = None,
    progress_stream=None,
) -> dict:
    """Learn (phase 1) or refine (phase 2) one novel class's prompt against the frozen base model."""
    from fewseg.checkpoints import load_base_model, load_prompt

    t = settings["training"]
    ph = t[f"phase{phase}"]
    seed = settings["seed"] + 1000 * settings["cls"] + phase
    device = pick_device(settings["runtime"]["device"])
    precision = settings["runtime"]["precision"]
    model, meta = load_base_model(base_model_path)
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()  # frozen, but drop-path stays active as in the published system
    cfg = model.config
    support_tiles = sorted(support_tiles, key=lambda x: x["stem"])
    holdout = min(t["holdout"], len(support_tiles) - 1)
    order = np.random.default_rng([settings["seed"], settings["cls"]]).permutation(len(support_tiles))
    held = [support_tiles[i] for i in sorted(order[:holdout])]
    fit = [support_tiles[i] for i in sorted(order[holdout:])]
    crops = SupportCrops(fit, t, only_positive=(phase == 1))
    if len(crops) == 0:
        raise ValueError(f"class {settings['cls']}: no support crop contains the class")
    gen = torch.Generator().manual_seed(seed)
    prompt = LearnablePrompt(cfg.tile_size, t["init_std"], generator=gen)
    if init_prompt is not None:
        init = load_prompt(init_prompt, meta["fingerprint"])
        with torch.no_grad():
            prompt.prompt_image.copy_(init["prompt_image"])
            prompt.prompt_label.copy_(init["prompt_label"])
    prompt.to(device)
    optimizer = torch.optim.AdamW(prompt.parameters(), lr=ph["lr"], weight_decay=t["weight_decay"])
    schedule = {"peak": ph["lr"], "min_lr": 0.0, "warmup": 0, "first_cycle": t["cycle_steps"], "decay": t["peak_decay"]}
    ckpt_dir = Path(checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    resume_path = ckpt_dir / f"phase{phase}_resume.pt"
    digest = settings_digest(settings, f"{phase}{meta['fingerprint']}{[x['stem'] for x in support_tiles]}")
    history: list[dict] = []
    start, best, best_state = 0, -math.inf, None
    state = load_resume(resume_path, digest)
    if state is not None:
        prompt.load_state_dict(state["prompt"])
        optimizer.load_state_dict(state["optimizer"])
        start, best, best_state, history = state["step"], state["best"], state["best_state"], state["history"]
        log.info("resuming class %d phase %d at step %d", settings["cls"], phase, start)
    log.info(
        "class %d (%s) phase %d: %d crops from %d tiles, %d held out; %d steps, lr %g",
        settings["cls"], settings["name"], phase, len(crops), len(fit), len(held), ph["steps"], ph["lr"],
    )  # fmt: skip
    bar = _progress(ph["steps"], start, f"class {settings['cls']} phase {phase}", progress_stream)
    for step in range(start, ph["steps"]):
        lr = lr_at(step, **schedule)
        set_lr(optimizer, lr)
        torch.manual_seed(step_seed(seed, step))
        rng = np.random.default_rng([seed, step])
        picks = rng.integers(0, len(crops), size=t["batch_size"])
        batch = [crops.sample(int(k), rng, cfg.tile_size, t) for k in picks]
        query = to_tensor(np.stack([b[0] for b in batch])).to(device)
        target = to_tensor(BINARY_PALETTE[np.stack([b[1] for b in batch])]).to(device)
        with autocast(device, precision):
            pred = prompt(model, query)
        images, labels = prompt.canvases(query, target)
        mask = torch.from_numpy(query_half_patches(cfg.grid_size))[None].to(device)
        loss = model.loss(pred.float(), labels.detach(), mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        row = {"step": done, "loss": float(loss.detach()), "lr": lr}
        if held and (done % t["val_every"] == 0 or done == ph["steps"]):
            iou = _tiles_iou(model, prompt, held, t, device, precision)
            row["val_miou"] = iou
            if iou > best:
                best, best_state = iou, {k: v.detach().cpu().clone() for k, v in prompt.state_dict().items()}
            log.info("class %d phase %d step %d: loss %.4f held-out IoU %.4f", settings["cls"], phase, done, loss, iou)
        history.append(row)
        bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)
        if done % t["checkpoint_every"] == 0 and done < ph["steps"]:
            save_torch(
                resume_path,
                {"step": done, "prompt": prompt.state_dict(), "optimizer": optimizer.state_dict(), "best": best,
                 "best_state": best_state, "history": history, "settings_digest": digest},
            )  # fmt: skip
    bar.close()
    if best_state is not None:
        prompt.load_state_dict(best_state)
    save_prompt(
        out_prompt, prompt.prompt_image, prompt.prompt_label, cls=settings["cls"], name=settings["name"],
        base_fingerprint=meta["fingerprint"], tile_size=cfg.tile_size,
        meta={"phase": phase, "held_out": [x["stem"] for x in held], "best_held_out_iou": best if held else None},
    )  # fmt: skip
    write_history(out_history, history)
    resume_path.unlink(missing_ok=True)
    return {"best_held_out_iou": best if held else None, "crops": len(crops)}
