"""runtime/precision: auto picks bf16 exactly where the hardware computes it natively, and says why."""

import logging

import pytest
import torch

import fewseg.runtime
from fewseg.runtime import autocast, cpu_bf16_flags, freeze_for_precision, native_bf16, resolve_precision

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


def test_frozen_matrix_weights_are_cast_once_with_identical_results():
    """A frozen model under bf16 holds its linear and conv weights in bf16, and predicts exactly what autocast gives."""
    from fewseg.data import query_half_patches
    from fewseg.model import build_model

    torch.manual_seed(0)
    model = build_model("micro").eval().requires_grad_(False)
    h, w = model.config.canvas_size
    images, labels = torch.randn(2, 3, h, w), torch.randn(2, 3, h, w)
    mask = torch.from_numpy(query_half_patches(model.config.grid_size))[None]
    with torch.inference_mode(), autocast(CPU, "bf16"):
        want = model(images, labels, mask).float()
    assert freeze_for_precision(model, CPU, "fp32").blocks[0].attn.qkv.weight.dtype == torch.float32  # fp32: no cast
    frozen = freeze_for_precision(model, CPU, "bf16")
    assert frozen.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert frozen.decoder_pred[0].weight.dtype == frozen.patch_embed.proj.bias.dtype == torch.bfloat16
    # What autocast keeps in fp32 stays fp32: layer norms, tokens, position tables.
    kept = (frozen.norm.weight, frozen.pos_embed, frozen.blocks[0].attn.rel_pos_h, frozen.mask_token)
    assert all(t.dtype == torch.float32 for t in kept)
    with torch.inference_mode(), autocast(CPU, "bf16"):
        got = frozen(images, labels, mask).float()
    assert torch.equal(got, want)
