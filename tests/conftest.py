"""Shared fixtures: one local run of the workflow on the test config, reused by every test that needs one."""

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
    submission: bytes  # the zip as first written, before any test changes the config and reruns


@pytest.fixture(scope="session")
def local_run(tmp_path_factory) -> LocalRun:
    workdir = tmp_path_factory.mktemp("local-run")
    config = load_test_config()
    configfile = write_config(workdir / "test-config.yaml", config)
    r = snakemake(workdir, "--cores", str(CORES), configfile=configfile)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return LocalRun(workdir, config, configfile, (workdir / "results/submission.zip").read_bytes())
