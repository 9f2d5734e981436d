"""Helpers to run the workflow in a scratch directory with a given config."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SNAKEFILE = ROOT / "Snakefile"
TEST_CONFIG = ROOT / "tests" / "config.test.yaml"


def load_test_config() -> dict:
    with open(TEST_CONFIG) as fh:
        return yaml.safe_load(fh)


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake(
    workdir: Path, *args: str, configfile: Path | None = None, timeout: int = 900, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run snakemake on the repository's Snakefile with ``workdir`` as working directory."""
    cmd = [
        sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir),
        "--configfile", str(configfile or TEST_CONFIG), *args,
    ]  # fmt: skip
    run_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=run_env)


def job_counts(output: str) -> dict[str, int]:
    """Rule -> job count from snakemake's "Job stats" table (dry run or real run)."""
    counts: dict[str, int] = {}
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("job") and "count" in line:
            for row in lines[i + 2 :]:
                m = re.match(r"^(\S+)\s+(\d+)$", row.strip())
                if not m:
                    break
                if m.group(1) != "total":
                    counts[m.group(1)] = int(m.group(2))
            break
    return counts


def planned_jobs(workdir: Path, configfile: Path) -> dict[str, int]:
    r = snakemake(workdir, "-n", "--cores", "1", configfile=configfile)
    assert r.returncode == 0, r.stdout + r.stderr
    return job_counts(r.stdout + r.stderr)


def output_mtimes(workdir: Path) -> dict[str, float]:
    """Modification time of every file under results/ except logs, benchmarks and checkpoints."""
    out = {}
    results = workdir / "results"
    for path in results.rglob("*"):
        rel = path.relative_to(workdir).as_posix()
        if path.is_file() and not re.match(r"results/(logs|benchmarks|checkpoints)/", rel):
            out[rel] = path.stat().st_mtime_ns
    return out


def modified(config: dict, changes: dict) -> dict:
    """A deep copy of ``config`` with dotted-path changes applied, e.g. ``{"overlay.order": [8, 9]}``."""
    config = copy.deepcopy(config)
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[int(key) if key.isdigit() and int(key) in node else key]
        node[int(last) if last.isdigit() and int(last) in node else last] = value
    return config


def rewrite_raster(path: Path, fn, **profile_changes) -> None:
    """Rewrite a GeoTIFF with ``fn`` applied to its (bands, H, W) pixels: how the bad-input tests damage a tile."""
    import rasterio

    with rasterio.open(path) as src:
        data, profile = src.read(), src.profile
    data = fn(data)
    profile.update(count=data.shape[0], height=data.shape[1], width=data.shape[2], dtype=data.dtype.name)
    profile.update(profile_changes)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def support_label_of(root: Path, cls: int) -> Path:
    """The first support label (in <root>/testset/labels) that shows class ``cls``."""
    import numpy as np
    import rasterio

    for path in sorted((root / "testset/labels").glob("*.tif")):
        with rasterio.open(path) as src:
            if cls in np.unique(src.read(1)):
                return path
    raise AssertionError(f"no support tile of class {cls}")
