"""Where and how a job runs the model: the device, the numeric precision, and progress bars in the job's log.

Training, inference, the stages and the benches all take these from here, so ``runtime/device`` and
``runtime/precision`` mean the same thing everywhere. torch is imported inside the functions:
:mod:`fewseg.stages` imports this module before the job has set its thread count, which torch reads once.
"""

from __future__ import annotations

import contextlib
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16")


def pick_device(device: str) -> torch.device:
    """The torch device for ``runtime/device``: ``auto`` takes CUDA when one is visible, else the CPU."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime/device is 'cuda' but no CUDA device is visible")
    return torch.device(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """A fresh context for ``runtime/precision``: bf16 autocast on ``device``'s type, or nothing for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"runtime/precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16":
        import torch

        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class LogStream:
    """File-like sink for tqdm that writes each refresh as a line of the job's log (no carriage returns)."""

    def __init__(self, handle: IO[str]) -> None:
        self.handle = handle

    def write(self, text: str) -> None:
        text = text.replace("\r", "\n").strip("\n")
        if text.strip():
            self.handle.write(text + "\n")
            self.handle.flush()

    def flush(self) -> None:
        self.handle.flush()
