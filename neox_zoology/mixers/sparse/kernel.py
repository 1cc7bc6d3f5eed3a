"""`SelectedQueryAttention`: attention of the selected query rows against all keys, flash-style.

K and V are projected block by block and never kept: a running softmax over key blocks gives the
outputs, and backward recomputes each K/V block. Selected rows are sorted by position, so a key block
meets only the rows at or after it. Time O(k L d); memory beyond the layer's input, output and input
gradient O(k d + block d + tile). On the CPU PyTorch's fused flash kernel takes each key block
(`USE_CPU_FLASH`); elsewhere (GPUs) tiles of one key block x one chunk of rows go through reused buffers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from neox_zoology.mixers.sparse.selection import selected_positions

_TILE_ELEMENTS = 1 << 21  # a scores tile [batch * heads, rows, keys] is kept near 8 MB in fp32


def _rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype):
    """cos, sin [..., rot_dim] at integer positions (attention's Rotary: rotate-half layout)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(device=positions.device, dtype=torch.float32)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rope(x: torch.Tensor, cos, sin, rot_dim: int, scale: float = 1.0) -> torch.Tensor:
    """scale * (x * cos + rotate_half(x) * sin) on the first rot_dim channels (cos and sin already
    carry `scale`), scale * x on the rest, written into one new contiguous tensor. With -sin this is the
    transpose, i.e. the gradient of the rotation."""
    if rot_dim == 0:
        return x * scale
    half = rot_dim // 2
    c, s = cos[..., :half], sin[..., :half]  # both halves of the tables are equal
    x1, x2 = x[..., :half], x[..., half:rot_dim]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.mul(x1, c, out=out[..., :half]).addcmul_(x2, s, value=-1)
    torch.mul(x2, c, out=out[..., half:rot_dim]).addcmul_(x1, s)
    if rot_dim < x.shape[-1]:
        torch.mul(x[..., rot_dim:], scale, out=out[..., rot_dim:])
    return out


def score_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """w . x + b per position: x [L, B, h] -> [B, L], one matrix-vector product per sequence (no copy of
    x, whatever its strides)."""
    w = weight.reshape(-1)
    ct = _compute_dtype(x.dtype)
    return torch.stack([torch.mv(x[:, b], w) for b in range(x.shape[1])]).to(ct) + bias.to(ct)


def _compute_dtype(dtype):
    """Softmax statistics and accumulators: fp32 for bf16/fp16/fp32 inputs, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def _split_qkv(weight, bias, heads: int, head_dim: int):
    """attention's per-head [q | k | v] rows -> (W_q [H dh, h], W_kv [H 2 dh, h]) and their biases."""
    h = weight.shape[-1]
    w = weight.view(heads, 3, head_dim, h)
    wq, wkv = w[:, 0].reshape(heads * head_dim, h), w[:, 1:].reshape(heads * 2 * head_dim, h)
    if bias is None:
        return wq, wkv, None, None
    b = bias.view(heads, 3, head_dim)
    return wq, wkv, b[:, 0].reshape(-1), b[:, 1:].reshape(-1)


def _kv_block(xb, wkv, bkv, heads: int, head_dim: int, cos, sin, rot_dim: int):
    """Contiguous x rows [n, B, h] and their rotary tables [n, rot_dim] -> rotated k and v as
    [B * H, n, dh] views (rows strided, as matrix products take them)."""
    n, B, _ = xb.shape
    kv = F.linear(xb, wkv, bkv).view(n, B * heads, 2, head_dim)
    k = _rope(kv[:, :, 0], cos[:, None], sin[:, None], rot_dim)
    return k.transpose(0, 1), kv[:, :, 1].transpose(0, 1)


def _block_plan(pos: torch.Tensor, L: int, block: int):
    """[(start, end, first row)] per key block that some selected row reaches. Rows are sorted per batch
    element, so the rows at or after a block form a suffix; the batch shares the longest one."""
    starts = torch.arange(0, L, block, device=pos.device)
    first = torch.searchsorted(pos.contiguous(), starts.expand(pos.shape[0], -1).contiguous()).amin(0).tolist()
    k = pos.shape[1]
    return [(s, min(s + block, L), r) for s, r in zip(range(0, L, block), first) if r < k]


def _bmm_into(a, b, buf):
    """a @ b in buf's dtype, written into `buf` (reused across tiles, so no allocation per tile) when
    the inputs have that dtype, else computed in their dtype and converted."""
    if a.dtype == buf.dtype:
        out = buf[: a.shape[0] * a.shape[1] * b.shape[2]].view(a.shape[0], a.shape[1], b.shape[2])
        return torch.bmm(a, b, out=out)
    return torch.bmm(a, b).to(buf.dtype)


def _baddbmm_(acc, a, b):
    """acc += a @ b, in place (inputs in the activation dtype, acc possibly wider)."""
    if a.dtype == acc.dtype:
        return acc.baddbmm_(a, b)
    return acc.add_(torch.bmm(a, b))


def _to_chunks(t, nc: int, chunk: int):
    """Rows [k, B, H, ...] (k <= nc * chunk) -> chunk-major [nc, B * H, chunk, ...], zero-padded."""
    k, B, H = t.shape[:3]
    rest = tuple(t.shape[3:])
    if nc * chunk > k:
        t = torch.cat([t, t.new_zeros(nc * chunk - k, B, H, *rest)])
    dims = tuple(range(4, 4 + len(rest)))
    return t.reshape(nc, chunk, B, H, *rest).permute(0, 2, 3, 1, *dims).reshape(nc, B * H, chunk, *rest)


def _from_chunks(t, B: int, k: int):
    """Chunk-major [nc, B * H, chunk, ...] -> rows [k, B, H, ...]."""
    nc, BH, chunk = t.shape[:3]
    rest = tuple(t.shape[3:])
    dims = tuple(range(4, 4 + len(rest)))
    t = t.reshape(nc, B, BH // B, chunk, *rest).permute(0, 3, 1, 2, *dims)
    return t.reshape(nc * chunk, B, BH // B, *rest)[:k]


def _cpu_flash_available(x: torch.Tensor) -> bool:
    """CPU: PyTorch's flash-attention kernel with a mask that also returns the log-sum-exp (one fused op
    per key block instead of a dozen per tile; the generic tiles are the fallback and the path on GPUs)."""
    return (USE_CPU_FLASH and x.device.type == "cpu"
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"))


USE_CPU_FLASH = True


def _block_mask(pos_rows, b0: int, b1: int, dtype):
    """Additive mask [B, 1, rows, n]: 0 where the row's position >= the key's, -inf elsewhere."""
    keys = torch.arange(b0, b1, device=pos_rows.device)
    allowed = pos_rows[:, None, :, None] >= keys
    return torch.zeros(allowed.shape, dtype=dtype, device=pos_rows.device).masked_fill_(~allowed, -math.inf)


class _Ctx:
    """What both key-block paths share: shapes, projections, the block plan."""

    def __init__(self, x, wkv, bkv, pos, heads, head_dim, inv_freq, rot_dim, plan):
        self.x, self.wkv, self.bkv, self.pos = x, wkv, bkv, pos
        self.heads, self.head_dim, self.rot_dim, self.plan = heads, head_dim, rot_dim, plan
        self.L, self.B, self.h = x.shape
        self.cos, self.sin = _rope_tables(inv_freq, torch.arange(self.L, device=x.device), x.dtype)  # [L, rot_dim]
        self.k = pos.shape[1]
        self.ct = _compute_dtype(x.dtype)
        self.xc = x if x.is_contiguous() else None

    def rows_of(self, b0, b1):
        return self.xc[b0:b1] if self.xc is not None else self.x[b0:b1].contiguous()

    def kv(self, b0, b1):
        """Rotated k, v [B * H, n, dh] (views), the block's x rows and rotary tables."""
        xb = self.rows_of(b0, b1)
        cos, sin = self.cos[b0:b1], self.sin[b0:b1]
        k, v = _kv_block(xb, self.wkv, self.bkv, self.heads, self.head_dim, cos, sin, self.rot_dim)
        return k, v, xb, cos, sin

    def kv_grads(self, dk, dv, xb, cos, sin, dx, dwkv, dbkv, b0, b1):
        """Block gradients dk, dv [B * H, n, dh] (dk w.r.t. the rotated keys) -> dx rows, dW_kv, db_kv."""
        n, B, H, dh = b1 - b0, self.B, self.heads, self.head_dim
        dkv = torch.empty(n, B * H, 2, dh, device=dx.device, dtype=dx.dtype)
        dkv[:, :, 0] = _rope(dk.to(dx.dtype).transpose(0, 1), cos[:, None], -sin[:, None], self.rot_dim)
        dkv[:, :, 1] = dv.transpose(0, 1)
        dkv = dkv.view(n, B, H * 2 * dh)
        dwkv.addmm_(dkv.view(n * B, -1).t(), xb.reshape(n * B, self.h))
        if dbkv is not None:
            dbkv += dkv.sum((0, 1))
        dx[b0:b1] = dkv @ self.wkv


def _forward_flash(c: _Ctx, q):
    """q [k, B, H, dh] (rotated, scaled) -> outputs [B, H, k, dh] and log-sum-exp [B, H, k] (0 for rows
    that reached no key), merging one fused attention call per key block."""
    B, H, k = c.B, c.heads, c.k
    q4 = q.permute(1, 2, 0, 3)  # [B, H, k, dh] view
    o = torch.zeros(B, H, k, c.head_dim, device=q.device, dtype=c.ct)
    lse = torch.full((B, H, k), -math.inf, device=q.device, dtype=c.ct)
    for b0, b1, r in c.plan:
        kb, vb, _, _, _ = c.kv(b0, b1)
        pr = c.pos[:, r:]
        ob, lb = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q4[:, :, r:], kb.view(B, H, b1 - b0, -1), vb.view(B, H, b1 - b0, -1),
            attn_mask=_block_mask(pr, b0, b1, q.dtype), scale=1.0)
        lb = lb.to(c.ct).masked_fill_(~(pr >= b0)[:, None], -math.inf)  # rows with no key in this block
        l_old = lse[:, :, r:]
        l_new = torch.logaddexp(l_old, lb)
        l_safe = l_new.masked_fill(l_new == -math.inf, 0.0)
        o[:, :, r:].mul_(torch.exp(l_old - l_safe)[..., None]).add_(ob.mul_(torch.exp(lb - l_safe)[..., None]))
        lse[:, :, r:] = l_new
    return o, lse.masked_fill_(lse == -math.inf, 0.0)


def _backward_flash(c: _Ctx, q, rows, lse, d_rows, dx, dwkv, dbkv):
    """-> dq [k, B, H, dh] w.r.t. the rotated, scaled queries; fills dx, dW_kv, db_kv."""
    B, H, k, dh = c.B, c.heads, c.k, c.head_dim
    q4 = q.permute(1, 2, 0, 3)
    o4 = rows.view(k, B, H, dh).permute(1, 2, 0, 3)
    do4 = d_rows.reshape(k, B, H, dh).permute(1, 2, 0, 3)
    dq = torch.zeros(B, H, k, dh, device=q.device, dtype=c.ct)
    for b0, b1, r in c.plan:
        kb, vb, xb, cos, sin = c.kv(b0, b1)
        n = b1 - b0
        dqb, dkb, dvb = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do4[:, :, r:], q4[:, :, r:], kb.view(B, H, n, dh), vb.view(B, H, n, dh), o4[:, :, r:],
            lse[:, :, r:].to(torch.float32) if q.dtype != torch.float64 else lse[:, :, r:], 0.0, False,
            attn_mask=_block_mask(c.pos[:, r:], b0, b1, q.dtype), scale=1.0)
        dq[:, :, r:] += dqb
        c.kv_grads(dkb.reshape(B * H, n, dh), dvb.reshape(B * H, n, dh), xb, cos, sin, dx, dwkv, dbkv, b0, b1)
    return dq.permute(2, 0, 1, 3)


def _forward_tiles(c: _Ctx, q, chunk: int):
    """Generic path: q [k, B, H, dh] -> outputs, log-sum-exp and q, chunk-major ([nc, B H, chunk, ...])."""
    B, H, k, BH = c.B, c.heads, c.k, c.B * c.heads
    nc = -(-k // chunk)
    q = _to_chunks(q, nc, chunk)
    posc = F.pad(c.pos, (0, nc * chunk - k), value=-1).view(B, nc, chunk).transpose(0, 1)  # [nc, B, chunk]
    m = torch.full((nc, BH, chunk), -math.inf, device=q.device, dtype=c.ct)
    l = torch.zeros_like(m)
    acc = torch.zeros(nc, BH, chunk, c.head_dim, device=q.device, dtype=c.ct)
    buf = torch.empty(BH * chunk * max([b1 - b0 for b0, b1, _ in c.plan] or [1]), device=q.device, dtype=c.ct)
    for b0, b1, r in c.plan:
        kb, vb, _, _, _ = c.kv(b0, b1)
        keys = torch.arange(b0, b1, device=q.device)
        for j in range(r // chunk, nc):
            s = _bmm_into(q[j], kb.transpose(1, 2), buf)  # [BH, chunk, n]
            s.view(B, H, chunk, b1 - b0).masked_fill_((posc[j, :, :, None] < keys)[:, None], -math.inf)
            m_new = torch.maximum(m[j], s.amax(-1))
            m_safe = m_new.masked_fill(m_new == -math.inf, 0.0)
            p = s.sub_(m_safe[..., None]).exp_()
            alpha = torch.exp(m[j] - m_safe)
            l[j].mul_(alpha).add_(p.sum(-1))
            _baddbmm_(acc[j].mul_(alpha[..., None]), p.to(vb.dtype), vb)
            m[j] = m_new
    reached = l > 0
    l_safe = torch.where(reached, l, 1.0)
    o = acc.div_(l_safe[..., None])
    lse = torch.where(reached, m + torch.log(l_safe), 0.0)  # rows that reached no key: their scores are -inf
    return o, lse, q


def _backward_tiles(c: _Ctx, q, rows, lse, d_rows, dx, dwkv, dbkv, chunk: int):
    B, H, k, dh, BH, nc = c.B, c.heads, c.k, c.head_dim, c.B * c.heads, q.shape[0]
    d_o = _to_chunks(d_rows.reshape(k, B, H, dh), nc, chunk)
    delta = (d_rows.to(c.ct) * rows.to(c.ct)).reshape(k, B, H, dh).sum(-1)  # d_o . o per row and head
    delta = _to_chunks(delta, nc, chunk)  # [nc, BH, chunk]
    posc = F.pad(c.pos, (0, nc * chunk - k), value=-1).view(B, nc, chunk).transpose(0, 1)
    dq = torch.zeros(nc, BH, chunk, dh, device=q.device, dtype=c.ct)
    buf_p = torch.empty(BH * chunk * max([b1 - b0 for b0, b1, _ in c.plan] or [1]), device=q.device, dtype=c.ct)
    buf_ds = torch.empty_like(buf_p)
    for b0, b1, r in c.plan:
        n = b1 - b0
        kb, vb, xb, cos, sin = c.kv(b0, b1)
        keys = torch.arange(b0, b1, device=q.device)
        dkb = torch.zeros(BH, n, dh, device=q.device, dtype=c.ct)
        dvb = torch.zeros_like(dkb)
        for j in range(r // chunk, nc):
            s = _bmm_into(q[j], kb.transpose(1, 2), buf_p)
            s.view(B, H, chunk, n).masked_fill_((posc[j, :, :, None] < keys)[:, None], -math.inf)
            p = s.sub_(lse[j, :, :, None]).exp_()  # softmax probabilities of this tile
            _baddbmm_(dvb, p.to(vb.dtype).transpose(1, 2), d_o[j])
            ds = _bmm_into(d_o[j], vb.transpose(1, 2), buf_ds).sub_(delta[j, :, :, None]).mul_(p).to(q.dtype)
            _baddbmm_(dq[j], ds, kb)
            _baddbmm_(dkb, ds.transpose(1, 2), q[j])
        c.kv_grads(dkb, dvb, xb, cos, sin, dx, dwkv, dbkv, b0, b1)
    return _from_chunks(dq, B, k)


class SelectedQueryAttention(torch.autograd.Function):
    """Selection and causal attention of the selected query rows against all keys, in one function.

    Inputs: x [L, B, h] (this rank's view), weight/bias: attention's qkv parameters of the local heads,
    sel_weight/sel_bias: the selector (or None), choose: callable(scores [B, L] or None) -> bool mask
    [B, L]. Outputs: the rows' per-head outputs sequence-first [k, B, H dh] (ready for the output
    projection), the scores s = sigmoid(w . x + b) [B, L] (empty without a selector), and the selected
    positions [B, k] ascending (-1 = padding: such rows output 0).

    Key blocks are attended one at a time and merged through their log-sum-exp (flash-attention style);
    a block starts at the first row that reaches it. On CPU each block is one call of PyTorch's fused
    flash-attention kernel (with a mask, forward and backward); elsewhere it is computed in tiles of
    one key block x one chunk of rows (kept chunk-major, contiguous per chunk) with reused buffers. K/V
    blocks are recomputed in backward. The selector's input gradient is added to the same dx (on TP rank
    0 only: x's gradient is summed over TP ranks afterwards and every rank computes the same scores), so
    the layer creates one input-sized gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, sel_weight, sel_bias, choose, sel_dx, heads, head_dim, inv_freq, rot_dim,
                block, chunk):
        L, B, h = x.shape
        scores = torch.sigmoid(score_logits(x, sel_weight, sel_bias)) if sel_weight is not None else None
        pos = selected_positions(choose(scores))
        k = pos.shape[1]
        scale = 1.0 / math.sqrt(head_dim)
        wq, wkv, bq, bkv = _split_qkv(weight, bias, heads, head_dim)
        idx = pos.clamp(min=0).t()  # [k, B]
        xs = x.gather(0, idx[..., None].expand(k, B, h))
        c = _Ctx(x, wkv, bkv, pos, heads, head_dim, inv_freq, rot_dim, _block_plan(pos, L, block))
        cos, sin = c.cos[idx] * scale, c.sin[idx] * scale
        q = _rope(F.linear(xs, wq, bq).view(k, B, heads, head_dim), cos[:, :, None], sin[:, :, None], rot_dim,
                  scale)  # [k, B, H, dh]
        del xs
        flash = _cpu_flash_available(x)
        if flash:
            o, lse = _forward_flash(c, q)
            rows = o.to(x.dtype).permute(2, 0, 1, 3).reshape(k, B, heads * head_dim)
        else:
            chunk = min(chunk, k)
            o, lse, q = _forward_tiles(c, q, chunk)
            rows = _from_chunks(o.to(x.dtype), B, k).reshape(k, B, heads * head_dim)
        del o
        ctx.save_for_backward(x, weight, bias, sel_weight, scores, pos, q, rows, lse, inv_freq)
        ctx.meta = (heads, head_dim, rot_dim, c.plan, chunk, sel_dx, flash)
        ctx.mark_non_differentiable(pos)
        return rows, scores if scores is not None else x.new_zeros(B, 0, dtype=c.ct), pos

    @staticmethod
    def backward(ctx, d_rows, d_scores, _):
        x, weight, bias, sel_weight, scores, pos, q, rows, lse, inv_freq = ctx.saved_tensors
        heads, head_dim, rot_dim, plan, chunk, sel_dx, flash = ctx.meta
        L, B, h = x.shape
        k = pos.shape[1]
        scale = 1.0 / math.sqrt(head_dim)
        wq, wkv, bq, bkv = _split_qkv(weight, bias, heads, head_dim)
        c = _Ctx(x, wkv, bkv, pos, heads, head_dim, inv_freq, rot_dim, plan)
        dx = torch.zeros_like(x)
        dwkv = torch.zeros_like(wkv)
        dbkv = torch.zeros_like(bkv) if bkv is not None else None
        if flash:
            dq = _backward_flash(c, q, rows, lse, d_rows, dx, dwkv, dbkv)
        else:
            dq = _backward_tiles(c, q, rows, lse, d_rows, dx, dwkv, dbkv, chunk)
        idx = pos.clamp(min=0).t()  # [k, B]
        cos, sin = c.cos[idx] * scale, c.sin[idx] * -scale
        dq = _rope(dq.to(x.dtype), cos[:, :, None], sin[:, :, None], rot_dim, scale).reshape(k, B, heads * head_dim)
        xs = x.gather(0, idx[..., None].expand(k, B, h))
        dwq = dq.reshape(k * B, -1).t() @ xs.reshape(k * B, h)
        del xs
        dx.scatter_add_(0, idx[..., None].expand(k, B, h), dq @ wq)
        dweight = torch.empty_like(weight).view(heads, 3, head_dim, h)
        dweight[:, 0] = dwq.view(heads, head_dim, h)
        dweight[:, 1:] = dwkv.view(heads, 2, head_dim, h)
        dbias = None
        if bias is not None:
            dbias = torch.empty_like(bias).view(heads, 3, head_dim)
            dbias[:, 0] = dq.sum((0, 1)).view(heads, head_dim)
            dbias[:, 1:] = dbkv.view(heads, 2, head_dim)
            dbias = dbias.view_as(bias)
        dsel_w = dsel_b = None
        if sel_weight is not None:
            dlogits = d_scores * scores * (1 - scores)  # [B, L]
            w = sel_weight.reshape(-1)
            dsel_w = torch.stack([torch.mv(x[:, b].t(), dlogits[b].to(x.dtype)) for b in range(B)]).sum(0)
            dsel_w = dsel_w.view_as(sel_weight)
            dsel_b = dlogits.sum().reshape(1).to(sel_weight.dtype)
            if sel_dx:
                for b in range(B):
                    dx[:, b].addr_(dlogits[b].to(x.dtype), w)
        return (dx, dweight.view_as(weight), dbias, dsel_w, dsel_b) + (None,) * 8


def tile_sizes(requested_block: int, batch: int, heads: int, L: int) -> tuple[int, int]:
    """(key block, row chunk): `requested_block` keys (0: 256), and rows so that a tile
    [batch * heads, rows, block] stays near _TILE_ELEMENTS (a power of two, at least 16; tiles only)."""
    block = min(requested_block if requested_block > 0 else 256, L)
    rows = _TILE_ELEMENTS // max(1, batch * heads * block)
    return block, 1 << max(4, rows.bit_length() - 1) if rows > 0 else 16
