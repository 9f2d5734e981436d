"""fewseg's CPU AdamW beside torch.optim.AdamW: the cost of building the first one in a fresh process, and a step.

    python bench/optim_bench.py --preset tiny --repeats 5

Each start-up figure is a fresh Python process that has already imported torch and the model and then builds the
optimizer over the preset's parameters (torch's first optimizer imports torch._dynamo). Step figures are the median
of --steps updates over the preset's parameters with random gradients, on --threads threads, and the weights after
them are compared to the bit.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_STARTUP = """
import sys, time
sys.path.insert(0, {root!r})
import torch
from fewseg.model import build_model
from fewseg.optim import AdamW
model = build_model({preset!r})
t = time.perf_counter()
opt = {ctor}(model.parameters(), lr=1e-3)
print(time.perf_counter() - t, "torch._dynamo" in sys.modules)
"""

SIDES = {"fewseg": "AdamW", "torch": "torch.optim.AdamW"}


def startup(preset: str, side: str) -> tuple[float, bool]:
    code = _STARTUP.format(root=str(ROOT), preset=preset, ctor=SIDES[side])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), out[1] == "True"


def steps(preset: str, side: str, count: int, threads: int) -> tuple[float, list]:
    import time

    import torch

    from fewseg.model import build_model
    from fewseg.optim import AdamW

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(preset)
    opt = AdamW(model.parameters(), lr=1e-3) if side == "fewseg" else torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    times = []
    for _ in range(count):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times), [p.detach().clone() for p in model.parameters()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="model preset whose parameters are optimized")
    ap.add_argument("--repeats", type=int, default=5, help="fresh processes per start-up figure")
    ap.add_argument("--steps", type=int, default=50, help="updates per step figure")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    print(f"{'side':8} {'first build s (min/median/max)':34} {'imports dynamo':15} {'step ms (median)':>16}")
    weights = {}
    for side in SIDES:
        runs = [startup(args.preset, side) for _ in range(args.repeats)]
        secs = sorted(s for s, _ in runs)
        step, weights[side] = steps(args.preset, side, args.steps, args.threads)
        spread = f"{secs[0]:.3f} / {statistics.median(secs):.3f} / {secs[-1]:.3f}"
        print(f"{side:8} {spread:34} {str(any(d for _, d in runs)):15} {step * 1e3:16.2f}")
    same = all(a.equal(b) for a, b in zip(weights["fewseg"], weights["torch"], strict=True))
    print(f"weights after {args.steps} steps identical to the bit: {same}")


if __name__ == "__main__":
    main()
