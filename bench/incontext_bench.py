"""In-context ability on its own: mIoU of a pretrained model on synthetic episodes it never saw, from the prompt alone.

    python bench/incontext_bench.py                                  # the shipped tiny weights
    python bench/incontext_bench.py --weights results/pretrain/model.pt --episodes 500

Episodes are drawn like the pretraining's held-out ones (fewseg.pretrain: same-context pairs, the query half masked,
random classes and a random palette each), but from another seed, so neither their classes nor their palettes were
ever drawn in pretraining or its validation. Each row is a range of classes per scene: the pretraining's own range
first, then harder ones. Printed per row: the model's mean query mIoU, decoded with each episode's palette, beside
the prompt-blind floor (painting the prompt's most common class over the whole query).

Binary rows (``--binary``, on by default) pose the novel-class task: one class of the scene marked white, all else
black; printed is the marked class's IoU on the query beside the IoU of marking the whole query (its share).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fewseg.config import load_yaml  # noqa: E402
from fewseg.pretrain import prompt_blind_baseline, validate, validation_episodes  # noqa: E402
from fewseg.weights import load_pretrained  # noqa: E402

SHIPPED = ROOT / "resources" / "pretrain" / "tiny-incontext-8000.pt"


def episode_settings(recipe: Path | None, seed: int, episodes: int, classes: tuple[int, int]) -> dict:
    """config.yaml's pretraining section under the recipe the weights came from, with this bench's stream."""
    settings = dict(load_yaml(ROOT / "config.yaml")["pretraining"])
    if recipe is not None and recipe.is_file():
        settings.update(load_yaml(recipe).get("pretraining", {}))
    return {**settings, "seed": seed, "val_episodes": episodes, "classes": list(classes)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=SHIPPED)
    parser.add_argument(
        "--recipe",
        type=Path,
        default=None,
        help="the pretraining config the weights came from (default: <weights stem>.config.yaml)",
    )
    parser.add_argument("--episodes", type=int, default=256)
    parser.add_argument("--seed", type=int, default=20261202, help="episode stream; the pretraining used its own")
    parser.add_argument("--ranges", default="2-4,5-6,7-8", help="classes per scene, one row each")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--binary", action=argparse.BooleanOptionalAction, default=True, help="also the one-class (binary) rows"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = args.recipe or args.weights.with_name(args.weights.name.removesuffix(".pt") + ".config.yaml")
    model = load_pretrained(args.weights).eval()
    cfg = model.config
    print(f"weights {args.weights.name}: {cfg.embed_dim} wide, {cfg.depth} blocks, tile {cfg.tile_size}; "
          f"{args.episodes} unseen episodes per row (seed {args.seed}), prompt alone")  # fmt: skip
    print(f"{'episodes':>8} {'classes':>8} {'mIoU':>7} {'floor':>7} {'seconds':>8}")
    for binary in (False, True) if args.binary else (False,):
        for part in args.ranges.split(","):
            low, high = (int(x) for x in part.split("-"))
            settings = episode_settings(recipe, args.seed, args.episodes, (low, high))
            episodes = validation_episodes(settings, cfg.tile_size, cfg.grid_size, binary=binary)
            start = time.perf_counter()
            score = validate(model, episodes, args.batch_size, torch.device("cpu"), "fp32", marked_only=binary)
            floor = prompt_blind_baseline(episodes, cfg.tile_size[0], marked_only=binary)
            kind = "binary" if binary else "palette"
            print(f"{kind:>8} {part:>8} {score:7.3f} {floor:7.3f} {time.perf_counter() - start:8.1f}")


if __name__ == "__main__":
    main()
