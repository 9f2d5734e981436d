"""Kill the workflow with SIGKILL mid-training, rerun it, and get exactly what an uninterrupted run gives."""

import os
import signal
import subprocess
import sys
import time

import pytest
from workflow_utils import SNAKEFILE, snakemake, write_config

from fewseg.checkpoints import load_base_model

pytestmark = pytest.mark.workflow


def _start(workdir, configfile) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), "--configfile", str(configfile),
        "--cores", "2", "--rerun-incomplete",
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=os.environ.copy()
    )


def _kill_when(proc: subprocess.Popen, paths, timeout: float = 600) -> str:
    """SIGKILL snakemake and its jobs as soon as any of ``paths`` (globs) exists; returns the one seen."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pattern in paths:
            hits = sorted(proc.workdir.glob(pattern))
            if hits:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return str(hits[0].relative_to(proc.workdir))
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before reaching {paths}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"{paths} never appeared")


def test_killed_runs_resume_to_the_same_result(local_run, tmp_path):
    configfile = write_config(tmp_path / "test-config.yaml", local_run.config)
    # 1: kill during base training, right after its first checkpoint
    proc = _start(tmp_path, configfile)
    proc.workdir = tmp_path
    seen = _kill_when(proc, ["results/checkpoints/base/resume.pt"])
    assert seen.endswith("resume.pt")
    assert not (tmp_path / "results/models/base.pt").exists()
    # 2: a killed snakemake leaves its lock behind: unlock as a user would, rerun, kill again while a prompt trains
    assert snakemake(tmp_path, "--unlock", configfile=configfile).returncode == 0
    proc = _start(tmp_path, configfile)
    proc.workdir = tmp_path
    _kill_when(proc, ["results/checkpoints/prompt_*/phase1_resume.pt", "results/checkpoints/prompt_*/phase2_resume.pt"])
    # 3: rerun to completion
    assert snakemake(tmp_path, "--unlock", configfile=configfile).returncode == 0
    r = snakemake(tmp_path, "--cores", "2", "--rerun-incomplete", configfile=configfile)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "results/logs/train_base.log").read_text()
    assert "resuming base training at step" in log
    resumed, _ = load_base_model(tmp_path / "results/models/base.pt")
    reference, _ = load_base_model(local_run.workdir / "results/models/base.pt")
    for (name, a), (_, b) in zip(resumed.state_dict().items(), reference.state_dict().items(), strict=True):
        assert (a == b).all(), f"{name} differs after resume"
    assert (tmp_path / "results/submission.zip").read_bytes() == local_run.submission
    # nothing half-written anywhere
    assert not [p for p in (tmp_path / "results").rglob("*") if ".part" in p.name]
