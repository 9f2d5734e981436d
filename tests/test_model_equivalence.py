"""fewseg's SegGPT against the transformers reference (SegGptForImageSegmentation), weight by weight.

transformers is a test dependency: these tests must run, not skip.
"""

import pytest
import torch
from transformers import SegGptConfig, SegGptForImageSegmentation

from fewseg.data import query_half_patches
from fewseg.model import PRESETS, SegGPT
from fewseg.weights import (
    WeightsError,
    checkpoint_filter_fn,
    convert_main,
    detect_format,
    infer_config,
    load_pretrained,
    load_state_dict,
    to_hf_state_dict,
    to_painter_state_dict,
)


def query_half_mask(config, batch: int = 1) -> torch.Tensor:
    """The inference mask as the model takes it: (batch, num_patches) bool."""
    return torch.from_numpy(query_half_patches(config.grid_size)).repeat(batch, 1)


ATOL = 1e-4

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: see conftest.py

# Two small reference architectures differing in depth, width, heads, patch, canvas, merge index,
# feature layers, MLP width and qkv bias.
HF_CONFIGS = {
    "a": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=[128, 64],
        patch_size=16,
        pretrain_image_size=32,
        merge_index=1,
        intermediate_hidden_state_indices=[1, 3],
        decoder_hidden_size=16,
    ),
    "b": dict(
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=[64, 64],
        patch_size=8,
        pretrain_image_size=24,
        merge_index=0,
        intermediate_hidden_state_indices=[0, 1, 2],
        decoder_hidden_size=8,
        mlp_dim=96,
        qkv_bias=False,
    ),
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Random values for every parameter, including those initialised to zeros or ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "rel_pos" in name:
                p.copy_(0.3 * noise)
            elif p.ndim >= 2 and "embeddings." not in name:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.2 * noise)


def _build_pair(key: str):
    cfg = HF_CONFIGS[key]
    hf_config = SegGptConfig(drop_path_rate=0.0, **cfg)
    torch.manual_seed(0)
    hf = SegGptForImageSegmentation(hf_config).eval()
    _randomise(hf, seed=len(key) + ord(key[0]))
    hf_state = hf.state_dict()
    config = infer_config(
        hf_state,
        merge_index=cfg["merge_index"],
        feature_layers=tuple(cfg["intermediate_hidden_state_indices"]),
        drop_path_rate=0.0,
    )
    ours = SegGPT(config).eval()
    load_state_dict(ours, hf_state)
    return hf, ours


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def pair(request):
    return _build_pair(request.param)


def _inputs(hf, batch: int, seed: int, shared_query: bool = False):
    """Query image, prompt image, prompt mask and query label, each (B, 3, h, w)."""
    g = torch.Generator().manual_seed(seed)
    h, w = hf.config.image_size
    shape = (batch, 3, h // 2, w)
    query = torch.randn(shape, generator=g)
    if shared_query:
        query = query[:1].expand(shape).contiguous()
    return query, torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _compare(
    hf,
    ours,
    batch,
    seed,
    *,
    mask=None,
    with_labels=False,
    feature_ensemble=False,
    shared_query=False,
    embedding_type="semantic",
):
    query, prompt_img, prompt_mask, label = _inputs(hf, batch, seed, shared_query)
    with torch.no_grad():
        out = hf(
            pixel_values=query,
            prompt_pixel_values=prompt_img,
            prompt_masks=prompt_mask,
            bool_masked_pos=mask,
            feature_ensemble=feature_ensemble,
            embedding_type=embedding_type,
            labels=label if with_labels else None,
        )
        images = torch.cat((prompt_img, query), dim=2)
        labels = torch.cat((prompt_mask, label if with_labels else prompt_mask), dim=2)
        our_mask = query_half_mask(ours.config) if mask is None else mask
        pred = ours(images, labels, our_mask, feature_ensemble=feature_ensemble, embedding_type=embedding_type)
    assert pred.shape == out.pred_masks.shape
    diff = (pred - out.pred_masks).abs().max().item()
    assert diff <= ATOL, diff
    assert out.pred_masks.abs().mean() > 1e-2  # a meaningful comparison, not of near-zeros
    if with_labels:
        loss = ours.loss(pred, labels, our_mask)
        assert torch.allclose(loss, out.loss, rtol=1e-5, atol=1e-6), (loss.item(), out.loss.item())
    return pred


def test_one_prompt_inference_mask(pair):
    hf, ours = pair
    _compare(hf, ours, batch=1, seed=1)


def test_instance_embedding(pair):
    hf, ours = pair
    _compare(hf, ours, batch=1, seed=2, embedding_type="instance")


def test_feature_ensemble_eight_prompts(pair):
    hf, ours = pair
    pred = _compare(hf, ours, batch=8, seed=3, feature_ensemble=True, shared_query=True)
    h = pred.shape[2] // 2
    assert torch.allclose(pred[:, :, h + 1 :], pred[:1, :, h + 1 :].expand(8, -1, -1, -1), atol=1e-5)


def test_feature_ensemble_one_prompt(pair):
    # The reference averages the two streams in block merge_index even for a single prompt.
    hf, ours = pair
    _compare(hf, ours, batch=1, seed=4, feature_ensemble=True)


def test_training_mask_with_labels(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(5)
    n = ours.config.num_patches
    mask = torch.rand(3, n, generator=g).argsort(1).argsort(1) < round(0.7 * n)
    _compare(hf, ours, batch=3, seed=5, mask=mask, with_labels=True)


def test_inference_mask_with_labels(pair):
    hf, ours = pair
    _compare(hf, ours, batch=1, seed=6, with_labels=True)
    # With a batch, give the reference the per-item mask: for a broadcast batch-1 mask it divides by a
    # single item's pixel count, while fewseg always returns the mean.
    _compare(hf, ours, batch=2, seed=7, mask=query_half_mask(ours.config, batch=2), with_labels=True)


def test_gradients_match():
    hf, ours = _build_pair("a")
    hf.train(), ours.train()
    query, prompt_img, prompt_mask, label = _inputs(hf, 2, seed=8)
    g = torch.Generator().manual_seed(8)
    mask = torch.rand(2, ours.config.num_patches, generator=g) < 0.7
    out = hf(query, prompt_img, prompt_mask, bool_masked_pos=mask, embedding_type="semantic", labels=label)
    out.loss.backward()
    images = torch.cat((prompt_img, query), dim=2)
    labels = torch.cat((prompt_mask, label), dim=2)
    ours.loss(ours(images, labels, mask), labels, mask).backward()
    ours_by_hf_name = to_hf_state_dict(dict(ours.named_parameters()))
    assert ours_by_hf_name.keys() == dict(hf.named_parameters()).keys()
    for name, p in hf.named_parameters():
        ours_grad = ours_by_hf_name[name].grad
        if p.grad is None:  # the unused instance type token
            assert ours_grad is None, name
            continue
        scale = p.grad.abs().max().clamp_min(1e-6)
        assert (ours_grad - p.grad).abs().max() / scale < 1e-4, name
    assert ours.blocks[0].attn.rel_pos_w.grad.abs().sum() > 0


def test_state_dict_conversions_round_trip(pair):
    hf, ours = pair
    hf_state = hf.state_dict()
    assert detect_format(hf_state) == "hf"
    ours_state = ours.state_dict()
    assert detect_format(ours_state) == "fewseg"
    back = to_hf_state_dict(ours_state)
    assert back.keys() == hf_state.keys()
    assert all(torch.equal(back[k], hf_state[k]) for k in hf_state)
    painter = to_painter_state_dict(hf_state)
    assert detect_format(painter) == "painter" and set(painter) == {"model"}
    converted = checkpoint_filter_fn(painter)
    assert converted.keys() == ours_state.keys()
    assert all(torch.equal(converted[k], ours_state[k]) for k in ours_state)


def test_painter_layout_matches_reference():
    hf, _ = _build_pair("a")
    painter = to_painter_state_dict(hf.state_dict())
    config = infer_config(painter, merge_index=1, feature_layers=(1, 3), drop_path_rate=0.0)
    ours = load_state_dict(SegGPT(config).eval(), painter)
    _compare(hf, ours, batch=2, seed=9, feature_ensemble=True, shared_query=True)


@pytest.mark.parametrize(
    ("layout", "suffix"),
    [("hf", ".safetensors"), ("painter", ".pth"), ("fewseg", ".safetensors"), ("hf", ".bin")],
)
def test_load_pretrained_files(tmp_path, layout, suffix):
    hf, _ = _build_pair("b")
    src = tmp_path / "src_hf.pth"
    torch.save(hf.state_dict(), src)
    out = tmp_path / f"weights_{layout}{suffix}"
    assert convert_main([str(src), str(out), "--to", layout]) == 0
    ours = load_pretrained(out, merge_index=0, feature_layers=(0, 1, 2), drop_path_rate=0.0).eval()
    assert ours.config == infer_config(hf.state_dict(), merge_index=0, feature_layers=(0, 1, 2), drop_path_rate=0.0)
    _compare(hf, ours, batch=2, seed=10, feature_ensemble=True, shared_query=True)


def test_infer_config_defaults():
    hf, _ = _build_pair("a")
    cfg = infer_config(hf.state_dict())
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size) == (64, 4, 4, 16)
    assert cfg.tile_size == (64, 64) and cfg.canvas_size == (128, 64) and cfg.pretrain_grid == 2
    assert cfg.decoder_dim == 16 and cfg.mlp_ratio == 4.0 and cfg.qkv_bias
    assert cfg.feature_layers == (1, 3)  # (i + 1) * depth // n - 1
    assert cfg.merge_index == 1  # 2 lowered to the first feature layer
    cfg_b = infer_config(_build_pair("b")[0].state_dict())
    assert cfg_b.mlp_ratio == 2.0 and not cfg_b.qkv_bias and cfg_b.patch_size == 8


def test_load_with_other_tile_size_resamples_tables(tmp_path):
    hf, _ = _build_pair("a")
    path = tmp_path / "a.safetensors"
    convert_main([_save_hf(hf, tmp_path), str(path)])
    model = load_pretrained(path, merge_index=1, tile_size=(32, 32), pretrain_grid=3)
    assert model.blocks[0].attn.rel_pos_h.shape[0] == 2 * 4 - 1
    assert model.pos_embed.shape == (1, 1 + 3 * 3, 64)
    h, w = model.config.canvas_size
    with torch.no_grad():
        pred = model(torch.randn(1, 3, h, w), torch.randn(1, 3, h, w), query_half_mask(model.config))
    assert pred.shape == (1, 3, 64, 32)


def _save_hf(hf, tmp_path) -> str:
    path = tmp_path / "hf.pth"
    torch.save(hf.state_dict(), path)
    return str(path)


def test_junk_raises_weights_error(tmp_path):
    junk = {"encoder.weight": torch.zeros(3, 3), "head.bias": torch.zeros(3)}
    path = tmp_path / "junk.pth"
    torch.save(junk, path)
    with pytest.raises(WeightsError) as err:
        load_pretrained(path)
    msg = str(err.value)
    assert str(path) in msg and "missing keys" in msg and "unexpected keys" in msg
    assert "patch_embed.proj.weight" in msg and "encoder.weight" in msg
    hf, ours = _build_pair("a")
    with pytest.raises(WeightsError) as err:
        load_pretrained(path, config=ours.config)
    assert "blocks.3.mlp.fc2.weight" in str(err.value) or "more" in str(err.value)
    assert "head.bias" in str(err.value)
    assert isinstance(err.value, ValueError)
    assert convert_main([str(path), str(tmp_path / "out.pth")]) == 1
    assert not (tmp_path / "out.pth").exists()


def test_mismatching_checkpoint_lists_keys(tmp_path):
    hf, ours = _build_pair("a")
    state = ours.state_dict()
    del state["blocks.2.attn.proj.bias"]
    state["blocks.2.attn.extra"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        load_pretrained(path, merge_index=1)
    msg = str(err.value)
    assert str(path) in msg and "blocks.2.attn.proj.bias" in msg and "blocks.2.attn.extra" in msg
    # Same file against a model of another size: shape mismatches are reported, not a RuntimeError.
    _, other = _build_pair("b")
    with pytest.raises(WeightsError, match="shape mismatches"):
        load_pretrained(path, config=other.config)


def test_training_checkpoint_with_arguments(tmp_path):
    import argparse

    hf, ours = _build_pair("a")
    path = tmp_path / "train.pth"
    torch.save({"model": ours.state_dict(), "epoch": 3, "args": argparse.Namespace(lr=1e-3)}, path)
    loaded = load_pretrained(path, merge_index=1)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        load_pretrained(tmp_path / "no_such.pth")


def test_unreadable_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="bad.safetensors"):
        load_pretrained(path)


def test_vit_large_layout_matches_reference():
    # Shapes only (meta device): the released architecture maps one to one, and is inferred exactly.
    with torch.device("meta"):
        hf = SegGptForImageSegmentation(SegGptConfig())
        ours = SegGPT(PRESETS["vit_large"])
    hf_state = hf.state_dict()
    assert infer_config(hf_state) == PRESETS["vit_large"]
    converted, expected = checkpoint_filter_fn(hf_state), ours.state_dict()
    assert converted.keys() == expected.keys()
    assert all(converted[k].shape == expected[k].shape for k in expected)
