"""fewseg's SegGPT against the transformers reference, side by side on the same random weights and inputs.

    python bench/model_bench.py                       # ViT-B-like and ViT-L, both allocator environments
    python bench/model_bench.py --models vit_b --envs default

Every measurement runs in a fresh process, because glibc reads its allocator settings at start-up: the
``default`` column is the environment as given, the ``keep`` column adds ``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=68719476736`` (freed memory stays mapped) for both sides. Rows, each per model:

    fwd b1        forward of one prompt, inference mask
    fwd b8 ens    forward of 8 prompts for one query with feature ensemble
    train b2      forward + backward + AdamW step at batch 2 with a training mask (ViT-B-like only by default)

Printed per row and side: the best wall time over the repeats, the peak resident memory of the process during
the task, achieved GFLOP/s (FLOPs counted once on the meta device) against this machine's measured matrix-product
peak, and the reference/fewseg ratios. ``max|diff|`` is the largest absolute difference between the two sides'
predicted canvases. bf16 rows run only where the CPU has native bf16 (or on a GPU), since emulated bf16 matrix
products are orders of magnitude slower than fp32 and would measure the emulation, not either model.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

KEEP_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
CANVAS = (896, 448)
MODELS = {
    "vit_b": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        merge_index=2,
        intermediate_hidden_state_indices=[2, 5, 8, 11],
    ),
    "vit_l": dict(),  # transformers' defaults are the official SegGPT ViT-L
    # A few-second smoke size for the test that keeps this script working; its numbers mean nothing.
    "smoke": dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        merge_index=1,
        intermediate_hidden_state_indices=[1, 2],
        decoder_hidden_size=16,
    ),
}
TASKS = {"fwd1": "fwd b1", "fwd8": "fwd b8 ens", "train2": "train b2"}


# ---------------------------------------------------------------------------------------------------------------
# Worker: one measurement in its own process


def _hf_config(model: str):
    from transformers import SegGptConfig

    return SegGptConfig(image_size=list(CANVAS), **MODELS[model])


def _inputs(batch: int, shared_query: bool, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    h, w = CANVAS[0] // 2, CANVAS[1]
    query = torch.randn(1 if shared_query else batch, 3, h, w, generator=g).expand(batch, -1, -1, -1).contiguous()
    prompt, mask, label = (torch.randn(batch, 3, h, w, generator=g) for _ in range(3))
    return query, prompt, mask, label


def _train_mask(batch: int, seed: int = 1):
    import numpy as np
    import torch

    from fewseg.data import random_patches
    from fewseg.model import PRESETS

    config = PRESETS["vit_large"]  # only the canvas (896 x 448) and patch size (16) matter here
    assert config.canvas_size == CANVAS
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([random_patches(config.grid_size, 0.75, rng) for _ in range(batch)]))


OUT_OF_MEMORY = 3  # a worker's exit status when its resident memory passed --max-rss-gb


class _PeakRSS:
    """Samples this process's resident memory every few milliseconds while a task runs.

    Past `limit` bytes it ends the process with OUT_OF_MEMORY: a machine without swap would otherwise meet the
    kernel's OOM killer, which may take the driver (or the user's other work) instead of the worker.
    """

    def __init__(self, limit: float = float("inf")) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = 0
        self.limit = limit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            if self.peak > self.limit:
                print(f"peak resident memory passed {self.limit / 1e9:.1f} GB", file=sys.stderr, flush=True)
                os._exit(OUT_OF_MEMORY)
            time.sleep(0.005)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _build(impl: str, model: str, weights: Path, train: bool):
    if impl == "ref":
        from safetensors.torch import load_file
        from transformers import SegGptForImageSegmentation

        net = SegGptForImageSegmentation(_hf_config(model))
        net.load_state_dict(load_file(weights))
    else:
        from fewseg.weights import load_pretrained

        hf = _hf_config(model)
        layers = tuple(hf.intermediate_hidden_state_indices)
        net = load_pretrained(weights, merge_index=hf.merge_index, feature_layers=layers)
    net.train(train)
    if not train:
        net.requires_grad_(False)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # drop what loading the file left behind, on both sides alike
    return net


def _step_fn(impl: str, net, task: str, precision: str, compile_: bool, query_only: bool = False):
    """A zero-argument callable doing one unit of the task; returns the predicted canvas (or None)."""
    import torch

    from fewseg.runtime import autocast

    batch = {"fwd1": 1, "fwd8": 8, "train2": 2}[task]
    ensemble = task == "fwd8"
    query, prompt, mask, label = _inputs(batch, shared_query=ensemble)
    cpu = torch.device("cpu")
    if impl == "ref":
        if task == "train2":
            bool_mask = _train_mask(batch)
            kwargs = dict(pixel_values=query, prompt_pixel_values=prompt, prompt_masks=mask, bool_masked_pos=bool_mask)
            kwargs["labels"] = label
        else:
            kwargs = dict(pixel_values=query, prompt_pixel_values=prompt, prompt_masks=mask, feature_ensemble=ensemble)
        kwargs["embedding_type"] = "semantic"  # the reference defaults to "instance"; fewseg to "semantic"
        forward = torch.compile(net) if compile_ else net

        def run():
            with autocast(cpu, precision):
                out = forward(**kwargs)
            return out.pred_masks if task != "train2" else out.loss

    else:
        from fewseg.data import query_half_patches

        images = torch.cat((prompt, query), dim=2)
        labels = torch.cat((mask, label if task == "train2" else mask), dim=2)
        m = _train_mask(batch) if task == "train2" else torch.from_numpy(query_half_patches(net.config.grid_size))[None]
        forward = torch.compile(net) if compile_ else net

        def run():
            with autocast(cpu, precision):
                pred = forward(images, labels, m, feature_ensemble=ensemble, query_only=query_only)
                return pred if task != "train2" else net.loss(pred, labels, m)

    if task != "train2":
        return torch.inference_mode()(run)

    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = run()
        loss.backward()
        optimizer.step()
        return None

    return train_step


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    net = _build(args.impl, args.model, Path(args.weights), train=args.task == "train2")
    step = _step_fn(args.impl, net, args.task, args.precision, args.compile != "none", args.query_only)
    times = []
    with _PeakRSS(args.max_rss_gb * 1e9) as rss:
        for i in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            out = step()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    if out is not None and args.save:
        torch.save(out.float().contiguous(), args.save)
    print(json.dumps({"seconds": min(times), "all": times, "peak_rss": rss.peak}))


# ---------------------------------------------------------------------------------------------------------------
# Driver


def matmul_peak(threads: int, dtype: str = "fp32", n: int = 2048) -> float:
    """This machine's fp32 (or bf16) matrix-product rate in GFLOP/s, the best of a few large products."""
    import torch

    torch.set_num_threads(threads)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def count_flops(model: str, task: str) -> float:
    """FLOPs of one task unit, counted on the meta device on the reference model (the same work for both)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import SegGptForImageSegmentation

    batch = {"fwd1": 1, "fwd8": 8, "train2": 2}[task]
    with torch.device("meta"):
        net = SegGptForImageSegmentation(_hf_config(model)).train(task == "train2")
        query, prompt, mask, label = (torch.empty(batch, 3, CANVAS[0] // 2, CANVAS[1]) for _ in range(4))
    kwargs = dict(pixel_values=query, prompt_pixel_values=prompt, prompt_masks=mask, embedding_type="semantic")
    counter = FlopCounterMode(display=False)
    with counter:
        if task == "train2":
            bool_mask = _train_mask(batch).to("meta")
            net(**kwargs, bool_masked_pos=bool_mask, labels=label).loss.backward()
        else:
            with torch.no_grad():
                net(**kwargs, feature_ensemble=task == "fwd8")
    return float(counter.get_total_flops())


def make_weights(model: str, path: Path) -> None:
    """Random reference weights (seeded), every tensor non-trivial, saved once for both sides."""
    import torch
    from safetensors.torch import save_file
    from transformers import SegGptForImageSegmentation

    torch.manual_seed(0)
    net = SegGptForImageSegmentation(_hf_config(model))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "rel_pos" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1 and "layernorm" not in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


def bf16_native() -> bool:
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or getattr(torch.cpu, "_is_amx_tile_supported", bool)())


def run_worker(cmd_args: list[str], env_name: str, timeout: float) -> dict:
    """One side's figures, or {"error": why} when it ran out of the memory allowed to it."""
    env = dict(os.environ)
    if env_name == "keep":
        env.update(KEEP_ENV)
    else:
        for key in KEEP_ENV:
            env.pop(key, None)
    cmd = [sys.executable, __file__, "--worker", *cmd_args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode == OUT_OF_MEMORY:
        return {"error": r.stderr.strip().splitlines()[-1]}
    if r.returncode != 0:
        raise RuntimeError(f"worker {' '.join(cmd_args)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _default_max_rss_gb() -> float:
    import psutil

    return round(0.9 * psutil.virtual_memory().total / 1e9, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=["ref", "fewseg"])
    p.add_argument("--model", default="vit_b")
    p.add_argument("--task", default="fwd1")
    p.add_argument("--weights")
    p.add_argument("--save")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--models", default="vit_b,vit_l")
    p.add_argument("--tasks", default="fwd1,fwd8,train2", help="train2 skips vit_l unless --train-large")
    p.add_argument("--envs", default="default,keep")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument(
        "--compile",
        nargs="?",
        const="both",
        default="none",
        choices=["none", "ref", "both"],
        help="torch.compile the reference (ref) or both sides (both, or a bare --compile)",
    )
    p.add_argument(
        "--query-only",
        action="store_true",
        help="also time fewseg decoding only the query half, as its inference does (compared on that half)",
    )
    p.add_argument("--train-large", action="store_true", help="also time the training step of ViT-L")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--max-rss-gb",
        type=float,
        default=_default_max_rss_gb(),
        help="stop a side whose resident memory passes this and report it as not fitting (default: 90%% of RAM)",
    )
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    precisions = args.precisions.split(",")
    if "bf16" in precisions and not bf16_native():
        print("bf16 rows skipped: this CPU has no native bf16 (AVX512-BF16/AMX); measured bf16 matmul peak "
              f"{matmul_peak(args.threads, 'bf16', 512):.2f} GFLOP/s")  # fmt: skip
        precisions = [x for x in precisions if x != "bf16"]
    peak = {pr: matmul_peak(args.threads, pr) for pr in precisions}
    print(f"threads {args.threads}, canvas {CANVAS[0]}x{CANVAS[1]}, matmul peak " +
          ", ".join(f"{pr} {v:.0f} GFLOP/s" for pr, v in peak.items()), flush=True)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="fewseg-bench-") as tmp:
        tmp = Path(tmp)
        for model in args.models.split(","):
            weights = tmp / f"{model}.safetensors"
            make_weights(model, weights)
            for task in args.tasks.split(","):
                if task == "train2" and model == "vit_l" and not args.train_large:
                    continue
                flops = count_flops(model, task)
                for precision in precisions:
                    for env_name in args.envs.split(","):
                        row = measure_row(args, tmp, weights, model, task, precision, env_name)
                        row["gflop"] = flops / 1e9
                        rows.append(row)
                        print_row(row, peak[precision], header=len(rows) == 1)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def measure_row(args, tmp: Path, weights: Path, model: str, task: str, precision: str, env_name: str) -> dict:
    """Both sides (and fewseg decoding the query half only, with --query-only) on one task, each in a process."""
    import torch

    row = {"model": model, "task": TASKS[task], "precision": precision, "env": env_name}
    sides = ["ref", "fewseg"] + (["fewseg_q"] if args.query_only and task != "train2" else [])
    # A batch-8 forward is long enough to time once; a training step's first timed runs still vary by 10%.
    repeats = str(1 if task == "fwd8" else args.repeats)
    outs = {}
    for side in sides:
        compiled = args.compile == "both" or (args.compile == "ref" and side == "ref")
        # A batch-8 forward is long enough to time cold, unless its first call also compiles the model.
        warmup = "0" if task == "fwd8" and not compiled else "1"
        save = tmp / f"{side}.pt"
        cmd = [
            "--impl", "ref" if side == "ref" else "fewseg", "--model", model, "--task", task,
            "--weights", str(weights), "--precision", precision, "--threads", str(args.threads),
            "--save", str(save), "--warmup", warmup, "--repeats", repeats, "--max-rss-gb", str(args.max_rss_gb),
        ]  # fmt: skip
        cmd += ["--compile"] if compiled else []
        cmd += ["--query-only"] if side == "fewseg_q" else []
        row[side] = run_worker(cmd, env_name, timeout=3600)
        if save.exists():
            outs[side] = torch.load(save)
            save.unlink()
    ref = outs.get("ref")
    for side in ("fewseg", "fewseg_q"):
        if ref is not None and side in outs:
            ours = outs[side]
            row[f"max_abs_diff_{side}"] = float((ref[:, :, ref.shape[2] - ours.shape[2] :] - ours).abs().max())
    return row


def print_row(row: dict, peak: float, header: bool) -> None:
    if header:
        print(
            f"{'model':6} {'task':11} {'prec':4} {'env':7} | {'ref s':>7} {'ours s':>7} {'speedup':>7} | "
            f"{'ref GB':>6} {'ours GB':>7} {'mem':>5} | {'ref %pk':>7} {'ours %pk':>8} | {'GFLOP':>6} | "
            f"{'max|diff|':>9} | query half only: {'s':>6} {'speedup':>7} {'GB':>5}"
        )
    ref, ours = row["ref"], row["fewseg"]
    gf = row["gflop"]
    diff = row.get("max_abs_diff_fewseg")
    failed = [f"{side}: {row[side]['error']}" for side in ("ref", "fewseg") if "error" in row[side]]
    if failed:
        # One side did not fit: print what the other measured, and why the ratios are missing.
        def figures(side: dict) -> str:
            return "did not fit" if "error" in side else f"{side['seconds']:.2f} s, {side['peak_rss'] / 1e9:.2f} GB"

        print(
            f"{row['model']:6} {row['task']:11} {row['precision']:4} {row['env']:7} | ref {figures(ref)} | "
            f"fewseg {figures(ours)} | no ratio ({'; '.join(failed)})",
            flush=True,
        )
        return
    line = (
        f"{row['model']:6} {row['task']:11} {row['precision']:4} {row['env']:7} | "
        f"{ref['seconds']:7.2f} {ours['seconds']:7.2f} {ref['seconds'] / ours['seconds']:6.2f}x | "
        f"{ref['peak_rss'] / 1e9:6.2f} {ours['peak_rss'] / 1e9:7.2f} {ours['peak_rss'] / ref['peak_rss']:5.2f} | "
        f"{100 * gf / ref['seconds'] / peak:6.0f}% {100 * gf / ours['seconds'] / peak:7.0f}% | {gf:6.0f} | "
        f"{'-' if diff is None else f'{diff:.1e}':>9} |"
    )
    if "fewseg_q" in row:
        q = row["fewseg_q"]
        line += f" {q['seconds']:23.2f} {ref['seconds'] / q['seconds']:6.2f}x {q['peak_rss'] / 1e9:5.2f}"
        line += f" (diff {row['max_abs_diff_fewseg_q']:.1e})"
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
