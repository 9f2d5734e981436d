"""Where and how a job runs the model: the device, the numeric precision, and progress bars in the job's log.

Training, inference, the stages and the benches all take these from here, so ``runtime/device`` and
``runtime/precision`` mean the same thing everywhere. torch is imported inside the functions:
:mod:`fewseg.stages` imports this module before the job has set its thread count, which torch reads once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fewseg.runtime")

PRECISIONS = ("auto", "fp32", "bf16")
# CPU flags of native bf16 matrix products: AVX512-BF16 (dot products) and AMX (tiles). Without them PyTorch
# emulates bf16 through fp32, which is slower than fp32 itself.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def pick_device(device: str) -> torch.device:
    """The torch device for ``runtime/device``: ``auto`` takes CUDA when one is visible, else the CPU."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime/device is 'cuda' but no CUDA device is visible")
    return torch.device(device)


def cpu_bf16_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """The native-bf16 flags this CPU reports (empty where there are none, or no /proc/cpuinfo)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return [f for f in CPU_BF16_FLAGS if f in flags]


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and why (for the job's log)."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} supports bf16"
        return False, f"{name} has no native bf16"
    if device.type == "cpu":
        flags = cpu_bf16_flags()
        if flags:
            return True, f"the CPU has {' and '.join(flags)}"
        return False, "the CPU has neither " + " nor ".join(CPU_BF16_FLAGS) + " (bf16 would be emulated)"
    return False, f"no bf16 check for {device.type} devices"


@functools.cache
def _auto_precision(device: torch.device) -> str:
    native, why = native_bf16(device)
    chosen = "bf16" if native else "fp32"
    log.info("runtime/precision auto: %s on %s, because %s", chosen, device, why)
    return chosen


def resolve_precision(device: torch.device, precision: str) -> str:
    """``fp32`` or ``bf16`` for ``runtime/precision``: ``auto`` is bf16 where ``device`` does bf16 natively (CUDA
    with bf16, CPUs with AVX512-BF16 or AMX) and fp32 elsewhere; the first resolution is logged with its reason."""
    if precision not in PRECISIONS:
        raise ValueError(f"runtime/precision must be one of {PRECISIONS}, got {precision!r}")
    return _auto_precision(device) if precision == "auto" else precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """A fresh context for ``runtime/precision``: bf16 autocast on ``device``'s type, or nothing for fp32.

    Under bf16 autocast the matrix products run in bf16 while what bf16 would hurt stays fp32: layer norms and the
    softmax statistics inside ``scaled_dot_product_attention`` are kept in fp32 by PyTorch, and the callers take the
    loss and the palette decode on ``.float()`` predictions.
    """
    if resolve_precision(device, precision) == "bf16":
        import torch

        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype of the matrix products under ``runtime/precision``: bfloat16 for bf16, else float32."""
    import torch

    return torch.bfloat16 if resolve_precision(device, precision) == "bf16" else torch.float32


def freeze_for_precision(model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    """Hold the matrix weights of a model that will not train in the dtype autocast would cast them to.

    Autocast keeps its cast copies only of weights that require a gradient, so a frozen model's weights (inference,
    prompt training) are cast again at every call: on the tiny preset that is a quarter of a bf16 forward. Casting
    the linear and convolution weights once gives bit-identical results, since autocast rounds them the same way;
    layer norms, tokens, position tables and the fp32 residual stream are left as they are. No-op under fp32.
    """
    import torch

    if resolve_precision(device, precision) != "bf16":
        return model
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            module.to(torch.bfloat16)
    return model


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
