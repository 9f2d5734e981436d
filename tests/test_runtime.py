"""runtime/precision: auto picks bf16 exactly where the hardware computes it natively, and says why."""

import logging

import pytest
import torch

import fewseg.runtime
from fewseg.runtime import autocast, cpu_bf16_flags, native_bf16, resolve_precision

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_resolution():
    fewseg.runtime._auto_precision.cache_clear()
    yield
    fewseg.runtime._auto_precision.cache_clear()


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {flags}\n\nprocessor\t: 1\nflags\t\t: fpu {flags}\n")
    return path


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    assert cpu_bf16_flags(_cpuinfo(tmp_path, "avx512f avx512_bf16")) == ["avx512_bf16"]
    assert cpu_bf16_flags(_cpuinfo(tmp_path, "amx_bf16 avx512_bf16 amx_tile")) == ["avx512_bf16", "amx_bf16"]
    assert cpu_bf16_flags(_cpuinfo(tmp_path, "avx512f avx512bw")) == []
    assert cpu_bf16_flags(tmp_path / "absent") == []


@pytest.mark.parametrize(
    ("flags", "chosen", "reason"),
    [
        (["avx512_bf16"], "bf16", "the CPU has avx512_bf16"),
        (["amx_bf16"], "bf16", "the CPU has amx_bf16"),
        ([], "fp32", "the CPU has neither avx512_bf16 nor amx_bf16"),
    ],
)
def test_auto_is_bf16_only_with_native_support_and_logs_why(monkeypatch, caplog, flags, chosen, reason):
    monkeypatch.setattr(fewseg.runtime, "cpu_bf16_flags", lambda: flags)
    with caplog.at_level(logging.INFO, logger="fewseg.runtime"):
        assert resolve_precision(CPU, "auto") == chosen
        assert resolve_precision(CPU, "auto") == chosen
    lines = [r.getMessage() for r in caplog.records if "runtime/precision auto" in r.getMessage()]
    assert len(lines) == 1 and chosen in lines[0] and reason in lines[0]  # said once per process, with the reason


def test_explicit_precisions_stay_as_given(monkeypatch):
    monkeypatch.setattr(fewseg.runtime, "cpu_bf16_flags", lambda: [])
    assert resolve_precision(CPU, "bf16") == "bf16" and resolve_precision(CPU, "fp32") == "fp32"
    with pytest.raises(ValueError, match="runtime/precision must be one of"):
        resolve_precision(CPU, "fp16")


def test_autocast_follows_the_resolution(monkeypatch):
    x = torch.randn(4, 4)
    monkeypatch.setattr(fewseg.runtime, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    with autocast(CPU, "auto"):
        assert (x @ x).dtype == torch.bfloat16
    fewseg.runtime._auto_precision.cache_clear()
    monkeypatch.setattr(fewseg.runtime, "cpu_bf16_flags", lambda: [])
    with autocast(CPU, "auto"):
        assert (x @ x).dtype == torch.float32


def test_this_machine_is_described():
    native, why = native_bf16(CPU)
    assert isinstance(native, bool) and why.startswith("the CPU has")
