"""Time the whole-dataset check on a synthetic folder of many tiles: first run, cached rerun, and the time from
`snakemake` start to the error for one truncated query tile (before any training job).

    python bench/validate_bench.py --tiles 2000 --size 512

Tiles are random GeoTIFFs in the challenge layout (train labels 0-7; one novel class per support label), written
once under --work. Prints seconds for each figure.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fewseg.validate import DatasetSpec, validate_dataset  # noqa: E402


def _write(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "height": data.shape[1], "width": data.shape[2], "count": data.shape[0],
               "dtype": "uint8", "compress": "deflate"}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def make_dataset(root: Path, tiles: int, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n_train = tiles // 2
    n_support = 5
    for i in range(n_train):
        _write(root / f"trainset/images/t{i:05d}.tif", rng.integers(0, 255, (3, size, size), dtype=np.uint8))
        _write(root / f"trainset/labels/t{i:05d}.tif", rng.integers(0, 8, (1, size, size), dtype=np.uint8))
    for i in range(tiles - n_train):
        stem = f"q{i:05d}"
        _write(root / f"testset/images/{stem}.tif", rng.integers(0, 255, (3, size, size), dtype=np.uint8))
        if i < 4 * n_support:
            label = np.zeros((1, size, size), np.uint8)
            label[0, : size // 4, : size // 4] = 8 + i // n_support
            _write(root / f"testset/labels/{stem}.tif", label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fewseg-validate-bench")
    args = parser.parse_args()
    root = args.work / f"data-{args.tiles}-{args.size}"
    if not root.exists():
        t = time.perf_counter()
        make_dataset(root, args.tiles, args.size)
        print(f"wrote {args.tiles} tiles of {args.size} px in {time.perf_counter() - t:.1f} s")
    dataset = {"train_dir": "trainset", "test_dir": "testset", "shots": 5, "ignore_index": 255,
               "split_lists": None, "query_labels": None}  # fmt: skip
    spec = DatasetSpec.from_settings(root, {"dataset": dataset, "base": list(range(1, 8)), "novel": [8, 9, 10, 11]})
    cache = args.work / "cache.json"
    cache.unlink(missing_ok=True)
    for label in ("first check (nothing cached)", "rerun (all cached)"):
        t = time.perf_counter()
        summary = validate_dataset(spec, cache_path=cache)
        print(f"{label}: {time.perf_counter() - t:.2f} s ({summary['files_read']} files read)")

    # one truncated query tile, through the workflow: time from start to the error, and which jobs ran
    bad = args.work / "bad"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(root, bad / "data")
    query = sorted((bad / "data/testset/images").glob("q*.tif"))[-1]
    query.write_bytes(query.read_bytes()[: query.stat().st_size // 2])
    config = yaml.safe_load((ROOT / "tests/config.test.yaml").read_text())
    config["dataset"] |= {"source": "folder", "root": str(bad / "data"), "query_labels": None, "shots": 5}
    (bad / "config.yaml").write_text(yaml.safe_dump(config))
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(bad), "--configfile",
         str(bad / "config.yaml"), "--cores", "2"],
        capture_output=True, text=True,
    )  # fmt: skip
    elapsed = time.perf_counter() - t
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("fewseg error")]
    jobs = sorted(p.stem for p in (bad / "results/logs").glob("*.log"))
    print(f"snakemake start to error for a truncated query tile: {elapsed:.1f} s (exit {r.returncode})")
    print(f"  jobs that ran: {', '.join(jobs)}")
    print(f"  {errors[0] if errors else '(no fewseg error line)'}")


if __name__ == "__main__":
    main()
