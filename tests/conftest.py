"""Shared fixtures: one local run of the workflow on the test config, reused by every test that needs one, a few
train tiles for the training tests, and one intra-op thread for tests of tiny models."""

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workflow_utils import load_test_config, snakemake, write_config  # noqa: E402

CORES = 2  # the Slurm comparison runs jobs with the same thread counts


@dataclass
class LocalRun:
    workdir: Path
    config: dict
    configfile: Path
    submission: bytes  # the zip as first written

    def copy_to(self, workdir: Path) -> Path:
        """A copy of the run (results and Snakemake's records, modification times kept) for a test to change.

        Tests never change the shared run itself, so that none depends on what an earlier one did to it.
        """
        shutil.copytree(self.workdir, workdir, symlinks=True, dirs_exist_ok=True)
        return workdir


@pytest.fixture(scope="session")
def local_run(tmp_path_factory) -> LocalRun:
    workdir = tmp_path_factory.mktemp("local-run")
    config = load_test_config()
    configfile = write_config(workdir / "test-config.yaml", config)
    r = snakemake(workdir, "--cores", str(CORES), configfile=configfile)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return LocalRun(workdir, config, configfile, (workdir / "results/submission.zip").read_bytes())


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> list[dict]:
    """Six 96 px tiles of blocky class maps over noisy images: enough pairs for a few training steps."""
    import numpy as np

    from fewseg.io import write_png

    root = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(0)
    out = []
    for i in range(6):
        ids = rng.integers(0, 8, (6, 6)).repeat(16, 0).repeat(16, 1).astype(np.uint8)
        image = (ids[..., None] * 30 + rng.integers(0, 40, (96, 96, 3))).astype(np.uint8)
        write_png(root / f"t{i}.png", image)
        write_png(root / f"t{i}_label.png", ids)
        out.append({"stem": f"t{i}", "image": str(root / f"t{i}.png"), "label": str(root / f"t{i}_label.png")})
    return out


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models run faster on one intra-op thread, and do not fight a busy machine for cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
