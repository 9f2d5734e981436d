"""Launcher of data-parallel base training: one process per GPU (NCCL), or gloo processes on CPU, under torchrun.

The workflow job stays one Snakemake job: :func:`launch_train_base` writes the job's arguments to a file and runs
``python -m torch.distributed.run --standalone --nproc_per_node N -m fewseg.distributed SPEC``; every rank calls
:func:`fewseg.train.train_base`, which splits each step's global batch over the ranks and sums gradients in one
all-reduce, and rank 0 alone writes checkpoints and outputs. Killing the job kills torchrun and its workers (same
process group); a rerun resumes from rank 0's last checkpoint like a single-process run.

The collectives the ranks call during training live in :mod:`fewseg.collectives`, so that training does not import
its own launcher.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("fewseg.distributed")


def launch_train_base(processes: int, job: dict[str, Any], spec_dir: str | os.PathLike, log_handle=None) -> dict:
    """Run base training in ``processes`` data-parallel ranks under torchrun; returns rank 0's result."""
    spec_dir = Path(spec_dir)
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = spec_dir / "launch.json"
    result = spec_dir / "launch_result.json"
    result.unlink(missing_ok=True)
    spec.write_text(json.dumps({**job, "result": str(result)}, default=str))
    env = dict(os.environ)
    threads = max(1, int(env.get("OMP_NUM_THREADS", torch.get_num_threads())) // processes)
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={processes}",
        "-m", "fewseg.distributed", str(spec),
    ]  # fmt: skip
    log.info("data-parallel base training: %d processes, %d threads each: %s", processes, threads, " ".join(cmd))
    if log_handle is not None:
        log_handle.flush()
    r = subprocess.run(cmd, env=env, stdout=log_handle, stderr=subprocess.STDOUT if log_handle else None)
    if r.returncode != 0 or not result.is_file():
        raise RuntimeError(f"data-parallel base training failed (torchrun exit {r.returncode}); see the log above")
    out = json.loads(result.read_text())
    spec.unlink(missing_ok=True)
    result.unlink(missing_ok=True)
    return out


def _worker(spec_path: str) -> None:
    from fewseg.allocator import keep_freed_memory
    from fewseg.collectives import rank_and_world
    from fewseg.runtime import LogStream
    from fewseg.train import train_base

    keep_freed_memory()
    job = json.loads(Path(spec_path).read_text())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = job["settings"]["runtime"]["device"] != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank, world = rank_and_world()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s %(name)s [rank {rank}/{world}]: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    try:
        result = train_base(
            job["tiles"], job["out_model"], job["out_history"], job["out_plot"], job["checkpoint_dir"],
            job["settings"], progress_stream=LogStream(sys.stderr) if rank == 0 else None,
        )  # fmt: skip
        if rank == 0:
            Path(job["result"]).write_text(json.dumps(result, default=str))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
