"""In-context pretraining: teach a SegGPT preset to segment whatever its prompt pair shows, in its colours.

BAAI pretrained SegGPT on many datasets with random colourings, so the model cannot map an appearance to a label
colour by heart and must read the mapping off the prompt. Here the data are synthetic scenes drawn on the fly from
an endless space of classes (a random texture, colour pair and shape kind each: regions, blobs, rectangles,
outlines, lines), painted with a fresh random palette on every sample; both halves of a canvas show the same
classes in the same appearance and colours. Pairs follow method section 5: when both halves hold the same class set
the query half is masked, otherwise a random share of all patches (``mask_ratio``).

Every sample draws from its own (seed, step, index) stream and the held-out episodes from a separate stream, so a
run is reproducible, resumes exactly from a checkpoint and is never validated on classes or palettes it trained on.
The output is a fewseg base-model file (:func:`fewseg.checkpoints.load_base_model`) that also carries the Painter
``model`` key, so ``model.weights`` and :func:`fewseg.weights.load_pretrained` accept it too.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fewseg.checkpoints import BASE_FORMAT, FORMAT_VERSION, load_resume, save_torch
from fewseg.data import blur, mark_one_class, pair_canvas, query_half_patches, resize_image, resize_nearest
from fewseg.demo import _noise
from fewseg.errors import ConfigError
from fewseg.metrics import ConfusionMatrix
from fewseg.model import SegGPT, build_model, fingerprint
from fewseg.optim import adamw
from fewseg.palette import BINARY_PALETTE, decode_canvas, random_palette
from fewseg.runtime import autocast, pick_device
from fewseg.schedule import lr_at, set_lr
from fewseg.train import (
    _batch_tensors,
    _progress,
    plot_history,
    settings_digest,
    step_seed,
    write_history,
)

log = logging.getLogger("fewseg.pretrain")

SHAPES = ("region", "blob", "rect", "outline", "line")
PATTERNS = ("flat", "stripes", "checker", "dots", "noise")
# First entries of the seed key, so the training and held-out streams can never draw the same sample.
TRAIN_STREAM, VAL_STREAM = 0, 1


# ---------------------------------------------------------------------------------------------------------------
# Synthetic classes and scenes


@dataclass(frozen=True)
class SyntheticClass:
    """The look of one class in one episode: where it lies (shape) and how its pixels look (pattern, colours)."""

    shape: str
    pattern: str
    colors: np.ndarray  # (2, 3) float RGB: the pattern blends from the first to the second
    period: float  # pattern scale, in working-size pixels
    angle: float
    noise: float  # per-pixel noise amplitude
    size: float  # object size as a share of the scene side


def draw_classes(num_classes: int, rng: np.random.Generator) -> list[SyntheticClass]:
    """``num_classes`` fresh classes; the first fills the scene (a region class), the others take any shape."""
    base = random_palette(num_classes, rng, min_distance=40.0).astype(np.float32)
    classes = []
    for k in range(num_classes):
        second = np.clip(base[k] + rng.normal(0.0, 60.0, 3), 0, 255)
        classes.append(
            SyntheticClass(
                shape="region" if k == 0 else SHAPES[int(rng.integers(len(SHAPES)))],
                pattern=PATTERNS[int(rng.integers(len(PATTERNS)))],
                colors=np.stack([base[k], second]).astype(np.float32),
                period=float(rng.uniform(3.0, 16.0)),
                angle=float(rng.uniform(0.0, math.pi)),
                noise=float(rng.uniform(2.0, 18.0)),
                size=float(rng.uniform(0.08, 0.22)),
            )
        )
    return classes


def _texture(cls: SyntheticClass, yy: np.ndarray, xx: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """(N, 3) float pixels of ``cls`` at pixel coordinates (yy, xx) of a ``size`` scene, at a random phase."""
    oy, ox = rng.uniform(0, cls.period * 4, 2)
    c, s = math.cos(cls.angle), math.sin(cls.angle)
    u, v = (xx + ox) * c + (yy + oy) * s, -(xx + ox) * s + (yy + oy) * c
    if cls.pattern == "stripes":
        t = (np.sin(2 * np.pi * u / cls.period) > 0).astype(np.float32)
    elif cls.pattern == "checker":
        t = ((np.floor(u / cls.period) + np.floor(v / cls.period)) % 2).astype(np.float32)
    elif cls.pattern == "dots":
        du = (u % cls.period) - cls.period / 2
        dv = (v % cls.period) - cls.period / 2
        t = (du * du + dv * dv < (cls.period * 0.3) ** 2).astype(np.float32)
    elif cls.pattern == "noise":
        t = 1.0 / (1.0 + np.exp(-2.0 * _noise(rng, size, size, cls.period)[yy, xx]))
    else:
        t = np.zeros(len(yy), dtype=np.float32)
    rgb = cls.colors[0] * (1 - t[:, None]) + cls.colors[1] * t[:, None]
    return rgb + cls.noise * rng.standard_normal((len(yy), 3), dtype=np.float32)


def _object_mask(cls: SyntheticClass, size: int, rng: np.random.Generator) -> np.ndarray:
    """Footprint of one instance of an object class."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cy, cx = rng.uniform(0.1, 0.9, 2) * size
    angle = float(rng.uniform(0, math.pi))
    c, s = math.cos(angle), math.sin(angle)
    u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
    a = cls.size * size * float(rng.uniform(0.7, 1.3))
    b = a * float(rng.uniform(0.4, 1.0))
    if cls.shape == "line":
        return np.abs(v) <= max(2.0, 0.25 * b)
    if cls.shape == "rect":
        return (np.abs(u) <= a) & (np.abs(v) <= b)
    radius = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    if cls.shape == "outline":
        return np.abs(radius - 1.0) * b <= max(2.0, 0.12 * b)
    return radius <= 1.0  # blob


def draw_layout(classes: Sequence[SyntheticClass], present: Sequence[int], size: int, rng) -> np.ndarray:
    """(size, size) class ids: warped Voronoi cells of the region classes, object classes drawn on top."""
    regions = [k for k in present if classes[k].shape == "region"]
    objects = [k for k in present if classes[k].shape != "region"]
    cells = regions + [regions[int(i)] for i in rng.integers(0, len(regions), int(rng.integers(1, 4)))]
    seeds = rng.uniform(0, size, (len(cells), 2)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    warp = size / 10.0
    wy = yy + warp * _noise(rng, size, size, size / 3.0)
    wx = xx + warp * _noise(rng, size, size, size / 3.0)
    dist = (wy[None] - seeds[:, 0, None, None]) ** 2 + (wx[None] - seeds[:, 1, None, None]) ** 2
    ids = np.asarray(cells, dtype=np.uint8)[dist.argmin(0)]
    for k in rng.permutation(objects).tolist():
        for _ in range(int(rng.integers(1, 4))):
            ids[_object_mask(classes[k], size, rng)] = k
    return ids


def _render(classes: Sequence[SyntheticClass], ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = ids.shape[0]
    image = np.zeros((size, size, 3), dtype=np.float32)
    for k in np.unique(ids).tolist():
        yy, xx = np.nonzero(ids == k)
        image[yy, xx] = _texture(classes[k], yy, xx, size, rng)
    shade = 1.0 + 0.08 * _noise(rng, size, size, size / 2.0)  # soft illumination over the whole half
    return np.clip(image * shade[..., None], 0, 255).astype(np.uint8)


def curriculum_classes(step: int, settings: dict) -> int:
    """Most classes a scene may hold at ``step``: grows from the range's low end to its high end."""
    low, high = settings["classes"]
    ramp = settings["curriculum_steps"]
    if ramp <= 0 or step >= ramp:
        return high
    return low + int(round((high - low) * step / ramp))


def episode(
    rng: np.random.Generator,
    num_classes: int,
    settings: dict,
    tile: tuple[int, int],
    grid: tuple[int, int],
    same_context: bool | None = None,
    augment: bool = True,
    binary: bool | None = None,
) -> dict:
    """One training canvas (the keys of :func:`fewseg.data.base_sample`), drawn entirely from ``rng``.

    Same-context pairs show every class of the episode in both halves; mixed pairs show a random subset in each.
    As in base training, equal class sets get the query half masked and any other pair a random share of patches.
    A binary episode marks one class present in both halves (an object or region class other than the scene's
    filler where there is one) white on black, so its query half is always the masked one.
    """
    size = settings["working_size"]
    if same_context is None:
        same_context = bool(rng.random() < settings["same_context_share"])
    if binary is None:  # no draw at binary_prob 0: recipes from before the setting keep their exact streams
        share = settings.get("binary_prob", 0.0)
        binary = bool(share > 0 and rng.random() < share)
    classes = draw_classes(num_classes, rng)
    palette = random_palette(num_classes, rng)
    halves = []
    for _ in range(2):
        if same_context:
            present = list(range(num_classes))
        else:
            present = [0] + [k for k in range(1, num_classes) if rng.random() < 0.6]
        ids = draw_layout(classes, present, size, rng)
        image = _render(classes, ids, rng)
        image, ids = resize_image(image, tile), resize_nearest(ids, tile)
        if augment and rng.random() < settings["blur_prob"]:
            image = blur(image, float(rng.uniform(*settings["blur_sigma"])))
        halves.append((image, ids))
    if binary:  # class 0 fills every scene, so both halves always share a class
        (image_a, ids_a), (image_b, ids_b) = halves
        ids_a, ids_b = mark_one_class(ids_a, ids_b, rng, skip_zero=True)
        halves, palette = [(image_a, ids_a), (image_b, ids_b)], BINARY_PALETTE
    return pair_canvas(halves[0], halves[1], palette, grid, settings["mask_ratio"], rng)


def training_sample(settings: dict, step: int, index: int, tile: tuple[int, int], grid: tuple[int, int]) -> dict:
    """Sample ``index`` of ``step``: its own stream, its class count from the curriculum."""
    seed = settings["seed"]
    rng = np.random.default_rng([seed, TRAIN_STREAM, step, index])
    low = settings["classes"][0]
    num_classes = int(rng.integers(low, curriculum_classes(step, settings) + 1))
    return episode(rng, num_classes, settings, tile, grid)


def validation_episodes(
    settings: dict, tile: tuple[int, int], grid: tuple[int, int], binary: bool = False
) -> list[dict]:
    """The fixed held-out episodes: same-context pairs over the whole class range, from their own stream;
    ``binary``: the binary episodes, one class marked (a stream of their own again)."""
    low, high = settings["classes"]
    out = []
    for i in range(settings["val_episodes"]):
        rng = np.random.default_rng([settings["seed"], VAL_STREAM, int(binary), i])
        num_classes = int(rng.integers(low, high + 1))
        sample = episode(rng, num_classes, settings, tile, grid, same_context=True, augment=False, binary=binary)
        sample["mask"] = query_half_patches(grid)
        out.append(sample)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Training


@torch.no_grad()
def validate(
    model: SegGPT, episodes: Sequence[dict], batch_size: int, device, precision: str, marked_only: bool = False
) -> float | None:
    """Mean over episodes of the query half's mIoU, predicted from the prompt alone and decoded with its palette;
    ``marked_only``: the IoU of class 1 alone (binary episodes, where the black rest is not what is asked)."""
    if not episodes:
        return None
    was_training = model.training
    model.eval()
    h = model.config.tile_size[0]
    scores = []
    for start in range(0, len(episodes), batch_size):
        chunk = episodes[start : start + batch_size]
        images, labels, mask = _batch_tensors(chunk, device)
        with autocast(device, precision):
            pred = model(images, labels, mask)
        for sample, pred_one in zip(chunk, pred, strict=True):
            ids = decode_canvas(pred_one[None], sample["palette"])[0]
            cm = ConfusionMatrix(len(sample["palette"]))
            cm.update(ids[h:], sample["ids"][h:])
            iou = cm.iou()[1:2] if marked_only else cm.iou()
            scores.append(float(np.nanmean(iou)) if not np.isnan(iou).all() else 0.0)
    model.train(was_training)
    return float(np.mean(scores))


def prompt_blind_baseline(episodes: Sequence[dict], tile_height: int, marked_only: bool = False) -> float | None:
    """The same mIoU for painting the prompt's most common class over the whole query: the floor to beat;
    ``marked_only``: the marked class's IoU when the whole query is marked (its share of the query)."""
    if not episodes:
        return None
    scores = []
    for sample in episodes:
        prompt, query = sample["ids"][:tile_height], sample["ids"][tile_height:]
        if marked_only:
            scores.append(float((query == 1).mean()))
            continue
        cm = ConfusionMatrix(len(sample["palette"]))
        cm.update(np.full_like(query, np.bincount(prompt.ravel()).argmax()), query)
        scores.append(float(np.nanmean(cm.iou())))
    return float(np.mean(scores))


def check_settings(settings: dict) -> None:
    """What the schema cannot say: ranges that must be ordered, and a run longer than its warm-up."""
    p = settings["pretraining"]
    low, high = p["classes"]
    if not 2 <= low <= high:
        raise ConfigError(f"pretraining/classes: [{low}, {high}] must be an increasing range from 2 up")
    if p["warmup_steps"] >= p["steps"]:
        raise ConfigError(f"pretraining/warmup_steps {p['warmup_steps']} must be below pretraining/steps {p['steps']}")


def save_pretrained(path: str | os.PathLike, model: SegGPT, meta: dict, fp16: bool = False) -> str:
    """A base-model file that ``load_base_model`` reads, with the Painter ``model`` key ``load_pretrained`` reads.

    Both keys hold the same tensors, which ``torch.save`` stores once. ``fp16`` halves the file; the fingerprint is
    that of the stored values, so a model loaded from the file matches it.
    """
    dtype = torch.float16 if fp16 else torch.float32
    state = {}
    for name, value in model.state_dict().items():
        value = value.detach().cpu()
        state[name] = value.to(dtype) if value.is_floating_point() else value
    fp = fingerprint(state)
    save_torch(
        path,
        {"format": BASE_FORMAT, "version": FORMAT_VERSION, "config": model.config.to_dict(), "state_dict": state,
         "model": state, "fingerprint": fp, "meta": {**meta, "dtype": str(dtype).removeprefix("torch.")}},
    )  # fmt: skip
    return fp


def pretrain(
    out_model: str | os.PathLike,
    out_history: str | os.PathLike,
    out_plot: str | os.PathLike,
    checkpoint_dir: str | os.PathLike,
    settings: dict,
    progress_stream=None,
    stop_after: int | None = None,
) -> dict:
    """Pretrain ``pretraining/preset`` in-context from scratch, or continue from ``pretraining/start_from``; writes
    the last weights, history CSV and plot.

    ``stop_after`` ends this call after that many steps in all, with a checkpoint instead of outputs, as a job
    stopped by a time limit would; the next call with the same settings resumes there and finishes.
    """
    check_settings(settings)
    p = settings["pretraining"]
    seed = p["seed"]
    precision = settings["runtime"]["precision"]
    device = pick_device(settings["runtime"]["device"])
    torch.manual_seed(seed)
    if p.get("start_from"):
        from fewseg.weights import load_pretrained

        model = load_pretrained(p["start_from"], **(p.get("overrides") or {})).to(device)
        log.info("continuing from %s (fingerprint %s)", p["start_from"], fingerprint(model))
    else:
        model = build_model(p["preset"], **(p.get("overrides") or {})).to(device)
    cfg = model.config
    if p["working_size"] < max(cfg.tile_size):
        raise ConfigError(f"pretraining/working_size {p['working_size']} is below the model tile {cfg.tile_size}")
    no_decay_names = model.no_weight_decay()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 or name in no_decay_names else decay).append(param)
    optimizer = adamw(
        [{"params": decay, "weight_decay": p["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        device, lr=p["min_lr"], betas=tuple(p["betas"]),
    )  # fmt: skip
    schedule = {"peak": p["lr"], "min_lr": p["min_lr"], "warmup": p["warmup_steps"], "first_cycle": p["steps"]}
    ckpt_dir = Path(checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    resume_path = ckpt_dir / "resume.pt"
    digest = settings_digest(settings, "pretrain")
    history: list[dict] = []
    start, best = 0, None
    state = load_resume(resume_path, digest)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, best, history = state["step"], state["best"], state["history"]
        log.info("resuming pretraining at step %d of %d", start, p["steps"])
    val_set = validation_episodes(p, cfg.tile_size, cfg.grid_size)
    baseline = prompt_blind_baseline(val_set, cfg.tile_size[0])
    binary_set = validation_episodes(p, cfg.tile_size, cfg.grid_size, binary=True) if p["binary_prob"] > 0 else []
    binary_baseline = prompt_blind_baseline(binary_set, cfg.tile_size[0], marked_only=True)
    log.info(
        "in-context pretraining of %s: %d steps of %d synthetic episodes, %d to %d classes a scene "
        "(curriculum over %d steps), %d held-out episodes (mIoU of painting the prompt's main class: %s); "
        "%d parameters on %s",
        p["preset"], p["steps"], p["batch_size"], *p["classes"], p["curriculum_steps"], len(val_set), baseline,
        sum(x.numel() for x in model.parameters()), device,
    )  # fmt: skip
    if binary_set:
        log.info(
            "%.0f%% of episodes mark one class white on black; %d held-out binary episodes (IoU of marking the whole "
            "query: %.3f)", 100 * p["binary_prob"], len(binary_set), binary_baseline,
        )  # fmt: skip

    def checkpoint(done: int) -> None:
        save_torch(
            resume_path,
            {"step": done, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "best": best,
             "history": history, "settings_digest": digest},
        )  # fmt: skip

    model.train()
    end = p["steps"] if stop_after is None else min(p["steps"], stop_after)
    bar = _progress(p["steps"], start, "pretraining", progress_stream)
    t0 = time.time()
    for step in range(start, end):
        lr = lr_at(step, **schedule)
        set_lr(optimizer, lr)
        torch.manual_seed(step_seed(seed, step))  # drop-path draws
        samples = [training_sample(p, step, b, cfg.tile_size, cfg.grid_size) for b in range(p["batch_size"])]
        images, labels, mask = _batch_tensors(samples, device)
        with autocast(device, precision):
            pred = model(images, labels, mask)
        loss = model.loss(pred.float(), labels, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if p["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), p["grad_clip"])
        optimizer.step()
        done = step + 1
        row = {"step": done, "loss": float(loss.detach()), "lr": lr, "classes": curriculum_classes(step, p)}
        if not math.isfinite(row["loss"]):
            raise ConfigError(f"pretraining diverged at step {done} (loss {row['loss']}): lower pretraining/lr")
        if done % p["val_every"] == 0 or done == p["steps"]:
            miou = validate(model, val_set, p["batch_size"], device, precision)
            row["val_miou"] = miou
            if miou is not None and (best is None or miou > best["val_miou"]):
                best = {"step": done, "val_miou": miou}
            if binary_set:
                row["val_binary_iou"] = validate(model, binary_set, p["batch_size"], device, precision, True)
            log.info(
                "step %d: loss %.4f lr %.2e held-out mIoU %s%s", done, row["loss"], lr, miou,
                f", binary IoU {row['val_binary_iou']:.4f}" if binary_set else "",
            )  # fmt: skip
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)
        if done < p["steps"] and (done % p["checkpoint_every"] == 0 or done == end):
            checkpoint(done)
    bar.close()
    elapsed = time.time() - t0
    if end < p["steps"]:
        log.info("pretraining stopped at step %d of %d; rerun to resume", end, p["steps"])
        return {"stopped_at": end, "seconds": elapsed}
    final = history[-1].get("val_miou") if history else None
    meta = {
        "source": "in-context pretraining", "start_from": p.get("start_from"), "steps": p["steps"],
        "final_val_miou": final, "best": best,
        "val_baseline_miou": baseline, "binary_prob": p["binary_prob"],
        "final_val_binary_iou": history[-1].get("val_binary_iou") if history else None,
    }  # fmt: skip
    fp = save_pretrained(out_model, model.cpu(), meta, fp16=p["fp16"])
    write_history(out_history, history)
    plot_history(out_plot, history, f"in-context pretraining ({p['preset']})")
    resume_path.unlink(missing_ok=True)
    log.info("pretraining done in %.1f s: held-out mIoU %s, fingerprint %s", elapsed, final, fp)
    return {**meta, "fingerprint": fp, "seconds": elapsed}


def pretrain_stage(input, output, params, progress=None) -> None:
    """The workflow's ``pretrain`` rule (see :func:`fewseg.stages.run_stage`)."""
    get = params.get if isinstance(params, dict) else params.__getattribute__
    settings = get("settings")
    start = getattr(input, "start", None)
    if start:  # the file the workflow found (the working directory first, then the workflow's folder)
        settings = {**settings, "pretraining": {**settings["pretraining"], "start_from": str(start)}}
    result = pretrain(
        output.model, output.history, output.plot, get("checkpoint_dir"), settings, progress_stream=progress
    )
    log.info("pretrained model: %s", result)
