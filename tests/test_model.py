"""Unit tests for the SegGPT model: shapes, loss masking, feature ensemble, checkpointing, autocast."""

import copy
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fewseg.data import query_half_patches, random_patches
from fewseg.model import (
    PRESETS,
    RelPosAttention,
    SegGPTConfig,
    _bias_rows,
    _explicit_blocks,
    build_model,
    count_parameters,
    fingerprint,
    get_rel_pos,
    key_positions,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread for tiny models


def _canvases(config: SegGPTConfig, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, w = config.canvas_size
    return torch.randn(batch, 3, h, w, generator=g), torch.randn(batch, 3, h, w, generator=g)


def query_half_mask(config: SegGPTConfig, batch: int = 1) -> torch.Tensor:
    return torch.from_numpy(query_half_patches(config.grid_size)).repeat(batch, 1)


def random_mask(config: SegGPTConfig, batch: int, ratio: float, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([random_patches(config.grid_size, ratio, rng) for _ in range(batch)]))


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return build_model("micro").eval()


@pytest.mark.parametrize("preset", ["micro", "tiny"])
def test_forward_shapes(preset):
    torch.manual_seed(0)
    model = build_model(preset).eval()
    cfg = model.config
    images, labels = _canvases(cfg, 2)
    with torch.no_grad():
        pred = model(images, labels, query_half_mask(cfg))
        pred_b = model(images, labels, random_mask(cfg, 2, 0.5, seed=0), embedding_type="instance")
    assert pred.shape == (2, 3, *cfg.canvas_size)
    assert pred_b.shape == pred.shape
    assert torch.isfinite(pred).all()


def test_config_geometry():
    cfg = PRESETS["vit_large"]
    assert cfg.canvas_size == (896, 448)
    assert cfg.grid_size == (56, 28)
    assert cfg.num_patches == 56 * 28
    with pytest.raises(ValueError):
        SegGPTConfig(merge_index=6)  # after the first feature layer
    with pytest.raises(ValueError):
        SegGPTConfig(tile_size=(100, 448))


def test_vit_large_parameter_count():
    # Built on the meta device: shapes only, nothing allocated.
    with torch.device("meta"):
        model = build_model("vit_large")
    assert 3.6e8 <= count_parameters(model) <= 3.8e8


def test_parameter_names_follow_painter(micro):
    names = set(micro.state_dict())
    for key in [
        "patch_embed.proj.weight",
        "mask_token",
        "segment_token_x",
        "segment_token_y",
        "type_token_cls",
        "type_token_ins",
        "pos_embed",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.rel_pos_h",
        "blocks.0.norm1.weight",
        "blocks.0.mlp.fc1.weight",
        "norm.weight",
        "decoder_embed.weight",
        "decoder_pred.0.weight",
        "decoder_pred.1.weight",
        "decoder_pred.3.weight",
    ]:
        assert key in names
    assert micro.pos_embed.shape == (1, 1 + 4 * 4, 32)
    assert micro.blocks[0].attn.rel_pos_h.abs().sum() == 0  # zero init


def test_masks_fit_the_canvas_grid():
    cfg = PRESETS["micro"]
    m = query_half_mask(cfg, batch=3)
    assert m.shape == (3, cfg.num_patches) and m.dtype == torch.bool
    assert not m[:, : cfg.num_patches // 2].any() and m[:, cfg.num_patches // 2 :].all()
    r = random_mask(cfg, 4, 0.7, seed=1)
    assert r.shape == (4, cfg.num_patches)
    assert (r.sum(1) == round(0.7 * cfg.num_patches)).all()
    assert not (r == r[:1]).all()  # a fresh draw per item
    with pytest.raises(ValueError, match="mask ratio"):
        random_patches(cfg.grid_size, 1.5, np.random.default_rng(0))


def test_blocked_attention_equals_the_materialised_decomposed_bias(micro):
    """Attention with the whole (heads, N, N) bias, as SAM adds it to the logits, equals the row-blocked kernel."""
    attn = copy.deepcopy(micro.blocks[0].attn)
    gh, gw = micro.config.grid_size
    g = torch.Generator().manual_seed(4)
    x = torch.randn(gh * gw, micro.config.embed_dim, generator=g)
    rel_h, rel_w = torch.randn(attn.rel_pos_h.shape, generator=g), torch.randn(attn.rel_pos_w.shape, generator=g)
    with torch.no_grad():
        attn.rel_pos_h.copy_(rel_h)
        attn.rel_pos_w.copy_(rel_w)
        got = attn._attend(x[None], (gh, gw))[0]
        n, heads = gh * gw, attn.num_heads
        q, k, v = attn.qkv(x).reshape(n, 3, heads, -1).permute(1, 2, 0, 3).unbind(0)
        r_q = q.reshape(heads, gh, gw, -1)
        bias_h = torch.einsum("nhwc,hkc->nhwk", r_q, get_rel_pos(gh, gh, rel_h))
        bias_w = torch.einsum("nhwc,wkc->nhwk", r_q, get_rel_pos(gw, gw, rel_w))
        bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(heads, n, n)
        logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias
        want = (logits.softmax(-1) @ v).transpose(0, 1).reshape(n, -1)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, (logits - bias).softmax(-1).matmul(v).transpose(0, 1).reshape(n, -1), atol=1e-3)


@pytest.mark.parametrize("rows", [1, 7, 20])
def test_fp32_explicit_attention_equals_the_fused_kernel(rows):
    """The CPU fp32 path (two bmm per row block, bias and softmax in place) computes what the fused kernel does."""
    g = torch.Generator().manual_seed(5)
    b, heads, gh, gw, d = 2, 3, 4, 5, 8
    n = gh * gw
    q, k, v = (torch.randn(b, heads, n, d, generator=g) for _ in range(3))
    rel_h, rel_w = torch.randn(b, heads, n, gh, generator=g), torch.randn(b, heads, n, gw, generator=g)
    got = torch.cat(list(_explicit_blocks(q, k, v, rel_h, rel_w, rows)), dim=1)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=_bias_rows(rel_h, rel_w, 0, n)).transpose(1, 2)
    assert got.shape == (b, n, heads, d)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, F.scaled_dot_product_attention(q, k, v).transpose(1, 2), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_positions_turn_the_decomposed_terms_into_the_bias_exactly(dtype):
    """The bias as a product with the one-hot key table is the broadcast sum, bit for bit, in fp32 and bf16."""
    h, w, heads, rows = 5, 3, 2, 4
    g = torch.Generator().manual_seed(9)
    rel_h = torch.randn(heads, rows, h, generator=g).to(dtype)
    rel_w = torch.randn(heads, rows, w, generator=g).to(dtype)
    keys = key_positions((h, w), dtype, torch.device("cpu"))
    assert keys.shape == (h + w, h * w) and keys.sum(0).eq(2).all()
    got = torch.cat((rel_h, rel_w), -1) @ keys
    want = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(heads, rows, h * w)
    assert torch.equal(got, want)


def test_attention_blocks_of_items_and_of_rows_agree_in_bf16(micro, monkeypatch):
    """Several items per kernel call (small models), or one item in row blocks (large ones): the same result."""
    from fewseg import model as model_module

    attn = micro.blocks[0].attn
    gh, gw = micro.config.grid_size
    x = torch.randn(3, gh, gw, micro.config.embed_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        whole = attn(x)
        monkeypatch.setattr(model_module.Attention, "bias_block_bytes", 5 * attn.num_heads * gh * gw * 2)
        rows = attn(x)
    assert whole.dtype == torch.bfloat16
    assert torch.equal(whole, rows)


def test_training_after_inference_mode_uses_the_cached_key_table():
    """The key table cached by an inference-mode forward is a normal tensor, so a training step can save it."""
    torch.manual_seed(0)
    model = build_model("micro", merge_index=0)
    cfg = model.config
    images, labels = _canvases(cfg, 2, seed=11)
    mask = random_mask(cfg, 2, 0.5, seed=4)
    key_positions.cache_clear()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.eval()(images, labels, mask)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(model(images, labels, mask), labels, mask)
    loss.backward()
    assert model.blocks[0].attn.rel_pos_h.grad is not None
    assert model.blocks[0].attn.rel_pos_h.grad.abs().sum() > 0


def _materialised_attention(q, k, v, rel_h, rel_w):
    """Attention with the whole (B, heads, N, N) bias, differentiated by autograd: what the Function replaces."""
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)
    logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias
    return logits.softmax(-1) @ v


def _attention_inputs(dtype, b=2, heads=3, gh=4, gw=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = gh * gw
    shapes = [(b, heads, n, d)] * 3 + [(b, heads, n, gh), (b, heads, n, gw)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def test_rel_pos_attention_gradients_pass_gradcheck():
    """The hand-written backward (recomputed probabilities, bias gradient as row and column sums) is exact."""
    inputs = _attention_inputs(torch.float64)
    assert torch.autograd.gradcheck(lambda *t: RelPosAttention.apply(*t, 5), inputs, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 5, 12])
def test_rel_pos_attention_equals_autograd_through_the_materialised_bias(rows):
    """Forward and every gradient agree with plain autograd, for any row block size (12 is one block)."""
    inputs = _attention_inputs(torch.float32, seed=rows)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(99))
    got = RelPosAttention.apply(*inputs, rows)
    got_grads = torch.autograd.grad(got, inputs, grad_out)
    want = _materialised_attention(*inputs)
    want_grads = torch.autograd.grad(want, inputs, grad_out)
    assert torch.allclose(got, want, atol=1e-5)
    for name, a, b in zip("q k v rel_h rel_w".split(), got_grads, want_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
        assert b.abs().max() > 1e-3, name  # every input really receives gradient


def test_rel_pos_attention_in_bf16_stays_near_fp32():
    """bf16 inputs give bf16 gradients within bf16 rounding of the fp32 ones (softmax statistics stay fp32)."""
    exact = _attention_inputs(torch.float32, seed=3)
    low = [t.detach().bfloat16().requires_grad_() for t in exact]
    grad_out = torch.randn(exact[0].shape, generator=torch.Generator().manual_seed(5))
    want = torch.autograd.grad(RelPosAttention.apply(*exact, 4), exact, grad_out)
    got = torch.autograd.grad(RelPosAttention.apply(*low, 4), low, grad_out.bfloat16())
    for name, a, b in zip("q k v rel_h rel_w".split(), got, want, strict=True):
        assert a.dtype == torch.bfloat16, name
        assert (a.float() - b).abs().max() <= 0.05 * b.abs().max(), name


def test_a_trained_bias_with_frozen_projections_gets_its_gradient(micro, monkeypatch):
    """Only the relative-position tables train (qkv frozen, input without gradient): the bias still gets a gradient,
    also where fp32 attention would take the explicit path, whose in-place softmax autograd cannot follow."""
    from fewseg import model as model_module

    monkeypatch.setattr(model_module, "EXPLICIT_MIN_TOKENS", 1)
    attn = copy.deepcopy(micro.blocks[0].attn).train()
    attn.qkv.requires_grad_(False)
    torch.nn.init.normal_(attn.rel_pos_h, std=0.5)
    gh, gw = micro.config.grid_size
    attn(torch.randn(2, gh, gw, micro.config.embed_dim)).square().sum().backward()
    assert attn.rel_pos_h.grad.abs().sum() > 0 and attn.rel_pos_w.grad.abs().sum() > 0


def test_training_attention_keeps_no_probability_maps(micro):
    """A training forward saves q, k, v, the bias factors and the output, never a (heads, N, N) tensor."""
    attn = copy.deepcopy(micro.blocks[0].attn).train()
    gh, gw = micro.config.grid_size
    n = gh * gw
    x = torch.randn(2, gh, gw, micro.config.embed_dim, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        attn(x).sum().backward()
    assert saved and not [s for s in saved if len(s) > 2 and s[-2:] == (n, n)], saved
    assert attn.rel_pos_h.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_loss_only_on_masked_patches(micro):
    cfg = micro.config
    p = cfg.patch_size
    images, labels = _canvases(cfg, 2)
    mask = random_mask(cfg, 2, 0.5, seed=3)
    with torch.no_grad():
        pred = micro(images, labels, mask)
    loss = micro.loss(pred, labels, mask)
    pixel_mask = mask.reshape(2, *cfg.grid_size).repeat_interleave(p, 1).repeat_interleave(p, 2)
    changed = torch.where(pixel_mask[:, None], labels, labels + 5.0)
    assert torch.equal(micro.loss(pred, changed, mask), loss)
    changed_masked = torch.where(pixel_mask[:, None], labels + 5.0, labels)
    assert micro.loss(pred, changed_masked, mask) > loss
    # A batch-1 mask is broadcast: same value as the explicit per-item mask.
    qmask = query_half_mask(cfg)
    assert torch.allclose(micro.loss(pred, labels, qmask), micro.loss(pred, labels, qmask.expand(2, -1)))


def test_feature_ensemble_makes_query_halves_identical(micro):
    cfg = micro.config
    h = cfg.tile_size[0]
    n = 4
    images, labels = _canvases(cfg, n)
    images[:, :, h:] = images[:1, :, h:]  # one query image, n different prompts
    with torch.no_grad():
        pred = micro(images, labels, query_half_mask(cfg), feature_ensemble=True)
        plain = micro(images, labels, query_half_mask(cfg))
    # The first query row still sees the prompt's last row through the 3x3 decoder conv.
    query = pred[:, :, h + 1 :]
    assert torch.allclose(query, query[:1].expand_as(query), atol=1e-5)
    assert not torch.allclose(plain[:, :, h + 1 :], plain[:1, :, h + 1 :].expand_as(query), atol=1e-3)


def _grouped_canvases(config: SegGPTConfig, k: int, queries: int, seed: int, labels_too: bool = False):
    """Canvases for ``queries`` query images with k prompts each: every group repeats its first item's query half
    (the image's, and with ``labels_too`` the label canvas's as well, as inference builds them)."""
    h = config.tile_size[0]
    images, labels = _canvases(config, k * queries, seed=seed)
    for g in range(queries):
        images[g * k : (g + 1) * k, :, h:] = images[g * k, :, h:]
        if labels_too:
            labels[g * k : (g + 1) * k, :, h:] = labels[g * k, :, h:]
    return images, labels


def test_grouped_ensemble_equals_separate_forwards(micro):
    """Several queries with k prompts each in one forward give what one forward per query gives."""
    cfg = micro.config
    k, queries = 3, 2
    images, labels = _grouped_canvases(cfg, k, queries, seed=5)
    mask = query_half_mask(cfg)
    with torch.no_grad():
        together = micro(images, labels, mask, feature_ensemble=k)
        groups = [slice(g * k, (g + 1) * k) for g in range(queries)]
        apart = torch.cat([micro(images[s], labels[s], mask, feature_ensemble=True) for s in groups])
        whole = micro(images, labels, mask, feature_ensemble=True)
    assert torch.allclose(together, apart, atol=1e-5)
    assert not torch.allclose(together, whole, atol=1e-3)  # grouping matters
    with pytest.raises(ValueError, match="do not divide"):
        micro(images[:5], labels[:5], mask, feature_ensemble=k)


def test_shared_query_decodes_each_group_once_with_the_same_pixels(micro):
    """Inference's groups share one query half: running its MLP in every block and its decoder once per group
    changes the cost, not the pixels."""
    cfg = micro.config
    h = cfg.tile_size[0]
    k, queries = 3, 2
    images, labels = _grouped_canvases(cfg, k, queries, seed=7, labels_too=True)
    mask = query_half_mask(cfg)
    with torch.no_grad():
        every = micro(images, labels, mask, feature_ensemble=k, query_only=True)
        shared = micro(images, labels, mask, feature_ensemble=k, query_only=True, shared_query=True)
        one_group = micro(images[:k], labels[:k], mask, feature_ensemble=True, query_only=True, shared_query=True)
    assert shared.shape == (queries, 3, h, cfg.tile_size[1])
    assert torch.allclose(shared, every[::k], atol=1e-5)
    assert torch.allclose(one_group, every[:1], atol=1e-5)
    # Below the context row every item of a group holds these pixels, so no item's query half is lost.
    assert torch.allclose(every[:k, :, 1:], shared[:1, :, 1:].expand(k, -1, -1, -1), atol=1e-5)
    with pytest.raises(ValueError, match="needs query_only"):
        micro(images, labels, mask, feature_ensemble=k, shared_query=True)


def test_blocked_attention_mlp_and_query_decode_are_exact(micro, monkeypatch):
    """Row-blocked attention, token-blocked MLP and query-only decoding change cost, not results."""
    from fewseg import model as model_module

    cfg = micro.config
    images, labels = _canvases(cfg, 2, seed=6)
    mask = query_half_mask(cfg)
    with torch.no_grad():
        reference = micro(images, labels, mask)
        query = micro(images, labels, mask, query_only=True)
    assert query.shape[2] == images.shape[2] // 2
    assert torch.allclose(query, reference[:, :, cfg.tile_size[0] :], atol=1e-5)
    # With autograd on the batch decodes in one call, from the same one pixel row of context, and trains.
    with_grad = micro(images, labels, mask, query_only=True)
    assert torch.allclose(with_grad.detach(), query, atol=1e-5)
    with_grad.square().mean().backward()
    assert micro.decoder_embed.weight.grad is not None
    # Force several blocks: a few query rows of bias and a few tokens of MLP at a time.
    monkeypatch.setattr(model_module.Attention, "bias_block_bytes", 7 * cfg.num_heads * cfg.num_patches * 4)
    monkeypatch.setattr(model_module.Block, "mlp_block_bytes", 5 * micro.blocks[0].mlp.fc1.out_features * 4)
    monkeypatch.setattr(model_module.SegGPT, "decoder_block_bytes", 1)  # one item per decoder call
    with torch.no_grad():
        blocked = micro(images, labels, mask)
    assert torch.allclose(blocked, reference, atol=1e-5)
    # With autograd on (training), the whole-tensor MLP path runs and agrees too.
    assert torch.allclose(micro(images, labels, mask).detach(), reference, atol=1e-5)


def test_grad_checkpointing_same_gradients():
    cfg = PRESETS["micro"]
    images, labels = _canvases(cfg, 2)
    mask = random_mask(cfg, 2, 0.6, seed=2)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, drop_path_rate=0.2).train()
        model.set_grad_checkpointing(ckpt)
        torch.manual_seed(1)  # same drop-path draws in both runs
        model.loss(model(images, labels, mask), labels, mask).backward()
        # type_token_ins is unused with the default semantic embedding, so it gets no gradient.
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert len(grads[0]) == count_parameters_tensors(model) - 1
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5), k
    # The relative-position tables receive gradient through the attention bias.
    assert grads[0]["blocks.0.attn.rel_pos_h"].abs().sum() > 0


def count_parameters_tensors(model: torch.nn.Module) -> int:
    return sum(1 for _ in model.parameters())


def test_bf16_autocast_cpu(micro):
    cfg = micro.config
    images, labels = _canvases(cfg, 2)
    mask = query_half_mask(cfg)
    with torch.no_grad():
        ref = micro(images, labels, mask)
        ref_ensemble = micro(images, labels, mask, feature_ensemble=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ensemble = micro(images, labels, mask, feature_ensemble=True)
            plain = micro(images, labels, mask)
    assert (plain.float() - ref).abs().max() < 0.1 * ref.abs().max()
    assert (ensemble.float() - ref_ensemble).abs().max() < 0.1 * ref_ensemble.abs().max()
    # the ensemble really mixes the two canvases: each item's prediction moves by more than bf16 moves it
    assert (ref_ensemble - ref).abs().amax(dim=(1, 2, 3)).min() > (ensemble.float() - ref_ensemble).abs().max()


def test_fingerprint_stable_and_sensitive():
    torch.manual_seed(0)
    a = build_model("micro")
    torch.manual_seed(0)
    b = build_model("micro")
    fa = fingerprint(a)
    assert fa == fingerprint(b) == fingerprint(a.state_dict())
    assert re.fullmatch("[0-9a-f]{16}", fa)
    with torch.no_grad():
        b.blocks[1].mlp.fc2.weight[0, 0] += 1e-3
    assert fingerprint(b) != fa


def test_config_round_trip():
    for cfg in PRESETS.values():
        d = json.loads(json.dumps(cfg.to_dict()))
        assert SegGPTConfig.from_dict(d) == cfg
    with pytest.raises(ValueError):
        SegGPTConfig.from_dict({"embed_dim": 32, "not_a_field": 1})


def test_build_model_overrides():
    model = build_model("micro", depth=4, feature_layers=(1, 3))
    assert len(model.blocks) == 4 and model.config.feature_layers == (1, 3)
    with pytest.raises(ValueError):
        build_model("no_such_preset")


def test_bf16_patch_embedding_is_the_convolution_as_one_product():
    """Under CPU bf16 autocast the patches are projected by one matrix product; it equals the convolution to bf16
    precision and trains the convolution's weights."""
    from fewseg.model import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(4, 3, 16)
    x = torch.randn(2, 3, 16, 8)
    want = F.conv2d(x.bfloat16(), embed.proj.weight.bfloat16(), embed.proj.bias.bfloat16(), stride=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = embed(x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 4, 2, 16)
    torch.testing.assert_close(got.float(), want.permute(0, 2, 3, 1).float(), atol=2e-2, rtol=2e-2)
    assert torch.allclose(embed(x), F.conv2d(x, embed.proj.weight, embed.proj.bias, stride=4).permute(0, 2, 3, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embed(x).float().sum().backward()
    assert embed.proj.weight.grad is not None and embed.proj.weight.grad.abs().sum() > 0


def test_own_layers_match_timms_draws_names_and_numbers():
    """fewseg.layers stands in for timm.layers (whose import pulls in torchvision): same weights from a seed, same
    parameter names, same outputs and the same stochastic-depth draws."""
    import timm.layers

    from fewseg import layers

    ours, theirs = torch.empty(4096), torch.empty(4096)
    torch.manual_seed(0)
    layers.trunc_normal_(ours, std=0.02)
    torch.manual_seed(0)
    timm.layers.trunc_normal_(theirs, std=0.02)
    assert torch.equal(ours, theirs) and 0.015 < float(ours.std()) < 0.025
    torch.manual_seed(1)
    mlp = layers.Mlp(16, 64)
    torch.manual_seed(1)
    ref = timm.layers.Mlp(in_features=16, hidden_features=64, act_layer=torch.nn.GELU)
    assert mlp.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(mlp.state_dict()[k], ref.state_dict()[k]) for k in ref.state_dict())
    x = torch.randn(3, 5, 16)
    assert torch.equal(mlp(x), ref(x))
    maps = torch.randn(2, 8, 6, 6)
    assert torch.equal(layers.LayerNorm2d(8, eps=1e-6)(maps), timm.layers.LayerNorm2d(8, eps=1e-6)(maps))
    drop, ref_drop = layers.DropPath(0.3).train(), timm.layers.DropPath(0.3).train()
    torch.manual_seed(2)
    dropped = drop(maps)
    torch.manual_seed(2)
    assert torch.equal(dropped, ref_drop(maps)) and not torch.equal(dropped, maps)
    assert torch.equal(drop.eval()(maps), maps)


def test_loading_the_model_does_not_import_torchvision():
    """Every workflow job that loads the model would pay torchvision's import (about 2 s on 2 cores)."""
    import subprocess
    import sys

    code = "import sys, fewseg.infer, fewseg.train; print('torchvision' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
