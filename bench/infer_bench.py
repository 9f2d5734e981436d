"""Inference throughput: fewseg's batched base and novel inference against a naive one-pair-at-a-time loop.

    python bench/infer_bench.py                    # the demo's settings (config.yaml), a tiny random model
    python bench/infer_bench.py --config resources/config.oem.yaml --queries 2

Both sides use the same model, query tiles, prompt pairs, seam crops and decoding; they differ only in how the
forwards are issued. The naive loop is what a straightforward port does: one forward per (query tile, prompt
pair) canvas with autograd bookkeeping off but not in inference mode, the whole canvas decoded, predictions
averaged over the pairs; fewseg runs each query's tiles and all their pairs through as few forwards as
``inference.batch_size`` allows, with the feature ensemble inside the model and only the query half decoded, and
a novel class's queries, which share its one prompt, several to a forward as the ``infer_novel`` job runs them.
Queries are random images at the working size (throughput does not depend on their content). The process keeps
freed memory mapped, as every workflow job does (:mod:`fewseg.allocator`); ``--allocator system`` measures without.

A second table runs fewseg's own inference in fp32 and under bf16 autocast (``runtime.precision: bf16``) side by
side, with the share of pixels on which both agree. It is printed only where the device computes bf16 natively
(fewseg.runtime.native_bf16); elsewhere a line says why it is missing, since emulated bf16 measures the emulation.
"""

from __future__ import annotations

import argparse
import copy
import time
from functools import partial

import numpy as np
import torch

from fewseg.allocator import keep_freed_memory
from fewseg.config import load_config
from fewseg.data import resize_image, resize_nearest
from fewseg.infer import (
    BasePrompt,
    band_mask,
    canvas_mask,
    paste_bands,
    predict_base,
    predict_novel_many,
    prompt_halves,
    seam_crops,
    tile_boxes,
)
from fewseg.model import build_model
from fewseg.palette import BINARY_PALETTE, as_palette, decode_canvas, to_tensor
from fewseg.runtime import freeze_for_precision, native_bf16


def naive_forward(model, images, labels, mask) -> torch.Tensor:
    with torch.no_grad():
        x, y = to_tensor(images[None]), to_tensor(labels[None])
        return model(x, y, torch.from_numpy(canvas_mask(mask))[None])[0]


def naive_ensemble(model, query, lower, mask, prompt_imgs, prompt_masks, palette) -> np.ndarray:
    """One forward per prompt pair, the predicted query halves averaged, then decoded."""
    h = query.shape[0]
    preds = [
        naive_forward(model, np.concatenate([pi, query]), np.concatenate([pm, pm if lower is None else lower]), mask)
        for pi, pm in zip(prompt_imgs, prompt_masks, strict=True)
    ]
    return decode_canvas(torch.stack(preds).mean(0, keepdim=True)[:, :, h:], palette)[0]


def naive_base(model, query, prompts, palette, *, working_size, grid, seam_repair, seam_band) -> np.ndarray:
    cfg = model.config
    h, w = cfg.tile_size
    patches = h // cfg.patch_size
    work = resize_image(query, working_size)
    prompt_imgs, prompt_masks = prompt_halves(prompts, grid, (h, w))
    whole = np.ones((patches, w // cfg.patch_size), dtype=bool)
    ids = np.zeros((working_size, working_size), dtype=np.uint8)
    for y0, x0, y1, x1 in tile_boxes(working_size, grid):
        tile = resize_image(work[y0:y1, x0:x1], (h, w))
        tile_ids = naive_ensemble(model, tile, None, whole, prompt_imgs, prompt_masks, palette)
        ids[y0:y1, x0:x1] = resize_nearest(tile_ids, (y1 - y0, x1 - x0))
    if seam_repair and grid > 1:
        colours = palette[ids]
        crops = seam_crops(working_size, grid, patches, seam_band)
        masks, predicted = [], []
        for crop in crops:
            y0, x0, y1, x1 = crop.box
            q = resize_image(work[y0:y1, x0:x1], (h, w))
            lower = resize_nearest(colours[y0:y1, x0:x1], (h, w))
            masks.append(band_mask(crop, patches))
            predicted.append(naive_ensemble(model, q, lower, masks[-1], prompt_imgs, prompt_masks, palette))
        ids = paste_bands(ids, crops, masks, predicted)
    return resize_nearest(ids, query.shape[:2])


def naive_novel(model, query, *, p_img, p_lab, working_size, grid) -> np.ndarray:
    cfg = model.config
    h, w = cfg.tile_size
    patches = h // cfg.patch_size
    work = resize_image(query, working_size)
    whole = np.ones((patches, w // cfg.patch_size), dtype=bool)
    out = np.zeros((working_size, working_size), dtype=np.uint8)
    for y0, x0, y1, x1 in tile_boxes(working_size, grid):
        tile = to_tensor(resize_image(work[y0:y1, x0:x1], (h, w))[None])
        with torch.no_grad():
            pred = model(torch.cat([p_img, tile], 2), torch.cat([p_lab, torch.zeros_like(tile)], 2),
                         torch.from_numpy(canvas_mask(whole))[None])  # fmt: skip
        m = decode_canvas(pred[:, :, h:], BINARY_PALETTE)[0]
        out[y0:y1, x0:x1] = resize_nearest(m, (y1 - y0, x1 - x0))
    return resize_nearest(out, query.shape[:2])


def timed(fn, queries) -> tuple[float, list]:
    """Queries per second of ``fn``, which maps a list of queries to their predictions."""
    fn(queries[:1])  # warm-up
    t0 = time.perf_counter()
    outs = fn(queries)
    return len(queries) / (time.perf_counter() - t0), outs


def one_by_one(fn):
    """A list-of-queries function that runs ``fn`` on each query in turn."""
    return lambda queries, **kw: [fn(q, **kw) for q in queries]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--queries", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-precision", action="store_true", help="skip the fp32 / bf16 table")
    p.add_argument(
        "--allocator",
        choices=("keep", "system"),
        default="keep",
        help="keep: freed memory stays mapped, as in the workflow's jobs (default); system: glibc's defaults",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    allocator = keep_freed_memory() if args.allocator == "keep" else "allocator: system defaults"
    config = load_config(args.config, check_paths=False)
    inf = config["inference"]
    torch.manual_seed(0)
    model = build_model(config["model"]["preset"]).eval()
    rng = np.random.default_rng(0)
    size = inf["working_size"]
    palette = as_palette(config["classes"]["palette"])
    queries = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(args.queries)]
    prompts = [
        BasePrompt(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), palette[rng.integers(0, 8, (size, size))])
        for _ in range(inf["top_k"])
    ]
    device = torch.device("cpu")
    print(f"model {config['model']['preset']}, working size {size}, {args.queries} queries, {args.threads} threads, "
          f"batch_size {inf['batch_size']}; {allocator}")  # fmt: skip
    print(f"{'stage':28} {'naive q/s':>10} {'fewseg q/s':>11} {'ratio':>6}  same output")
    rows = stage_rows(model, queries, prompts, palette, inf, device)
    for label, naive, fast in rows:
        naive_qps, naive_out = timed(naive, queries)
        fast_qps, fast_out = timed(fast, queries)
        agree = np.mean([np.mean(a == b) for a, b in zip(naive_out, fast_out, strict=True)])
        print(f"{label:28} {naive_qps:10.2f} {fast_qps:11.2f} {fast_qps / naive_qps:5.2f}x  {100 * agree:.2f}% px")
    if not args.no_precision:
        # bf16 runs the model as the workflow's jobs load it: matrix weights cast to bf16 once.
        frozen = freeze_for_precision(copy.deepcopy(model).requires_grad_(False), device, "bf16")
        bf16_rows = stage_rows(frozen, queries, prompts, palette, inf, device)
        precision_table(rows, bf16_rows, queries, device)
    return 0


def stage_rows(model, queries, prompts, palette, inf: dict, device: torch.device) -> list:
    """(label, naive, fast) for base inference and each novel class, on the demo's tiling settings."""
    size = inf["working_size"]
    batch = inf["batch_size"]
    base = dict(working_size=size, grid=inf["base"]["grid"], seam_repair=inf["base"]["seam_repair"],
                seam_band=inf["seam_band"])  # fmt: skip
    h, w = model.config.tile_size
    g = torch.Generator().manual_seed(1)
    p_img, p_lab = torch.randn(1, 3, h, w, generator=g), torch.randn(1, 3, h, w, generator=g)

    def base_fast(q, precision="fp32"):
        return predict_base(model, q, prompts, palette, device=device, batch_size=batch, precision=precision, **base)

    def base_naive(q):
        return naive_base(model, q, prompts, palette, **base)

    seams = "on" if base["seam_repair"] else "off"
    rows = [(f"base (grid {base['grid']}, seams {seams})", one_by_one(base_naive), one_by_one(base_fast))]
    for cls, c in sorted(inf["novel"].items(), key=lambda kv: -kv[1]["grid"]):
        # The naive side has no seam pass for novel classes: both run without one, like with like.
        tiling = dict(working_size=size, grid=c["grid"])
        many = partial(predict_novel_many, model, prompt_image=p_img, prompt_label=p_lab, seam_repair=False,
                       seam_band=0, batch_size=batch, device=device, **tiling)  # fmt: skip
        group = max(1, batch // c["grid"] ** 2)  # queries a forward, as the infer_novel job groups them

        def fast(queries, many=many, group=group, **kw):
            return [m for i in range(0, len(queries), group) for m in many(queries[i : i + group], **kw)]

        naive = partial(naive_novel, model, p_img=p_img, p_lab=p_lab, **tiling)
        rows.append((f"novel {cls} (grid {c['grid']}, no seams)", one_by_one(naive), fast))
    return rows


def precision_table(rows, bf16_rows, queries, device: torch.device) -> None:
    """fewseg's inference in fp32 and in bf16, side by side, where bf16 is native."""
    native, why = native_bf16(device)
    print()
    if not native:
        print(f"fp32 / bf16 table skipped: {why}")
        return
    print(f"bf16 native: {why}")
    print(f"{'stage':28} {'fp32 q/s':>10} {'bf16 q/s':>11} {'ratio':>6}  same output as fp32")
    for (label, _, fast), (_, _, fast_bf16) in zip(rows, bf16_rows, strict=True):
        fp32_qps, fp32_out = timed(partial(fast, precision="fp32"), queries)
        bf16_qps, bf16_out = timed(partial(fast_bf16, precision="bf16"), queries)
        agree = np.mean([np.mean(a == b) for a, b in zip(fp32_out, bf16_out, strict=True)])
        print(f"{label:28} {fp32_qps:10.2f} {bf16_qps:11.2f} {bf16_qps / fp32_qps:5.2f}x  {100 * agree:.2f}% px")


if __name__ == "__main__":
    raise SystemExit(main())
