"""SegGPT: in-context segmentation with a plain ViT over a two-tile canvas.

The prompt (image, label) pair sits in the top half of a canvas and the query image in the bottom half.
The image canvas and the label canvas are encoded as two streams of one batch, merged after a few blocks,
and a light pixel decoder paints the label canvas. Parameter names follow the original BAAI Painter
release, so its checkpoint loads without renaming; the Hugging Face port needs only a key map
(see :mod:`fewseg.weights`). Numerics match ``transformers``' ``SegGptForImageSegmentation``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from fewseg.layers import DropPath, LayerNorm2d, Mlp, trunc_normal_
from fewseg.model_config import PRESETS, SegGPTConfig

__all__ = [
    "PRESETS",
    "SegGPT",
    "SegGPTConfig",
    "build_model",
    "count_parameters",
    "fingerprint",
]

EMBEDDING_TYPES = ("semantic", "instance")


def get_rel_pos(q_size: int, k_size: int, rel_pos: Tensor) -> Tensor:
    """Relative position embeddings for every (query, key) offset along one axis: (q_size, k_size, C).

    The table is resized linearly when it was trained for a different length, as in SAM / ViTDet.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear"
        )
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)
    # Scale the coordinates of the shorter side when query and key lengths differ.
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative_coords.long()]


def rel_pos_terms(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The two factors of the decomposed bias: (..., N, H) and (..., N, W) for queries q (..., N, C).

    The bias of query n and key (i, j) is ``rel_h[n, i] + rel_w[n, j]``.
    """
    h, w = size
    r_h = get_rel_pos(h, h, rel_pos_h).to(q.dtype)
    r_w = get_rel_pos(w, w, rel_pos_w).to(q.dtype)
    r_q = q.reshape(*q.shape[:-2], h, w, q.shape[-1])
    rel_h = torch.einsum("...hwc,hkc->...hwk", r_q, r_h)
    rel_w = torch.einsum("...hwc,wkc->...hwk", r_q, r_w)
    return rel_h.reshape(*q.shape[:-1], h), rel_w.reshape(*q.shape[:-1], w)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection to a channels-last grid (B, H/p, W/p, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if x.device.type != "cpu" or dtype == torch.float32:
            return self.proj(x).permute(0, 2, 3, 1)
        # bf16 / fp16 on a CPU: the convolution is a product of each patch's p * p * 3 values with the kernel, and
        # as one matrix product on the unfolded patches it runs in half the time of the oneDNN convolution (which
        # reorders its input first); in fp32 the convolution is the faster of the two.
        b, c, h, w = x.shape
        p = self.proj.kernel_size[0]
        patches = x.to(dtype).reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, c * p * p)
        out = F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)
        return out.view(b, h // p, w // p, -1)


@functools.lru_cache(maxsize=16)
def key_positions(grid: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """(H + W, N) one-hot row and column of every key, so that ``[rel_h | rel_w] @ key_positions`` is the bias.

    Building the (heads, rows, N) bias as this matrix product runs on the matrix units (AMX, tensor cores) and is
    exact, since each output adds two values to zeros; the broadcast sum it replaces is a slow elementwise pass
    (about 5x the time on an AMX CPU in bf16).
    """
    h, w = grid
    # A normal tensor even when first asked for under inference mode, so that training can use the cached one.
    with torch.inference_mode(False), torch.no_grad():
        keys = torch.arange(h * w, device=device)
        table = torch.zeros(h + w, h * w, dtype=dtype, device=device)
        table[keys // w, keys] = 1
        table[h + keys % w, keys] = 1
    return table


class Attention(nn.Module):
    """Global multi-head self-attention with decomposed relative position bias.

    The bias depends on the query, so a fused kernel still needs it as a (heads, N, N) float mask: as large as
    the attention map it avoids. Attention therefore runs in blocks whose bias stays within ``bias_block_bytes``
    (16 MB): several whole items at once when one item's bias is small (small models, where the per-call
    overhead would dominate), else one item in blocks of query rows. The full bias of a large model never exists,
    memory stays flat in batch size and the allocator reuses the same blocks instead of mapping fresh pages every
    layer. The result is exact: softmax rows are independent.
    """

    bias_block_bytes = 16 * 2**20

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        n = h * w
        if torch.is_autocast_enabled(x.device.type):
            per_item = self.num_heads * n * n * torch.get_autocast_dtype(x.device.type).itemsize
        else:
            per_item = self.num_heads * n * n * x.element_size()
        items = max(1, self.bias_block_bytes // per_item)
        flat = x.reshape(b, n, c)
        out = _join([self._attend(chunk, (h, w)) for chunk in flat.split(items)])
        return self.proj(out.reshape(b, h, w, c))

    def _attend(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """Tokens of a few items (B, N, C) on a grid (H, W) -> attention output before the projection, (B, N, C)."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, d)
        rel_h, rel_w = rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, grid)  # (B, heads, N, H), (B, heads, N, W)
        rows = max(1, self.bias_block_bytes // (b * self.num_heads * n * q.element_size()))
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or rel_h.requires_grad or rel_w.requires_grad)
        if needs_grad and q.device.type != "cuda":
            # Training on a CPU: autograd through the fused kernel with a bias that needs a gradient falls back to
            # the unfused path, which keeps every (heads, N, N) map for the backward pass (and the fp32 path's
            # in-place softmax cannot be differentiated at all). CUDA's memory-efficient kernel differentiates the
            # bias itself.
            out = RelPosAttention.apply(q, k, v, rel_h, rel_w, rows)
            return out.transpose(1, 2).reshape(b, n, c)
        return _join(list(_attention_blocks(q, k, v, rel_h, rel_w, rows)), dim=1).reshape(b, n, c)


def _join(parts: list[Tensor], dim: int = 0) -> Tensor:
    """``torch.cat`` of blocks, without its copy when there is one block (most calls of the small presets)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _bias_rows(rel_h: Tensor, rel_w: Tensor, r0: int, r1: int) -> Tensor:
    """The bias of query rows r0:r1 against every key, (B, heads, rows, N), from its two decomposed factors."""
    if rel_h.dtype == torch.float32:
        # In fp32 the broadcast sum is faster than an fp32 product.
        return (rel_h[:, :, r0:r1, :, None] + rel_w[:, :, r0:r1, None, :]).flatten(-2)
    # In bf16 / fp16 the bias is a product with the one-hot key positions, on the matrix units. Contiguous rows
    # let matmul run one (B * heads * rows, H + W) @ (H + W, N) product instead of copying the key table per head.
    keys = key_positions((rel_h.shape[-1], rel_w.shape[-1]), rel_h.dtype, rel_h.device)
    return torch.matmul(torch.cat((rel_h[:, :, r0:r1], rel_w[:, :, r0:r1]), dim=-1), keys)


def _attention_blocks(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, rows: int):
    """Attention over blocks of query rows, each yielded as (B, rows, heads, d), the fused kernel's own layout."""
    n = q.shape[2]
    if q.dtype == torch.float32 and q.device.type == "cpu" and n >= EXPLICIT_MIN_TOKENS:
        yield from _explicit_blocks(q, k, v, rel_h, rel_w, rows)
        return
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        o = F.scaled_dot_product_attention(q[:, :, r0:r1], k, v, attn_mask=_bias_rows(rel_h, rel_w, r0, r1))
        yield o.transpose(1, 2)


# Below this many tokens the per-head products are too small for the matrix library's batched calls, each of which
# pays a thread fork and join per head, and the fused kernel (one parallel loop over items, heads and rows) is faster:
# a tiny-preset canvas of 128 tokens takes twice as long in explicit products on 2 cores.
EXPLICIT_MIN_TOKENS = 512


def _biased_logits(q: Tensor, k_t: Tensor, rel_h: Tensor, rel_w: Tensor, buffer: Tensor) -> Tensor:
    """fp32 ``q @ k_t + bias`` for one block of query rows, written into the front of a flat ``buffer``.

    The bias is broadcast from its two factors straight into the output, and the product is accumulated onto it
    (``baddbmm``), which is one pass over the block fewer than a product followed by two in-place adds
    (about 15% of a ViT-L attention layer on 2 cores). q (B * heads, rows, d), k_t (B * heads, d, N),
    rel_h (B, heads, rows, H), rel_w (B, heads, rows, W).
    """
    b, heads, rows, grid_h = rel_h.shape
    logits = buffer[: q.shape[0] * rows * k_t.shape[-1]]
    torch.add(rel_h[..., None], rel_w[..., None, :], out=logits.view(b, heads, rows, grid_h, rel_w.shape[-1]))
    return logits.view(q.shape[0], rows, -1).baddbmm_(q, k_t)


def _explicit_blocks(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, rows: int):
    """fp32 attention on a CPU as two batched matrix products per block of query rows.

    The fused CPU kernel with a float mask runs its products in small tiles; in fp32 two plain ``bmm`` calls
    (the matrix library's full-speed kernels) around the biased logits and an in-place softmax take about 40%
    less time (ViT-L layer, 2 cores) and the same memory.
    """
    b, heads, n, d = q.shape
    q = (q * d**-0.5).reshape(b * heads, n, d)
    k_t = k.reshape(b * heads, n, d).transpose(1, 2)
    v = v.reshape(b * heads, n, d)
    buffer = q.new_empty(b * heads * min(rows, n) * n)  # one block's logits, reused by every block
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        logits = _biased_logits(q[:, r0:r1], k_t, rel_h[:, :, r0:r1], rel_w[:, :, r0:r1], buffer)
        # Softmax in place: the kernel reads each row's max and sum before it overwrites that row.
        torch.ops.aten._softmax.out(logits, -1, False, out=logits)
        yield torch.bmm(logits, v).view(b, heads, r1 - r0, d).transpose(1, 2)


class RelPosAttention(torch.autograd.Function):
    """Attention with the decomposed bias that recomputes each row block's probabilities in the backward pass.

    Only q, k, v, the two bias factors and the output are kept (as flash attention keeps its inputs), so training
    memory no longer grows with the (heads, N, N) maps; the backward pass recomputes one block of logits at a
    time (one extra q @ k product), which costs less than streaming the kept maps back from memory.
    Inputs: q, k, v (B, heads, N, d); rel_h (B, heads, N, H), rel_w (B, heads, N, W); rows per block.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, rows: int) -> Tensor:
        with torch.no_grad():
            out = torch.cat(list(_attention_blocks(q, k, v, rel_h, rel_w, rows)), dim=1).transpose(1, 2)
        ctx.save_for_backward(q, k, v, rel_h, rel_w, out)
        ctx.rows = rows
        return out

    @staticmethod
    @once_differentiable  # the backward writes its products in place: a second derivative would be wrong, not slow
    def backward(ctx, grad_out: Tensor):
        q, k, v, rel_h, rel_w, out = ctx.saved_tensors
        b, heads, n, d = q.shape
        grid_h, grid_w = rel_h.shape[-1], rel_w.shape[-1]
        low = q.dtype  # the dtype of the products: fp32, or bf16 / fp16 under autocast
        scale = d**-0.5
        # (B * heads, N, d) operands; q and k pre-scaled, so that logits = q_s k^T + bias, dq = dS k_s, dk = dS^T q_s.
        q_s, k_s = (q * scale).reshape(-1, n, d), (k * scale).reshape(-1, n, d)
        k_t, v_t = k.reshape(-1, n, d).transpose(1, 2), v.reshape(-1, n, d).transpose(1, 2)
        grad = grad_out.to(low).reshape(-1, n, d)
        # dk and dv accumulate transposed, (B * heads, d, N): a wide output the product adds onto faster than a tall
        # one; dq is written a block at a time into contiguous blocks rather than into strided slices.
        dk_t = torch.zeros(b * heads, d, n, dtype=low, device=q.device)
        dv_t = torch.zeros_like(dk_t)
        dq_blocks = []
        d_rel = torch.empty(b * heads, n, grid_h + grid_w, dtype=low, device=q.device)
        keys_t = key_positions((grid_h, grid_w), low, q.device).t()  # (N, H + W): the bias gradient as one product
        # Softmax backward, dS = P * (dP - rowsum(dO * O)); the row sums in fp32 as the softmax statistics are.
        row_dot = (grad_out.float() * out.float()).sum(-1, keepdim=True).reshape(-1, n, 1)
        if low == torch.float32:
            buffer = q.new_empty(b * heads * min(ctx.rows, n) * n)
        else:
            # On the matrix units the bias joins the product: [q_s | rel_h | rel_w] @ [k^T ; key positions] gives
            # the biased logits in one call, cheaper there than adding a bias block elementwise.
            q_logits = torch.cat((q_s, rel_h.reshape(-1, n, grid_h), rel_w.reshape(-1, n, grid_w)), dim=-1)
            k_logits = torch.cat((k_t, keys_t.t().expand(k_t.shape[0], -1, -1)), dim=1)
        for r0 in range(0, n, ctx.rows):
            r1 = min(r0 + ctx.rows, n)
            # The probabilities as the forward pass computed them, softmax statistics in fp32.
            if low == torch.float32:
                probs = _biased_logits(q_s[:, r0:r1], k_t, rel_h[:, :, r0:r1], rel_w[:, :, r0:r1], buffer)
                torch.ops.aten._softmax.out(probs, -1, False, out=probs)
            else:
                probs = torch.softmax(torch.bmm(q_logits[:, r0:r1], k_logits), dim=-1, dtype=torch.float32)
            p_low = probs if low == torch.float32 else probs.to(low)
            dv_t.baddbmm_(grad[:, r0:r1].transpose(1, 2), p_low)
            del p_low
            d_logits = torch.bmm(grad[:, r0:r1], v_t)
            if low == torch.float32:
                d_logits.sub_(row_dot[:, r0:r1]).mul_(probs)
            else:  # the difference in fp32, then one pass that multiplies and rounds back to the products' dtype
                d_logits = torch.mul(torch.sub(d_logits, row_dot[:, r0:r1]), probs, out=torch.empty_like(d_logits))
            del probs
            if low == torch.float32:  # the bias gradient as row and column sums: 3x faster than an fp32 product
                by_key = d_logits.view(-1, r1 - r0, grid_h, grid_w)
                torch.sum(by_key, -1, out=d_rel[:, r0:r1, :grid_h])
                torch.sum(by_key, -2, out=d_rel[:, r0:r1, grid_h:])
            else:  # on the matrix units, one product with the key table is faster than the two sums
                torch.bmm(d_logits, keys_t.expand(d_logits.shape[0], -1, -1), out=d_rel[:, r0:r1])
            dq_blocks.append(torch.bmm(d_logits, k_s))
            dk_t.baddbmm_(q_s[:, r0:r1].transpose(1, 2), d_logits)
        shape = (b, heads, n, d)
        d_rel_h, d_rel_w = d_rel.view(b, heads, n, -1).split((grid_h, grid_w), dim=-1)
        return (
            torch.cat(dq_blocks, dim=1).view(shape).to(q.dtype),
            dk_t.transpose(1, 2).view(shape).to(k.dtype),
            dv_t.transpose(1, 2).view(shape).to(v.dtype),
            d_rel_h.to(rel_h.dtype),
            d_rel_w.to(rel_w.dtype),
            None,
        )


EnsembleSpec = tuple[int, int, bool]  # (streams, prompts per query, average over the streams too)


def _ensemble_query_half(x: Tensor, spec: EnsembleSpec) -> Tensor:
    """Replace the query half (bottom rows) of every item by its mean over the prompts of its query.

    The batch is ``streams`` stacked streams of G groups of k consecutive items, one group per query image
    (so several queries can share one forward); with ``joint`` the mean also runs over the streams.
    """
    streams, k, joint = spec
    top, bottom = x.split(x.shape[1] // 2, dim=1)
    flat = bottom.reshape(streams, -1, k, *bottom.shape[1:])
    mean = flat.mean(dim=(0, 2) if joint else 2, keepdim=True)
    return torch.cat([top, mean.expand_as(flat).reshape(bottom.shape)], dim=1)


def _group_size(batch: int, feature_ensemble: bool | int) -> int:
    """Items per feature-ensemble group: the whole batch for True, else the given k (0 or False: no ensemble)."""
    return batch if feature_ensemble is True else int(feature_ensemble)


class Block(nn.Module):
    """Pre-norm transformer block; optionally averages the query half of the attention output."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: float,
        input_size: tuple[int, int],
        eps: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, input_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    mlp_block_bytes = 16 * 2**20

    def forward(self, x: Tensor, ensemble: EnsembleSpec | None = None, shared_query: bool = False) -> Tensor:
        """shared_query (inference, with ``ensemble``): every item of a group enters with the same query half, so
        after the averaged attention it is still the same and the MLP runs on the group's first copy only."""
        a = self.attn(self.norm1(x))
        if ensemble is not None:
            a = _ensemble_query_half(a, ensemble)
        x = x + self.drop_path(a)
        if torch.is_grad_enabled() or self.training:
            return x + self.drop_path(self.mlp(self.norm2(x)))
        k = ensemble[1] if ensemble is not None and shared_query else 1
        if k == 1:
            return self._add_mlp(x)
        half = x.shape[1] // 2
        x[:, :half] = self._add_mlp(x[:, :half].contiguous())
        first = self._add_mlp(x[::k, half:].contiguous())  # (groups, rows, cols, C)
        x.view(-1, k, *x.shape[1:])[:, :, half:] = first.unsqueeze(1)
        return x

    def _add_mlp(self, x: Tensor) -> Tensor:
        """x + MLP(norm2(x)) in place, in blocks of tokens, so the MLP's wide hidden layer never exists whole."""
        flat = x.view(-1, x.shape[-1])
        rows = max(1, self.mlp_block_bytes // (self.mlp.fc1.out_features * x.element_size()))
        for r0 in range(0, flat.shape[0], rows):
            chunk = flat[r0 : r0 + rows]
            chunk += self.mlp(self.norm2(chunk))
        return x


class SegGPT(nn.Module):
    """SegGPT encoder-decoder over (image canvas, label canvas) pairs."""

    def __init__(self, config: SegGPTConfig) -> None:
        super().__init__()
        self.config = config
        self.grad_checkpointing = config.grad_checkpointing
        dim, p = config.embed_dim, config.patch_size
        self.patch_embed = PatchEmbed(p, 3, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.segment_token_x = nn.Parameter(torch.zeros(1, 1, 1, dim))  # image stream
        self.segment_token_y = nn.Parameter(torch.zeros(1, 1, 1, dim))  # label stream
        self.type_token_cls = nn.Parameter(torch.zeros(1, 1, 1, dim))  # semantic
        self.type_token_ins = nn.Parameter(torch.zeros(1, 1, 1, dim))  # instance
        # The first row is the unused class-token position of the pretrained table.
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.pretrain_grid**2, dim))
        dpr = [x.item() for x in torch.linspace(0, config.drop_path_rate, config.depth, device="cpu")]
        self.blocks = nn.ModuleList(
            Block(
                dim, config.num_heads, config.mlp_ratio, config.qkv_bias, rate, config.grid_size, config.layer_norm_eps
            )
            for rate in dpr
        )
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        d = config.decoder_dim
        self.decoder_embed = nn.Linear(dim * len(config.feature_layers), p * p * d)
        self.decoder_pred = nn.Sequential(
            nn.Conv2d(d, d, kernel_size=3, padding=1),
            LayerNorm2d(d, eps=config.layer_norm_eps),
            nn.GELU(),
            nn.Conv2d(d, 3, kernel_size=1),
        )
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialisation for training from scratch; pretrained weights override all of it."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, Attention):
                nn.init.zeros_(m.rel_pos_h)
                nn.init.zeros_(m.rel_pos_w)
        for name in ("mask_token", "segment_token_x", "segment_token_y", "type_token_cls", "type_token_ins"):
            trunc_normal_(getattr(self, name), std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _pos_embed(self, grid: tuple[int, int]) -> Tensor:
        pos = self.pos_embed[:, 1:]
        g = math.isqrt(pos.shape[1])
        pos = pos.reshape(1, g, g, -1)
        if (g, g) != tuple(grid):
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=grid, mode="bicubic", align_corners=False)
            pos = pos.permute(0, 2, 3, 1)
        return pos

    def no_weight_decay(self) -> set[str]:
        """Names of embedding tables that optimisers conventionally exclude from weight decay (used by pretraining)."""
        names = {"mask_token", "segment_token_x", "segment_token_y", "type_token_cls", "type_token_ins", "pos_embed"}
        for i in range(len(self.blocks)):
            names |= {f"blocks.{i}.attn.rel_pos_h", f"blocks.{i}.attn.rel_pos_w"}
        return names

    def embed(self, images: Tensor, labels: Tensor, mask: Tensor, embedding_type: str = "semantic") -> Tensor:
        """Token grids of both streams, stacked as [image stream; label stream] on the batch axis."""
        if embedding_type not in EMBEDDING_TYPES:
            raise ValueError(f"embedding_type must be one of {EMBEDDING_TYPES}, got {embedding_type!r}")
        if images.shape != labels.shape:
            raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} differ in shape")
        p = self.config.patch_size
        if images.ndim != 4 or images.shape[2] % (2 * p) or images.shape[3] % p:
            raise ValueError(f"expected (B, 3, 2h, w) canvases with h, w multiples of {p}, got {tuple(images.shape)}")
        x = self.patch_embed(images)
        y = self.patch_embed(labels)
        _, gh, gw, _ = x.shape
        if mask.ndim != 2 or mask.shape[1] != gh * gw or mask.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"mask {tuple(mask.shape)} must be (B or 1, {gh * gw}) for a {gh}x{gw} patch grid")
        m = mask.reshape(-1, gh, gw, 1).to(torch.bool)
        y = torch.where(m, self.mask_token.to(y.dtype), y)
        pos = self._pos_embed((gh, gw))
        type_token = self.type_token_cls if embedding_type == "semantic" else self.type_token_ins
        x = x + self.segment_token_x + pos + type_token
        y = y + self.segment_token_y + pos + type_token
        return torch.cat((x, y), dim=0)

    def forward_encoder(
        self, x: Tensor, feature_ensemble: bool | int = False, shared_query: bool = False
    ) -> list[Tensor]:
        """Run the blocks on the two-stream batch; returns the normalised feature-layer outputs.

        feature_ensemble: True averages the query half over the whole batch (one query, B prompts); an int k
        averages over consecutive groups of k items (B / k queries with k prompts each, in one forward).
        shared_query: the items of a group hold the same query half (see :meth:`forward`).
        """
        cfg = self.config
        batch = x.shape[0] // 2
        k = _group_size(batch, feature_ensemble)
        if k and batch % k:
            raise ValueError(f"feature_ensemble groups of {k} do not divide the batch of {batch}")
        features = []
        for i, blk in enumerate(self.blocks):
            # Feature ensemble averages the query half over prompts. Before block merge_index each stream
            # is averaged on its own. In block merge_index itself the Hugging Face port (which we match)
            # averages over both streams together, whereas the original Painter code still averages
            # per stream there; with one prompt that block is therefore not a no-op.
            ensemble = None
            if k and i == cfg.merge_index:
                ensemble = (2, k, True)
            elif k > 1:
                ensemble = (2 if i < cfg.merge_index else 1, k, False)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, ensemble, use_reentrant=False)
            else:
                x = blk(x, ensemble, shared_query)
            if i == cfg.merge_index:
                n = x.shape[0] // 2
                x = (x[:n] + x[n:]) * 0.5
            if i in cfg.feature_layers:
                features.append(self.norm(x))
        return features

    def forward_decoder(self, features: list[Tensor], query_only: bool = False) -> Tensor:
        """Per-patch linear to p*p*decoder_dim, pixel shuffle, then a small conv head to RGB.

        query_only decodes just the query half (what inference reads), plus the one pixel row above it that the
        3x3 convolution reads as context and which is then cut off: the same pixels as the full decode, at half
        the cost.
        """
        x = torch.cat(features, dim=-1)
        if query_only:
            x = x[:, x.shape[1] // 2 - 1 :]
        if torch.is_grad_enabled() or x.shape[0] == 1:
            return self._decode(x, query_only)
        # Inference: a few items at a time, so the full-resolution decoder maps never exist for the whole batch;
        # as many as fit in decoder_block_bytes, since one small item per call is mostly overhead.
        p = self.config.patch_size
        per_item = self.config.decoder_dim * x.shape[1] * x.shape[2] * p * p * 4
        items = max(1, self.decoder_block_bytes // per_item)
        # Contiguous chunks: a linear layer on a strided 4-D slice runs as many small batched products.
        return _join([self._decode(chunk.contiguous(), query_only) for chunk in x.split(items)])

    # Small enough that a chunk's maps are reused from the cache and the allocator's free lists between the
    # head's four passes: under glibc's default allocator (FEWSEG_ALLOCATOR=system) the tiny preset's inference ran
    # 25-35% faster at 8 MB than at 64 MB on 2 cores, which page-faulted every fresh 64 MB map; with freed memory
    # kept mapped, as in the workflow's jobs, 8, 16 and 64 MB measured the same. An item of a large preset exceeds
    # it and is decoded alone.
    decoder_block_bytes = 8 * 2**20

    def _decode(self, x: Tensor, context_row: bool = False) -> Tensor:
        """Tokens (B, gh, gw, C) to the RGB map (B, 3, gh * p, gw * p).

        context_row: the first token row is context for the query half below it; only its last pixel row is
        decoded (the one the 3x3 convolution reads) and the output starts below it, (B, 3, (gh - 1) * p, gw * p).
        """
        p, d = self.config.patch_size, self.config.decoder_dim
        if context_row:
            # That pixel row's outputs are the last p * d of the linear's outputs: a slice of its weight.
            k = (p - 1) * p * d
            w, bias = self.decoder_embed.weight[k:], self.decoder_embed.bias[k:]
            top = F.linear(x[:, :1], w, bias)  # (B, 1, gw, p * d): (pixel column, channel) in order
            x = self.decoder_embed(x[:, 1:])
        else:
            x = self.decoder_embed(x)
        b, gh, gw, _ = x.shape
        # Pixel shuffle to a channels-last map: whole runs of p * d values move together, the convolutions take
        # channels-last natively and LayerNorm2d's permute to channels-last is then a view instead of a copy.
        rows = int(context_row)
        out = x.new_empty(b, rows + gh * p, gw * p, d)
        out[:, rows:].view(b, gh, p, gw, p, d).copy_(x.view(b, gh, gw, p, p, d).permute(0, 1, 3, 2, 4, 5))
        if context_row:
            out[:, 0].copy_(top.view(b, gw * p, d))
        y = self.decoder_pred(out.permute(0, 3, 1, 2))
        return y[:, :, rows:] if context_row else y

    def forward(
        self,
        images: Tensor,
        labels: Tensor,
        mask: Tensor,
        *,
        feature_ensemble: bool | int = False,
        embedding_type: str = "semantic",
        query_only: bool = False,
        shared_query: bool = False,
    ) -> Tensor:
        """images, labels: (B, 3, 2h, w) canvases, ImageNet-normalised; prompt half on top, query half below.

        mask: bool (B or 1, num_patches), True = that label-canvas patch is replaced by the learned mask token
        (:func:`fewseg.data.query_half_patches` for inference, :func:`fewseg.data.random_patches` for training).
        feature_ensemble: average the query half over the batch (B prompts for one query image), or with an int k
        over each consecutive group of k items (B / k query images with k prompts each).
        Returns the predicted label canvas (B, 3, 2h, w) in normalised space, or with ``query_only`` just its
        query half (B, 3, h, w).
        shared_query (with ``query_only``): the items of each ensemble group hold the same query half (image, label
        half and mask, as inference builds them), so after every block's averaging their query features are equal
        and the half is decoded once per group, from the group's first item (the items differ only in the pixel
        row of context their prompts give the 3x3 convolution): returns (B / k, 3, h, w). With 48 prompt canvases
        a query tile, as base inference has, that skips 47 of every 48 decodes and halves the forward's time.
        """
        x = self.embed(images, labels, mask, embedding_type)
        features = self.forward_encoder(x, feature_ensemble, shared_query)
        if shared_query:
            if not query_only:
                raise ValueError("shared_query decodes only the query half: it needs query_only")
            k = max(1, _group_size(features[0].shape[0], feature_ensemble))
            features = [f[::k] for f in features]
        return self.forward_decoder(features, query_only)

    def loss(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """Smooth L1 (beta=config.loss_beta) averaged over the pixels of masked patches only.

        pred, target: (B, 3, 2h, w) label canvases; mask as in :meth:`forward`. A mask with batch 1 is
        broadcast over the batch and counted once per item, so the result is a mean for any batch size
        (the Hugging Face loss divides by the count of a single item in that case).
        """
        p = self.config.patch_size
        b, c, h, w = target.shape
        m = mask.reshape(-1, h // p, 1, w // p, 1).expand(-1, -1, p, -1, p).reshape(-1, 1, h, w)
        m = m.expand(b, c, h, w).to(torch.float32)
        err = F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=self.config.loss_beta)
        return (err * m).sum() / m.sum().clamp_min(1.0)


def build_model(preset_or_config: str | SegGPTConfig, **overrides: Any) -> SegGPT:
    """Build a randomly initialised model from a preset name or a config, with field overrides."""
    if isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise ValueError(f"unknown preset {preset_or_config!r}; choose from {sorted(PRESETS)}")
        config = PRESETS[preset_or_config]
    else:
        config = preset_or_config
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return SegGPT(config)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def fingerprint(model_or_state_dict: nn.Module | Mapping[str, Any], length: int = 16) -> str:
    """Short stable digest of a model's weights, to check what a learned prompt was trained against.

    sha256 over the sorted names, shapes and fp32 bytes of every tensor. Deterministic across runs and
    devices; casting the weights to a lower precision changes it.
    """
    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
    else:
        state = model_or_state_dict
    digest = hashlib.sha256()
    for name in sorted(k for k, v in state.items() if isinstance(v, Tensor)):
        t = state[name].detach()
        digest.update(f"{name}:{tuple(t.shape)};".encode())
        digest.update(t.to("cpu", torch.float32).contiguous().numpy())
    return digest.hexdigest()[:length]
