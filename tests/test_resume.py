"""Kill the whole workflow with SIGKILL inside each heavy rule, rerun the same command, and get exactly what an
uninterrupted run gives; two runs started at once on one folder: one runs, the other is refused."""

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from workflow_utils import SNAKEFILE, write_config

from fewseg.checkpoints import load_base_model

pytestmark = pytest.mark.workflow

# The kill points, in the order a run reaches them, each a glob that exists only while that rule is running:
# a training checkpoint written by the job, or the temporary folder of an inference job's output.
KILL_POINTS = {
    "base training": ["results/checkpoints/base/resume.pt"],
    "a prompt phase": [
        "results/checkpoints/prompt_*/phase1_resume.pt",
        "results/checkpoints/prompt_*/phase2_resume.pt",
    ],
    "base inference": ["results/predictions/.base.*.part"],
    "novel inference": ["results/predictions/.novel_*.part"],
}


def _start(workdir, configfile) -> subprocess.Popen:
    """The user's command, the same every time: no --unlock, no --rerun-incomplete. Output goes to a file (a pipe
    nobody reads while the run goes on would fill up and stall it)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), "--configfile", str(configfile),
           "--cores", "2"]  # fmt: skip
    log = tempfile.NamedTemporaryFile("w+", prefix="snakemake-", suffix=".log", dir=workdir, delete=False)  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir)
    proc.log_path = log.name
    log.close()
    return proc


def _output(proc: subprocess.Popen) -> str:
    with open(proc.log_path) as fh:
        return fh.read()


def _kill_at_first(proc: subprocess.Popen, workdir, points: dict, timeout: float = 600) -> list[str]:
    """SIGKILL snakemake and all its jobs as soon as any kill point's glob exists; returns the points reached."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        reached = [name for name, patterns in points.items() if any(any(workdir.glob(p)) for p in patterns)]
        if reached:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return reached
        if proc.poll() is not None:
            tail = _output(proc)[-2000:]
            raise AssertionError(f"the run ended (exit {proc.returncode}) before reaching {list(points)}: {tail}")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"{list(points)} never reached")


def test_killed_runs_resume_to_the_same_result(local_run, tmp_path):
    configfile = write_config(tmp_path / "test-config.yaml", local_run.config)
    remaining = dict(KILL_POINTS)  # heavy jobs take both cores, so they run one at a time, in Snakemake's order
    while remaining:
        for name in _kill_at_first(_start(tmp_path, configfile), tmp_path, remaining):
            del remaining[name]
    assert not (tmp_path / "results/submission.zip").exists()

    # two runs started at once on the killed run's folder: exactly one goes on, the other is refused at once
    first, second = _start(tmp_path, configfile), _start(tmp_path, configfile)
    first.wait(timeout=900), second.wait(timeout=900)
    outcomes = sorted([(first.returncode, _output(first)), (second.returncode, _output(second))], key=lambda r: r[0])
    (ok_code, ok_out), (refused_code, refused_out) = outcomes
    assert ok_code == 0, ok_out[-3000:]
    assert refused_code != 0 and "another run of this workflow is using" in refused_out, refused_out[-3000:]

    log = (tmp_path / "results/logs/train_base.log").read_text()
    assert "resuming base training at step" in log
    resumed, _ = load_base_model(tmp_path / "results/models/base.pt")
    reference, _ = load_base_model(local_run.workdir / "results/models/base.pt")
    for (name, a), (_, b) in zip(resumed.state_dict().items(), reference.state_dict().items(), strict=True):
        assert (a == b).all(), f"{name} differs after resume"
    assert (tmp_path / "results/submission.zip").read_bytes() == local_run.submission
    # nothing half-written anywhere: the killed jobs' temporary files were cleared by their reruns
    assert not [p for p in (tmp_path / "results").rglob("*") if ".part" in p.name]


def test_a_second_run_is_refused_while_the_first_works(local_run, tmp_path):
    configfile = write_config(tmp_path / "test-config.yaml", local_run.config)
    first = _start(tmp_path, configfile)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "results/checkpoints/base").exists():
            assert first.poll() is None and time.time() < deadline, "base training never started"
            time.sleep(0.05)
        second = _start(tmp_path, configfile)
        second.wait(timeout=300)
        out = _output(second)
        assert second.returncode != 0
        assert f"another run of this workflow is using {tmp_path}" in out, out[-3000:]
        assert f"pid {first.pid}" in out
        assert first.poll() is None, "the refused run must not disturb the first"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
