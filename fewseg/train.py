"""Base fine-tuning (method section 5) and two-phase prompt learning (method section 6).

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
from dataclasses import dataclass, field, fields
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
from fewseg.optim import Optimizer, adamw
from fewseg.palette import BINARY_PALETTE, as_palette, decode_canvas, to_tensor
from fewseg.prompt import (
    LearnablePrompt,
    crop_windows,
    largest_crop,
    load_support,
    select_support_pair,
    support_iou,
)
from fewseg.runtime import autocast, freeze_for_precision, pick_device
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
        axes[2].plot(*zip(*val, strict=True), marker="o", label="mIoU")
    binary = [(r["step"], r["val_binary_iou"]) for r in rows if r.get("val_binary_iou") not in (None, "")]
    if binary:  # pretraining's binary episodes: the marked class's IoU
        axes[2].plot(*zip(*binary, strict=True), marker="s", label="binary IoU")
        axes[2].legend()
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


def _training_fields(cls: type, training: dict, given: dict) -> dict:
    """The fields of a settings class that come straight from its ``training`` section; lists become tuples."""
    names = [f.name for f in fields(cls) if f.name not in given and f.name != "source"]
    return {n: tuple(training[n]) if isinstance(training[n], list) else training[n] for n in names}


def _missing_setting(where: str, err: KeyError) -> ValueError:
    return ValueError(f"{where} settings lack {err.args[0]!r} (build them with fewseg.config)")


# ---------------------------------------------------------------------------------------------------------------
# Base training


@dataclass(frozen=True)
class BaseTrainingSettings:
    """What base training reads, named and typed: the slice of :func:`fewseg.config.base_training_settings`.

    The workflow hands the slice over as a plain dict (a Snakemake param); ``source`` keeps it as given, because its
    digest decides whether a checkpoint left by a killed run belongs to this run.
    """

    seed: int
    device: str
    precision: str
    model: dict  # preset, weights and overrides, as build_base_model reads them
    palette: tuple[tuple[int, int, int], ...]
    base_ids: tuple[int, ...]
    steps: int
    batch_size: int
    grad_accum: int
    lr: float
    min_lr: float
    warmup_steps: int
    first_cycle_steps: int
    cycle_mult: float
    peak_decay: float
    weight_decay: float
    betas: tuple[float, float]
    working_size: int
    mask_ratio: float
    random_palette_prob: float
    binary_prob: float
    blur_prob: float
    blur_sigma: tuple[float, float]
    val_tiles: float
    val_pairs: int
    val_every: int
    checkpoint_every: int
    cache_tiles: int
    source: dict = field(repr=False, compare=False)

    @classmethod
    def from_slice(cls, settings: dict) -> BaseTrainingSettings:
        """From the dict the workflow passes; a missing key is a ValueError naming it."""
        try:
            given = {
                "seed": settings["seed"],
                "device": settings["runtime"]["device"],
                "precision": settings["runtime"]["precision"],
                "model": settings["model"],
                "palette": tuple(tuple(c) for c in settings["palette"]),
                "base_ids": tuple(settings["base"]),
            }
            return cls(**given, **_training_fields(cls, settings["training"], given), source=settings)
        except KeyError as err:
            raise _missing_setting("base-training", err) from None

    @property
    def num_colors(self) -> int:
        """Colours a canvas is painted with: every class id up to the largest base class."""
        return max(self.base_ids) + 1

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def schedule(self) -> dict:
        """Keyword arguments of :func:`fewseg.schedule.lr_at`."""
        return {
            "peak": self.lr, "min_lr": self.min_lr, "warmup": self.warmup_steps, "first_cycle": self.first_cycle_steps,
            "cycle_mult": self.cycle_mult, "decay": self.peak_decay,
        }  # fmt: skip


def split_tiles(tiles: Sequence[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out whole tiles for validation (never crops of a train tile)."""
    n_val = int(round(len(tiles) * val_fraction))
    if n_val and len(tiles) - n_val < 2:
        n_val = max(0, len(tiles) - 2)
    order = np.random.default_rng([seed, 17]).permutation(len(tiles))
    val_ids = set(order[:n_val].tolist())
    return [t for i, t in enumerate(tiles) if i not in val_ids], [t for i, t in enumerate(tiles) if i in val_ids]


def validation_pairs(n_tiles: int, count: int, seed: int) -> list[tuple[int, int, int]]:
    """``count`` (first tile, second tile, sample seed) triples over the held-out tiles, fixed for the whole run."""
    rng = np.random.default_rng([seed, 23])
    pairs = []
    if n_tiles >= 2:
        for _ in range(count):
            a, b = rng.choice(n_tiles, size=2, replace=False)
            pairs.append((int(a), int(b), int(rng.integers(2**31))))
    return pairs


def _batch_tensors(samples: Sequence[dict], device: torch.device) -> tuple[torch.Tensor, ...]:
    images = to_tensor(np.stack([s["image"] for s in samples])).to(device)
    labels = to_tensor(np.stack([s["label"] for s in samples])).to(device)
    mask = torch.from_numpy(np.stack([s["mask"] for s in samples])).to(device)
    return images, labels, mask


@torch.no_grad()
def validate_base(
    model: SegGPT,
    store: TileStore,
    pairs: Sequence[tuple[int, int, int]],
    settings: BaseTrainingSettings,
    device: torch.device,
) -> float | None:
    """mIoU of the base classes over the query half of held-out pairs.

    The pairs are painted with the configured palette, as inference paints its prompts, so the figure predicts the
    base metric (the published system validated with random palettes, which base inference never uses).
    """
    if not pairs:
        return None
    was_training = model.training
    model.eval()
    cfg = model.config
    num_colors = settings.num_colors
    cm = ConfusionMatrix(num_colors)
    h = cfg.tile_size[0]
    # A training batch of pairs per forward, and only the query half decoded (the same figure, a fifth less time).
    for start in range(0, len(pairs), settings.batch_size):
        samples = []
        for first, second, seed in pairs[start : start + settings.batch_size]:
            sample = base_sample(
                store, first, second, np.random.default_rng(seed), tile=cfg.tile_size, grid=cfg.grid_size,
                num_colors=num_colors, mask_ratio=1.0, blur_prob=0.0, blur_sigma=(0.1, 0.1),
                fixed_palette=store.palette, random_palette_prob=0.0,
            )  # fmt: skip
            sample["mask"] = query_half_patches(cfg.grid_size)
            samples.append(sample)
        images, labels, mask = _batch_tensors(samples, device)
        with autocast(device, settings.precision):
            pred = model(images, labels, mask, query_only=True)
        for k, sample in enumerate(samples):
            cm.update(decode_canvas(pred[k : k + 1], sample["palette"])[0], sample["ids"][h:])
    model.train(was_training)
    iou = cm.iou()
    vals = [iou[c] for c in settings.base_ids if not np.isnan(iou[c])]
    return float(np.mean(vals)) if vals else None


@dataclass
class _BaseRun:
    """One base-training run: the model and optimizer, its data, and what its checkpoints carry between steps."""

    settings: BaseTrainingSettings
    model: SegGPT
    optimizer: Optimizer
    store: TileStore
    val_store: TileStore
    val_pairs: list[tuple[int, int, int]]
    device: torch.device
    rank: int
    world: int
    checkpoint_dir: Path
    digest: str
    start: int = 0
    best: float = -math.inf
    history: list[dict] = field(default_factory=list)

    @property
    def main(self) -> bool:
        """Rank 0 validates and writes every file."""
        return self.rank == 0

    @property
    def pairs(self) -> int:
        return num_pairs(len(self.store))

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.pairs / self.settings.samples_per_step))

    @property
    def resume_path(self) -> Path:
        return self.checkpoint_dir / "resume.pt"

    @property
    def best_path(self) -> Path:
        return self.checkpoint_dir / "best.pt"

    @property
    def last_path(self) -> Path:
        return self.checkpoint_dir / "last.pt"


def _base_device(device: str, world: int) -> torch.device:
    """The configured device; under several CUDA processes, the GPU this rank was given."""
    chosen = pick_device(device)
    if chosen.type == "cuda" and world > 1:
        chosen = torch.device("cuda", torch.cuda.current_device())
    return chosen


def _base_optimizer(model: SegGPT, s: BaseTrainingSettings, device: torch.device) -> Optimizer:
    """AdamW without weight decay on norms, biases, tokens and position tables."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or "token" in name or "pos_embed" in name or "rel_pos" in name else decay).append(p)
    return adamw(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        device, lr=s.min_lr, betas=s.betas,
    )  # fmt: skip


def _setup_base(tiles: Sequence[dict], s: BaseTrainingSettings, checkpoint_dir: str | os.PathLike) -> _BaseRun:
    """Build the model (seeded), split the tiles, and resume from the checkpoint a killed run left, if any."""
    from fewseg.collectives import rank_and_world

    rank, world = rank_and_world()
    if s.batch_size % world:
        raise ValueError(f"base_training/batch_size {s.batch_size} does not split over {world} processes")
    device = _base_device(s.device, world)
    palette = as_palette(s.palette)
    torch.manual_seed(s.seed)
    model = build_base_model(s.model).to(device)
    cfg = model.config
    train_tiles, val_tiles = split_tiles(tiles, s.val_tiles, s.seed)
    if len(train_tiles) < 2:
        raise ValueError(f"base training needs at least 2 train tiles, {len(train_tiles)} left after the split")
    if s.working_size < max(cfg.tile_size):
        raise ValueError(f"base_training/working_size {s.working_size} is below the model tile {cfg.tile_size}")
    ckpt_dir = Path(checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    run = _BaseRun(
        settings=s,
        model=model,
        optimizer=_base_optimizer(model, s, device),
        store=TileStore(train_tiles, s.working_size, palette, s.cache_tiles),
        val_store=TileStore(val_tiles, s.working_size, palette, s.cache_tiles),
        val_pairs=validation_pairs(len(val_tiles), s.val_pairs, s.seed),
        device=device,
        rank=rank,
        world=world,
        checkpoint_dir=ckpt_dir,
        digest=settings_digest(s.source, str([x["stem"] for x in tiles])),
    )
    state = load_resume(run.resume_path, run.digest)
    if state is not None:
        model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.start, run.best, run.history = state["step"], state["best"], state["history"]
        log.info("resuming base training at step %d of %d", run.start, s.steps)
    model.train()
    log.info(
        "base training: %d train tiles (%d pairs), %d held out; %d steps of %d samples; %s on %s x %d; %d parameters",
        len(train_tiles), run.pairs, len(val_tiles), s.steps, s.samples_per_step, cfg, device, world,
        sum(p.numel() for p in model.parameters()),
    )  # fmt: skip
    return run


def _base_samples(run: _BaseRun, step: int, micro: int) -> list[dict]:
    """This rank's share of one micro-batch: sample b of the step's global batch goes to rank b mod world."""
    s, cfg = run.settings, run.model.config
    samples = []
    for b in range(run.rank, s.batch_size, run.world):
        g = step * s.samples_per_step + micro * s.batch_size + b
        perm = LazyPermutation(run.pairs, [s.seed, g // run.pairs])
        i, j = pair_at(perm(g % run.pairs), len(run.store))
        samples.append(
            base_sample(
                run.store,
                i,
                j,
                np.random.default_rng([s.seed, step, g]),
                tile=cfg.tile_size,
                grid=cfg.grid_size,
                num_colors=s.num_colors,
                mask_ratio=s.mask_ratio,
                blur_prob=s.blur_prob,
                blur_sigma=s.blur_sigma,
                fixed_palette=run.store.palette,
                random_palette_prob=s.random_palette_prob,
                binary_prob=s.binary_prob,
            )  # fmt: skip
        )
    return samples


def _base_step(run: _BaseRun, step: int) -> tuple[float, float]:
    """One optimizer step over the global batch; returns (loss over the whole step, learning rate)."""
    from fewseg.collectives import all_reduce_grads, all_reduce_sum

    s, model = run.settings, run.model
    lr = lr_at(step, **s.schedule)
    set_lr(run.optimizer, lr)
    torch.manual_seed(step_seed(s.seed, step, run.rank))  # drop-path draws
    run.optimizer.zero_grad(set_to_none=True)
    micro_batches = [_batch_tensors(_base_samples(run, step, micro), run.device) for micro in range(s.grad_accum)]
    # The step's loss is the mean over every masked pixel of every micro-batch on every rank.
    pixels_per_patch = model.config.patch_size**2 * 3
    masked = sum(float(m.sum()) for _, _, m in micro_batches) * pixels_per_patch
    masked = float(all_reduce_sum(torch.tensor([masked], dtype=torch.float64)))
    total_t = torch.zeros((), dtype=torch.float64)
    for images, labels, mask in micro_batches:
        with autocast(run.device, s.precision):
            pred = model(images, labels, mask)
            count = mask.sum() * pixels_per_patch
            loss_sum = model.loss(pred.float(), labels, mask) * count
        (loss_sum / masked).backward()
        total_t += float(loss_sum.detach())
    all_reduce_grads([p for p in model.parameters() if p.requires_grad])
    total = float(all_reduce_sum(total_t)) / masked
    run.optimizer.step()
    return total, lr


def _validate_and_keep_best(run: _BaseRun, done: int, loss: float, lr: float) -> float | None:
    """Held-out mIoU after ``done`` steps; the best weights so far go to ``best.pt``."""
    miou = validate_base(run.model, run.val_store, run.val_pairs, run.settings, run.device)
    score = miou if miou is not None else -float(loss)
    if run.val_pairs and score > run.best:
        run.best = score
        save_torch(run.best_path, {k: v.detach().cpu() for k, v in run.model.state_dict().items()})
    log.info("step %d: loss %.4f lr %.2e val mIoU %s", done, loss, lr, miou)
    return miou


def _save_base_resume(run: _BaseRun, done: int) -> None:
    save_torch(
        run.resume_path,
        {"step": done, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
         "best": run.best, "history": run.history, "settings_digest": run.digest},
    )  # fmt: skip


class _EpochBars:
    """One progress bar per epoch (hidden on ranks other than 0)."""

    def __init__(self, steps: int, steps_per_epoch: int, stream, disable: bool):
        self.steps, self.steps_per_epoch, self.stream, self.disable = steps, steps_per_epoch, stream, disable
        self.bar: tqdm | None = None
        self.epoch = -1

    def start_step(self, step: int) -> None:
        epoch = step // self.steps_per_epoch
        if epoch == self.epoch:
            return
        self.close()
        self.epoch = epoch
        first = epoch * self.steps_per_epoch
        self.bar = _progress(
            min(self.steps_per_epoch, self.steps - first), step - first, f"epoch {epoch}", self.stream, self.disable
        )

    def end_step(self, loss: float, lr: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _write_base_outputs(
    run: _BaseRun, out_model: str | os.PathLike, out_history: str | os.PathLike, out_plot: str | os.PathLike
) -> dict:
    """``last.pt`` (the final step), then the output model (the best held-out weights), history and plot."""
    s, model = run.settings, run.model
    # The final step's weights, loadable like the output model (which is the best by held-out mIoU).
    save_base_model(run.last_path, model, {"chosen": "last", "steps": s.steps, "processes": run.world})
    if run.val_pairs and run.best_path.is_file():
        model.load_state_dict(torch.load(run.best_path, map_location=run.device, weights_only=True))
        chosen = "best"
    else:
        chosen = "last"
    meta = {
        "chosen": chosen, "best_val_miou": run.best if run.val_pairs else None, "steps": s.steps,
        "processes": run.world,
    }  # fmt: skip
    if run.device.type == "cuda":
        meta["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        log.info("GPU peak memory %.0f MiB", meta["gpu_peak_mb"])
    fp = save_base_model(out_model, model.cpu(), meta)
    write_history(out_history, run.history)
    plot_history(out_plot, run.history, "base training")
    run.resume_path.unlink(missing_ok=True)
    return {**meta, "fingerprint": fp}


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

    ``settings`` is the slice of :func:`fewseg.config.base_training_settings`. Under a process group (see
    :mod:`fewseg.distributed`) each rank builds its share of every step's global batch (sample b of a micro-batch
    goes to rank b mod world) and gradients are summed over ranks; every sample draws its augmentation from its own
    (seed, step, index) stream and the loss is the mean over all masked pixels of the whole step, so the result does
    not depend on the number of processes (up to summation order).
    The checkpoint folder keeps ``best.pt`` (held-out mIoU) and ``last.pt`` (final step) beside the output.
    """
    s = BaseTrainingSettings.from_slice(settings)
    run = _setup_base(tiles, s, checkpoint_dir)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bars = _EpochBars(s.steps, run.steps_per_epoch, progress_stream, disable=not run.main)
    t0 = time.time()
    for step in range(run.start, s.steps):
        bars.start_step(step)
        loss, lr = _base_step(run, step)
        done = step + 1
        row = {"step": done, "loss": loss, "lr": lr}
        if run.main and (done % s.val_every == 0 or done == s.steps):
            row["val_miou"] = _validate_and_keep_best(run, done, loss, lr)
        run.history.append(row)
        bars.end_step(loss, lr)
        if run.main and done % s.checkpoint_every == 0 and done < s.steps:
            _save_base_resume(run, done)
    bars.close()
    elapsed = time.time() - t0
    if not run.main:
        return {"rank": run.rank, "seconds": elapsed}
    result = _write_base_outputs(run, out_model, out_history, out_plot)
    log.info(
        "base training done in %.1f s (%s weights, fingerprint %s)", elapsed, result["chosen"], result["fingerprint"]
    )
    return {**result, "seconds": elapsed}


# ---------------------------------------------------------------------------------------------------------------
# Prompt training


@dataclass(frozen=True)
class PhaseSettings:
    steps: int
    lr: float


@dataclass(frozen=True)
class PromptTrainingSettings:
    """What prompt training of one class reads, named and typed: the slice of :func:`fewseg.config.prompt_settings`
    (the shared settings with the class's own crops and phase overrides already merged in).

    ``source`` keeps the slice as given: its digest decides whether a checkpoint left by a killed run belongs to
    this run.
    """

    cls: int
    name: str
    seed: int
    device: str
    precision: str
    batch_size: int
    phase1: PhaseSettings | None  # None: the slice of one phase's job, which never reads the other phase
    phase2: PhaseSettings | None
    cycle_steps: int
    peak_decay: float
    weight_decay: float
    working_size: int
    crop_size: int
    max_crop_size: int
    stride: int
    brightness: tuple[float, float]
    blur_prob: float
    init: str
    init_std: float
    pair_candidates: int
    holdout: int
    val_every: int
    checkpoint_every: int
    source: dict = field(repr=False, compare=False)

    @classmethod
    def from_slice(cls, settings: dict) -> PromptTrainingSettings:
        """From the dict the workflow passes; a missing key is a ValueError naming it."""
        try:
            t = settings["training"]
            given = {
                "cls": settings["cls"],
                "name": settings["name"],
                "seed": settings["seed"],
                "device": settings["runtime"]["device"],
                "precision": settings["runtime"]["precision"],
                **{
                    phase: PhaseSettings(t[phase]["steps"], t[phase]["lr"]) if phase in t else None
                    for phase in ("phase1", "phase2")
                },
            }
            if given["phase1"] is None and given["phase2"] is None:
                raise KeyError("phase1")
            return cls(**given, **_training_fields(cls, t, given), source=settings)
        except KeyError as err:
            raise _missing_setting("prompt-training", err) from None

    def phase(self, phase: int) -> PhaseSettings:
        if phase not in (1, 2):
            raise ValueError(f"prompt training has phases 1 and 2, not {phase}")
        chosen = self.phase1 if phase == 1 else self.phase2
        if chosen is None:
            raise ValueError(f"these prompt-training settings hold no phase {phase} (a slice for the other phase)")
        return chosen

    def phase_seed(self, phase: int) -> int:
        """Every class and phase draws from its own streams."""
        return self.seed + 1000 * self.cls + phase


class SupportCrops:
    """Dense multi-scale crops of a class's support tiles, at the working size."""

    def __init__(self, tiles: Sequence[dict], settings: PromptTrainingSettings, only_positive: bool):
        size = settings.working_size
        self.images, self.masks = [], []
        for tile in tiles:
            self.images.append(resize_image(read_image(tile["image"]), size))
            self.masks.append(resize_nearest(read_label(tile["label"]), size) > 0)
        windows = crop_windows(size, settings.crop_size, settings.max_crop_size, settings.stride)
        self.items = []
        for t_idx, mask in enumerate(self.masks):
            integral = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
            for y, x, s in windows:
                inside = integral[y + s, x + s] - integral[y, x + s] - integral[y + s, x] + integral[y, x]
                if inside > 0 or not only_positive:
                    self.items.append((t_idx, y, x, s))

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, k: int, rng: np.random.Generator, tile: tuple[int, int], settings: PromptTrainingSettings):
        t_idx, y, x, s = self.items[k]
        image = self.images[t_idx][y : y + s, x : x + s]
        mask = self.masks[t_idx][y : y + s, x : x + s].astype(np.uint8)
        image = resize_image(image, tile)  # as inference resizes query tiles: a blocky enlargement is not seen there
        mask = resize_nearest(mask, tile)
        image, mask = flip([image, mask], bool(rng.random() < 0.5), bool(rng.random() < 0.5))
        factor = rng.uniform(*settings.brightness)
        image = np.clip(image.astype(np.float32) * factor, 0, 255).astype(np.uint8)
        if rng.random() < settings.blur_prob:
            image = blur(image, float(rng.uniform(0.1, 1.0)))
        return image, mask


def _frozen_base_model(path: str | os.PathLike, device: torch.device, precision: str) -> tuple[SegGPT, dict]:
    from fewseg.checkpoints import load_base_model

    model, meta = load_base_model(path)
    model.to(device).requires_grad_(False)
    model.train()  # frozen, but drop-path stays active as in the published system
    return freeze_for_precision(model, device, precision), meta


@dataclass(frozen=True)
class PairSettings:
    """What choosing a class's best support pair reads: :func:`fewseg.config.pair_settings`."""

    cls: int
    name: str
    seed: int
    device: str
    precision: str
    working_size: int
    crop_size: int
    max_crop_size: int
    holdout: int
    pair_candidates: int

    @classmethod
    def from_slice(cls, settings: dict) -> PairSettings:
        try:
            t = settings["training"]
            runtime = settings["runtime"]
            given = {"cls": settings["cls"], "name": settings["name"], "seed": settings["seed"],
                     "device": runtime["device"], "precision": runtime["precision"]}  # fmt: skip
            return cls(**given, **{n: t[n] for n in (f.name for f in fields(cls)) if n not in given})
        except KeyError as err:
            raise _missing_setting("support-pair", err) from None


def split_support(
    support_tiles: Sequence[dict], s: PromptTrainingSettings | PairSettings
) -> tuple[list[dict], list[dict]]:
    """(held-out tiles, tiles to fit): the same split in both phases, at least one tile left to fit."""
    support_tiles = sorted(support_tiles, key=lambda x: x["stem"])
    holdout = min(s.holdout, len(support_tiles) - 1)
    order = np.random.default_rng([s.seed, s.cls]).permutation(len(support_tiles))
    held = [support_tiles[i] for i in sorted(order[:holdout])]
    fit = [support_tiles[i] for i in sorted(order[holdout:])]
    return held, fit


def select_pair(
    base_model_path: str | os.PathLike, support_tiles: Sequence[dict], out_pair: str | os.PathLike, settings: dict
) -> dict:
    """Choose the class's best support window as a plain prompt (:func:`fewseg.prompt.select_support_pair`) and save
    it in the learned prompt's format: the start of phase 1 when ``init`` is ``support_pair``, and the baseline a
    learned prompt has to beat. Its held-out IoU is measured like a learned prompt's. ``settings``: the slice of
    :func:`fewseg.config.pair_settings`."""
    s = PairSettings.from_slice(settings)
    device = pick_device(s.device)
    model, meta = _frozen_base_model(base_model_path, device, s.precision)
    held, fit = split_support(support_tiles, s)
    side = largest_crop(s.crop_size, s.max_crop_size)
    try:
        prompt, window, fit_iou = select_support_pair(
            model, load_support(fit, s.working_size), side, s.pair_candidates, device, s.precision
        )
    except ValueError as err:
        raise ValueError(f"class {s.cls}: {err}") from None
    held_iou = support_iou(model, prompt, load_support(held, s.working_size), side, device, s.precision)
    source = {"stem": fit[window.tile]["stem"], "y": window.y, "x": window.x, "side": window.side,
              "class_fraction": window.fraction}  # fmt: skip
    save_prompt(
        out_pair, prompt.prompt_image, prompt.prompt_label, cls=s.cls, name=s.name,
        base_fingerprint=meta["fingerprint"], tile_size=model.config.tile_size,
        meta={"kind": "support_pair", "source": source, "fit_iou": fit_iou, "held_out": [x["stem"] for x in held],
              "best_held_out_iou": held_iou},
    )  # fmt: skip
    log.info("class %d support pair: %s, IoU %.4f on the other fitting tiles, %s held out",
             s.cls, source, fit_iou, "none" if held_iou is None else f"{held_iou:.4f}")  # fmt: skip
    return {"source": source, "fit_iou": fit_iou, "best_held_out_iou": held_iou}


def _initial_prompt(
    tile_size: tuple[int, int], s: PromptTrainingSettings, seed: int, init_prompt, base_fingerprint: str
) -> LearnablePrompt:
    """A seeded random prompt near zero (the published start of phase 1), or the prompt to start from: the chosen
    support pair (phase 1 with ``init: support_pair``) or the phase-1 prompt (phase 2)."""
    from fewseg.checkpoints import load_prompt

    prompt = LearnablePrompt(tile_size, s.init_std, generator=torch.Generator().manual_seed(seed))
    if init_prompt is not None:
        init = load_prompt(init_prompt, base_fingerprint)
        with torch.no_grad():
            prompt.prompt_image.copy_(init["prompt_image"])
            prompt.prompt_label.copy_(init["prompt_label"])
    return prompt


@dataclass
class _PromptRun:
    """One phase of one class's prompt training, and what its checkpoints carry between steps."""

    settings: PromptTrainingSettings
    phase: int
    seed: int
    model: SegGPT
    prompt: LearnablePrompt
    optimizer: Optimizer
    crops: SupportCrops
    held: list[dict]
    held_data: list[tuple[np.ndarray, np.ndarray]]
    eval_side: int
    device: torch.device
    base_fingerprint: str
    resume_path: Path
    digest: str
    start: int = 0
    best: float = -math.inf
    best_state: dict | None = None
    history: list[dict] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return self.settings.phase(self.phase).steps

    @property
    def schedule(self) -> dict:
        """Keyword arguments of :func:`fewseg.schedule.lr_at`: cycles without warm-up down to zero."""
        s = self.settings
        return {"peak": s.phase(self.phase).lr, "min_lr": 0.0, "warmup": 0, "first_cycle": s.cycle_steps,
                "decay": s.peak_decay}  # fmt: skip


def _setup_prompt(
    base_model_path, support_tiles, checkpoint_dir, s: PromptTrainingSettings, phase: int, init_prompt
) -> _PromptRun:
    """Load the frozen base model, cut the crops, build the prompt and its optimizer, resume if a run was killed."""
    seed = s.phase_seed(phase)
    device = pick_device(s.device)
    model, meta = _frozen_base_model(base_model_path, device, s.precision)
    cfg = model.config
    held, fit = split_support(support_tiles, s)
    crops = SupportCrops(fit, s, only_positive=(phase == 1))
    if len(crops) == 0:
        raise ValueError(f"class {s.cls}: no support crop contains the class")
    prompt = _initial_prompt(cfg.tile_size, s, seed, init_prompt, meta["fingerprint"]).to(device)
    ckpt_dir = Path(checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    stems = [x["stem"] for x in sorted(support_tiles, key=lambda x: x["stem"])]
    run = _PromptRun(
        settings=s,
        phase=phase,
        seed=seed,
        model=model,
        prompt=prompt,
        optimizer=adamw(prompt.parameters(), device, lr=s.phase(phase).lr, weight_decay=s.weight_decay),
        crops=crops,
        held=held,
        held_data=load_support(held, s.working_size),
        eval_side=largest_crop(s.crop_size, s.max_crop_size),
        device=device,
        base_fingerprint=meta["fingerprint"],
        resume_path=ckpt_dir / f"phase{phase}_resume.pt",
        digest=settings_digest(s.source, f"{phase}{meta['fingerprint']}{stems}"),
    )
    state = load_resume(run.resume_path, run.digest)
    if state is not None:
        prompt.load_state_dict(state["prompt"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.start, run.best, run.best_state, run.history = (
            state["step"], state["best"], state["best_state"], state["history"]
        )  # fmt: skip
        log.info("resuming class %d phase %d at step %d", s.cls, phase, run.start)
    start = "the phase-1 prompt" if phase == 2 else ("the support pair" if init_prompt else "noise")
    log.info(
        "class %d (%s) phase %d: %d crops from %d tiles, %d held out; %d steps, lr %g, from %s",
        s.cls, s.name, phase, len(crops), len(fit), len(held), run.steps, s.phase(phase).lr, start,
    )  # fmt: skip
    return run


def _prompt_step(run: _PromptRun, step: int) -> tuple[float, float]:
    """One optimizer step of the prompt on a batch of support crops; returns (loss, learning rate)."""
    s, model, prompt = run.settings, run.model, run.prompt
    cfg = model.config
    lr = lr_at(step, **run.schedule)
    set_lr(run.optimizer, lr)
    torch.manual_seed(step_seed(run.seed, step))
    rng = np.random.default_rng([run.seed, step])
    picks = rng.integers(0, len(run.crops), size=s.batch_size)
    batch = [run.crops.sample(int(k), rng, cfg.tile_size, s) for k in picks]
    query = to_tensor(np.stack([b[0] for b in batch])).to(run.device)
    target = to_tensor(BINARY_PALETTE[np.stack([b[1] for b in batch])]).to(run.device)
    with autocast(run.device, s.precision):
        pred = prompt(model, query)
    # Every patch of the predicted query half counts, as the masked query half of the canvas did.
    everywhere = torch.ones(1, pred.shape[2] // cfg.patch_size * (pred.shape[3] // cfg.patch_size), dtype=torch.bool)
    loss = model.loss(pred.float(), target, everywhere.to(run.device))
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    return float(loss.detach()), lr


def _validate_prompt(run: _PromptRun, done: int, loss: float) -> float:
    """Held-out IoU after ``done`` steps; the best prompt so far is kept in memory (and in the checkpoint)."""
    s = run.settings
    iou = support_iou(run.model, run.prompt, run.held_data, run.eval_side, run.device, s.precision)
    if iou > run.best:
        run.best, run.best_state = iou, {k: v.detach().cpu().clone() for k, v in run.prompt.state_dict().items()}
    log.info("class %d phase %d step %d: loss %.4f held-out IoU %.4f", s.cls, run.phase, done, loss, iou)
    return iou


def _save_prompt_resume(run: _PromptRun, done: int) -> None:
    save_torch(
        run.resume_path,
        {"step": done, "prompt": run.prompt.state_dict(), "optimizer": run.optimizer.state_dict(), "best": run.best,
         "best_state": run.best_state, "history": run.history, "settings_digest": run.digest},
    )  # fmt: skip


def _write_prompt_outputs(run: _PromptRun, out_prompt: str | os.PathLike, out_history: str | os.PathLike) -> dict:
    """The best held-out prompt (the last one when nothing is held out), its history, and the run's summary."""
    s, prompt = run.settings, run.prompt
    if run.best_state is not None:
        prompt.load_state_dict(run.best_state)
    best = run.best if run.held else None
    save_prompt(
        out_prompt, prompt.prompt_image, prompt.prompt_label, cls=s.cls, name=s.name,
        base_fingerprint=run.base_fingerprint, tile_size=run.model.config.tile_size,
        meta={"phase": run.phase, "held_out": [x["stem"] for x in run.held], "best_held_out_iou": best},
    )  # fmt: skip
    write_history(out_history, run.history)
    run.resume_path.unlink(missing_ok=True)
    return {"best_held_out_iou": best, "crops": len(run.crops)}


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
    """Learn (phase 1) or refine (phase 2) one novel class's prompt against the frozen base model.

    ``settings`` is the slice of :func:`fewseg.config.prompt_settings` for the class.
    """
    s = PromptTrainingSettings.from_slice(settings)
    if phase == 1 and s.init == "support_pair" and init_prompt is None:
        raise ValueError(f"class {s.cls}: init is support_pair, but no support pair was given to start from")
    run = _setup_prompt(base_model_path, support_tiles, checkpoint_dir, s, phase, init_prompt)
    bar = _progress(run.steps, run.start, f"class {s.cls} phase {phase}", progress_stream)
    for step in range(run.start, run.steps):
        loss, lr = _prompt_step(run, step)
        done = step + 1
        row = {"step": done, "loss": loss, "lr": lr}
        if run.held and (done % s.val_every == 0 or done == run.steps):
            row["val_miou"] = _validate_prompt(run, done, loss)
        run.history.append(row)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)
        if done % s.checkpoint_every == 0 and done < run.steps:
            _save_prompt_resume(run, done)
    bar.close()
    return _write_prompt_outputs(run, out_prompt, out_history)
