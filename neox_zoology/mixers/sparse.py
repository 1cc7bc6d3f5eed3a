"""Selection-based sparse attention (Zoology section 5, Table 2): attention only at selected queries.

A selection function marks query positions; each selected position t attends causally to all keys
j <= t, every other position is left to the residual stream (the mixer outputs 0 there):

    y_t = g_t * W_o softmax_{j <= t}(q_t . k_j / sqrt(d_h)) v_j     if t is selected,  y_t = 0 otherwise

with g_t = 1 for random and programmatic selection and g_t = s_t (the selector's score) for learned
selection, so the selector receives gradients from the language-model loss.

| layer type            | selection                                                                  |
|-----------------------|----------------------------------------------------------------------------|
| `sparse_random`       | each position with probability `p` (a control)                             |
| `sparse_programmatic` | t whose token (`match: token`, the paper's rule) or whose bigram ending at |
|                       | t (`match: bigram`) already occurred earlier in the sequence (raw ids)     |
| `sparse_learned`      | s = sigmoid(w . x); training: top-k of s + N(0, noise_std^2) over the      |
|                       | sequence (`train_selection: topk`, NOT causal) or s + noise >= tau         |
|                       | (`threshold`); evaluation: always s >= tau (causal by construction)        |

`k` (learned) is `topk`, else `ceil(budget * L)`, else ceil(sqrt(L)) (Zoology's default n_lookups).
tau is an exponential moving average of the k-th largest score per sequence, updated on training
steps (averaged over data-parallel ranks) and kept in a buffer, so it is checkpointed. Until the first
training step tau is 0.5. Evaluation with the threshold rule selects a data-dependent number of
positions; only top-k training bounds it by k.

Auxiliary sparsity loss (learned): aux = aux_loss_coef * relu(mean(s) - k / L), the mean over all
positions of the micro-batch (Zoology's formulation). It is not added to the language-model loss:
`AuxLossInjector` passes the layer output through unchanged and, in backward, adds
d(aux * scale)/d(inputs) (so the gradient reaches w and the layer input on whichever pipeline stage the
layer lives, without crossing stages). `set_aux_loss_scale(scale)` sets `scale`; the trainer calls it
every step with 1 / gradient_accumulation_steps times the fp16 loss scale (1 without fp16), which is
what DeepSpeed applies to the language-model loss on every stage: `engine.backward(loss)` divides the
loss by gradient_accumulation_steps and multiplies it by the fp16 loss scale, the pipeline engine's last
stage does the same and earlier stages receive gradients that already carry both factors, and data
parallelism averages gradients over replicas (so each replica's aux gradient needs nothing extra).

Kernel (`SelectedQueryAttention`, one autograd function): the selector scores (learned), the
selection, the query projection of the gathered selected rows, and attention of those rows against
all keys. K and V are projected block by block (`block_size` key positions, default 256) and never
kept: a running softmax over key blocks (flash-attention style) gives the outputs, and backward
recomputes each K/V block. Selected rows are sorted by position, so a key block meets only the rows at
or after it (about half the k x L products). Tiles of one key block x one chunk of rows are written into
reused buffers. Time O(k L d); memory beyond the layer's input, output and input gradient
O(k d + block d + tile), nothing of size L x L or a full K/V.

Tensor parallelism: heads split as in `attention` (same qkv/out parameters and layout; the rotary
embedding is attention's). Whatever must agree across TP ranks is identical by construction: the
selector w is replicated and every rank computes the same scores; random draws and exploration noise
come from a per-layer generator seeded by (a seed drawn at initialisation, the layer's draw counter,
the data-parallel rank). Both numbers are state-dict entries (checkpointed). The counter advances on
grad-enabled training forwards only, so draws change every micro-batch, do not depend on how layers
are split over pipeline stages, and a reentrant activation-checkpoint recompute (forward under
no_grad, then with grad) draws the same positions. Evaluation draws (random) use a fixed per-layer
seed, so evaluation is reproducible.

`collect_stats(model)` returns, per sparse layer, the aux loss, the fraction of positions selected and
(learned) tau, averaged over the training forwards since the previous call.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from torch import nn

from neox_zoology import flops
from neox_zoology.mixers.attention import Rotary
from neox_zoology.mixers.attention import _validate as _attention_validate
from neox_zoology.mixers.base import Mixer
from neox_zoology.parallel import ColumnLinear, RowLinear, copy_to_tp, tp_rank, tp_size
from neox_zoology.registry import MixerSpec, register

# ------------------------------------------------------------------------------------ aux loss

_AUX_LOSS_SCALE = 1.0


def set_aux_loss_scale(scale: float) -> None:
    """Factor applied to every sparse layer's aux-loss gradient (1 / grad. accumulation x fp16 loss scale)."""
    global _AUX_LOSS_SCALE
    scale = float(scale)
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"aux-loss scale {scale!r}: use a finite non-negative number "
                         f"(1 / gradient_accumulation_steps x the fp16 loss scale)")
    _AUX_LOSS_SCALE = scale


def aux_loss_scale() -> float:
    return _AUX_LOSS_SCALE


class AuxLossInjector(torch.autograd.Function):
    """Identity on `activations`; in backward also sends d(aux_loss * scale) into aux_loss's graph."""

    @staticmethod
    def forward(ctx, activations, aux_loss):
        ctx.save_for_backward(aux_loss)
        return activations

    @staticmethod
    def backward(ctx, grad):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.full_like(aux_loss, _AUX_LOSS_SCALE)


# ------------------------------------------------------------------------------------ selection rules


def programmatic_selection(token_ids: torch.Tensor, match: str = "token") -> torch.Tensor:
    """Token ids [B, L] -> bool [B, L]: the token at t (`token`), or the bigram (t-1, t) (`bigram`),
    already occurred earlier in the same row. Depends on ids[: t + 1] only (causal).

    A stable sort groups equal keys with their earliest occurrence first; every other member of a
    group is a repeat.
    """
    ids = token_ids.long()
    B, L = ids.shape
    out = torch.zeros(B, L, dtype=torch.bool, device=ids.device)
    if match == "token":
        keys, first = ids, 0
    elif match == "bigram":
        if L < 2:
            return out
        keys, first = (ids[:, :-1] << 32) | ids[:, 1:], 1  # ids < 2^31
    else:
        raise ValueError(f"match: {match!r}; use 'token' or 'bigram'")
    sorted_keys, order = keys.sort(dim=1, stable=True)
    repeat = torch.zeros_like(sorted_keys, dtype=torch.bool)
    repeat[:, 1:] = sorted_keys[:, 1:] == sorted_keys[:, :-1]
    out[:, first:] = torch.zeros_like(repeat).scatter_(1, order, repeat)
    return out


def topk_selection(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool [B, L] marking the k highest scores of each row (over the whole row: not causal)."""
    idx = scores.topk(k, dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def selected_positions(mask: torch.Tensor) -> torch.Tensor:
    """bool [B, L] -> the selected positions of each row, ascending, [B, kmax] (kmax = the largest count,
    at least 1); rows with fewer selected positions are left-padded with -1."""
    B, L = mask.shape
    kmax = max(int(mask.sum(1).max()), 1) if mask.numel() else 1
    ar = torch.arange(L, device=mask.device).expand(B, L)
    return torch.where(mask, ar, -1).sort(dim=1).values[:, L - kmax:]


def learned_k(L: int, topk: int | None, budget: float | None) -> int:
    """Positions per sequence for learned selection: topk, else ceil(budget * L), else ceil(sqrt(L))."""
    if topk is not None:
        k = topk
    elif budget is not None:
        k = math.ceil(budget * L - 1e-9)
    else:
        k = math.ceil(math.sqrt(L))
    return max(1, min(L, int(k)))


def _mix_seed(seed: int, counter: int, stream: int) -> int:
    """A 63-bit generator seed from (layer seed, draw counter, stream) (splitmix64-style mixing)."""
    z = (seed + 0x9E3779B97F4A7C15 * (counter + 1) + 0xBF58476D1CE4E5B9 * (stream + 1)) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


def _distributed() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and parallel_state.model_parallel_is_initialized())


def _dp_rank() -> int:
    return parallel_state.get_data_parallel_rank() if _distributed() else 0


def _dp_mean(t: torch.Tensor) -> torch.Tensor:
    if not _distributed():
        return t
    group = parallel_state.get_data_parallel_group()
    n = torch.distributed.get_world_size(group)
    if n == 1:
        return t
    t = t.clone()
    torch.distributed.all_reduce(t, group=group)
    return t / n


# ------------------------------------------------------------------------------------ kernel

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


# ------------------------------------------------------------------------------------ layers


class SparseAttention(Mixer):
    """Attention at selected query positions; subclasses choose the positions (`chooser`)."""

    # data-dependent selection and the in-place rotary views do not trace: stays eager under `compile: true`
    supports_compile = False

    def __init__(
        self,
        config,
        layer_number: int = 1,
        *,
        seq_length: int,
        pos_emb: str = "rotary",
        rotary_pct: float = 1.0,
        rotary_emb_base: float = 10000.0,
        attention_dropout: float = 0.0,
        block_size: int = 0,
        **stack_kwargs,
    ):
        super().__init__(config, layer_number, **stack_kwargs)
        if attention_dropout or config.attention_dropout:
            raise ValueError(
                f"{type(self).__name__}: attention_dropout {attention_dropout or config.attention_dropout} is not "
                f"supported by sparse attention layers; set attention_dropout: 0"
            )
        h, heads = config.hidden_size, config.num_attention_heads
        self.head_dim = h // heads
        self.local_heads = heads // tp_size()
        self.block_size = block_size
        self.qkv = ColumnLinear(
            h, 3 * h, config=config, init_method=config.init_method, bias=config.add_bias_linear,
            gather_output=False,
        )
        self.out = RowLinear(
            h, h, config=config, init_method=config.output_layer_init_method, bias=config.add_bias_linear,
            input_is_parallel=True, skip_bias_add=False,
        )
        rot_dim = int(self.head_dim * rotary_pct) // 2 * 2 if pos_emb == "rotary" else 0
        self.rotary = Rotary(rot_dim, rotary_emb_base)
        # the layer's random stream: a seed drawn like a weight (same on every rank of a replica), a counter
        self.selection_seed = int(torch.randint(0, 2**62, (1,), device="cpu"))
        self.draws = 0
        self._stat_sums: dict[str, torch.Tensor] = {}
        self._stat_count = 0

    def get_extra_state(self):
        return {"selection_seed": self.selection_seed, "draws": self.draws}

    def set_extra_state(self, state):
        self.selection_seed, self.draws = int(state["selection_seed"]), int(state["draws"])

    def generator(self, device) -> torch.Generator:
        """This forward's generator: in training it changes with the draw counter and the DP rank; in
        evaluation it is fixed."""
        if self.training:
            seed = _mix_seed(self.selection_seed, self.draws, _dp_rank())
        else:
            seed = _mix_seed(self.selection_seed, -1, -1)
        return torch.Generator(device=device).manual_seed(seed)

    # -- what subclasses define
    def selector_params(self):
        return None, None

    def chooser(self, hidden_states, token_ids):
        """callable(scores [B, L] or None) -> bool mask [B, L] of the query positions to attend from."""
        raise NotImplementedError

    def after_selection(self, scores, L: int, advancing: bool):
        """(aux loss or None, extra statistics) once the scores are known."""
        return None, {}

    def scores(self, hidden_states):
        w, b = self.selector_params()
        return torch.sigmoid(score_logits(hidden_states, w, b)) if w is not None else None

    def select(self, hidden_states, token_ids=None):
        """The positions this forward would attend from, without attending (for inspection): mask [B, L]."""
        with torch.no_grad():
            return self.chooser(hidden_states, token_ids)(self.scores(hidden_states))

    def forward(self, hidden_states, attention_mask=None, token_ids=None, **ignored):
        L, B, _ = hidden_states.shape
        advancing = self.training and torch.is_grad_enabled()
        sel_w, sel_b = self.selector_params()
        block, chunk = tile_sizes(self.block_size, B, self.local_heads, L)
        o, scores, pos = SelectedQueryAttention.apply(
            copy_to_tp(hidden_states), self.qkv.weight, self.qkv.bias, sel_w, sel_b,
            self.chooser(hidden_states, token_ids), tp_rank() == 0, self.local_heads, self.head_dim,
            self.rotary.inv_freq, self.rotary.dim, block, chunk,
        )
        rows, _ = self.out(o)  # [k, B, h]
        idx = pos.clamp(min=0)
        weight = (pos >= 0).to(rows.dtype)
        if sel_w is not None:
            weight = weight * scores.gather(1, idx).to(rows.dtype)
        rows = rows * weight.t()[..., None]
        h = rows.shape[-1]
        y = rows.new_zeros(B, L, h).scatter_add_(1, idx[..., None].expand(-1, -1, h), rows.transpose(0, 1))
        y = y.transpose(0, 1)
        aux, extra = self.after_selection(scores if sel_w is not None else None, L, advancing)
        if aux is not None and torch.is_grad_enabled():
            y = AuxLossInjector.apply(y, aux)
        if advancing:
            fraction = (pos >= 0).sum() / (B * L)
            self._record(selected_fraction=fraction, **({"aux_loss": aux} if aux is not None else {}), **extra)
            self.draws += 1
        return y, None

    def _record(self, **values):
        for name, v in values.items():
            v = v.detach().float()
            self._stat_sums[name] = self._stat_sums[name] + v if name in self._stat_sums else v
        self._stat_count += 1

    def pop_stats(self) -> dict[str, tuple[float, int]]:
        """{name: (sum, count)} over the training forwards since the last call; resets."""
        out = {name: (float(v), self._stat_count) for name, v in self._stat_sums.items()}
        self._stat_sums, self._stat_count = {}, 0
        return out


class RandomSparseAttention(SparseAttention):
    def __init__(self, config, layer_number: int = 1, *, seq_length: int, p: float = 0.125, **kwargs):
        super().__init__(config, layer_number, seq_length=seq_length, **kwargs)
        self.p = p

    def chooser(self, hidden_states, token_ids):
        L, B, _ = hidden_states.shape
        g = self.generator(hidden_states.device)
        return lambda scores: torch.rand(B, L, generator=g, device=hidden_states.device) < self.p


class ProgrammaticSparseAttention(SparseAttention):
    def __init__(self, config, layer_number: int = 1, *, seq_length: int, match: str = "token", **kwargs):
        super().__init__(config, layer_number, seq_length=seq_length, **kwargs)
        if match not in ("token", "bigram"):
            raise ValueError(f"sparse_programmatic.match: {match!r}; use 'token' or 'bigram'")
        self.match = match

    def chooser(self, hidden_states, token_ids):
        L, B, _ = hidden_states.shape
        if token_ids is None:
            raise ValueError(
                "sparse_programmatic needs the raw token ids: call the layer with token_ids=[batch, seq] (the GPT "
                "layer specs carry them from the embedding stage), or use sparse_learned / sparse_random"
            )
        if tuple(token_ids.shape) != (B, L):
            raise ValueError(f"sparse_programmatic: token_ids of shape {tuple(token_ids.shape)} for hidden states "
                             f"of {L} positions x batch {B}; pass token ids [batch, seq]")
        return lambda scores: programmatic_selection(token_ids, self.match)


class Selector(nn.Module):
    """The parameters of s = sigmoid(w . x + b) per position; w is replicated over tensor-parallel ranks."""

    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, config.hidden_size, dtype=config.params_dtype))
        self.bias = nn.Parameter(torch.zeros(1, dtype=config.params_dtype))
        if config.perform_initialization:
            with torch.no_grad():
                config.init_method(self.weight)


class LearnedSparseAttention(SparseAttention):
    def __init__(self, config, layer_number: int = 1, *, seq_length: int, topk: int | None = None,
                 budget: float | None = None, noise_std: float = 0.01, aux_loss_coef: float = 1e-3,
                 train_selection: str = "topk", threshold_momentum: float = 0.99, **kwargs):
        super().__init__(config, layer_number, seq_length=seq_length, **kwargs)
        if train_selection not in ("topk", "threshold"):
            raise ValueError(f"sparse_learned.train_selection: {train_selection!r}; use 'topk' or 'threshold'")
        self.topk, self.budget = topk, budget
        self.noise_std, self.aux_loss_coef = noise_std, aux_loss_coef
        self.train_selection, self.threshold_momentum = train_selection, threshold_momentum
        self.selector = Selector(config)
        self.register_buffer("threshold", torch.tensor(0.5))
        self.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.long))

    def k(self, L: int) -> int:
        return learned_k(L, self.topk, self.budget)

    def selector_params(self):
        return self.selector.weight, self.selector.bias

    def chooser(self, hidden_states, token_ids):
        L, B, _ = hidden_states.shape
        tau = self.threshold.detach().float().clone()
        if not self.training:
            return lambda s: s >= tau
        g = self.generator(hidden_states.device) if self.noise_std > 0 else None

        def choose(s):
            noisy = s + self.noise_std * torch.randn(B, L, generator=g, device=s.device) if g is not None else s
            return topk_selection(noisy, self.k(L)) if self.train_selection == "topk" else noisy >= tau

        return choose

    def after_selection(self, scores, L, advancing):
        if not self.training:
            return None, {}
        tau = self.threshold.detach().float().clone()
        k = self.k(L)
        if advancing:  # calibrate the evaluation threshold to the budget: EMA of the k-th largest score
            kth = _dp_mean(scores.detach().topk(k, dim=1).values[:, -1].mean())
            first = self.threshold_updates == 0
            new = torch.where(first, kth, self.threshold_momentum * tau + (1 - self.threshold_momentum) * kth)
            self.threshold.copy_(new)
            self.threshold_updates += 1
        aux = self.aux_loss_coef * torch.relu(scores.mean() - k / L) if self.aux_loss_coef > 0 else None
        return aux, {"threshold": tau}


# ------------------------------------------------------------------------------------ statistics


def sparse_layers(model: nn.Module) -> list[SparseAttention]:
    return [m for m in model.modules() if isinstance(m, SparseAttention)]


def collect_stats(model: nn.Module, all_ranks: bool = True) -> dict[str, float]:
    """Per sparse layer N: `sparse/layerN/selected_fraction`, and for learned layers `.../aux_loss` and
    `.../threshold`, averaged over the training forwards since the previous call (then reset).

    With `all_ranks` (default) and torch.distributed initialised this is a collective over all ranks
    (call it on every rank at the same step): layers on other pipeline stages are included and values
    are averaged over data-parallel replicas, so every rank returns the same dict.
    """
    local: dict[str, tuple[float, int]] = {}
    for layer in sparse_layers(model):
        for name, (total, count) in layer.pop_stats().items():
            local[f"sparse/layer{layer.layer_number}/{name}"] = (total, count)
    parts = [local]
    if all_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, local)
    merged: dict[str, list] = {}
    for part in parts:
        for key, (total, count) in part.items():
            acc = merged.setdefault(key, [0.0, 0])
            acc[0] += total
            acc[1] += count
    return {key: total / count for key, (total, count) in sorted(merged.items()) if count}


# ------------------------------------------------------------------------------------ registry


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _validate_common(name: str, shape, args) -> list[str]:
    errors = [f"{name}.{e}" for e in _attention_validate(shape, {**args, "window": 0})]
    drop = args["attention_dropout"]
    if not _is_number(drop) or drop != 0:
        errors.append(f"{name}: attention_dropout {drop!r} is not supported by sparse attention layers; "
                      f"set attention_dropout: 0")
    bs = args["block_size"]
    if not isinstance(bs, int) or isinstance(bs, bool) or bs < 0:
        errors.append(f"{name}.block_size: {bs!r}; use a positive number of key positions per block, or 0 for the "
                      f"default (256)")
    return errors


def _validate_random(shape, args):
    errors = _validate_common("sparse_random", shape, args)
    p = args["p"]
    if not _is_number(p) or not 0 < p <= 1:
        errors.append(f"sparse_random.p: {p!r} is outside (0, 1]; use a selection probability such as 0.125")
    return errors


def _validate_programmatic(shape, args):
    errors = _validate_common("sparse_programmatic", shape, args)
    if args["match"] not in ("token", "bigram"):
        errors.append(f"sparse_programmatic.match: {args['match']!r}; use 'token' (the paper's rule) or 'bigram'")
    if not getattr(shape, "token_ids", True):
        errors.append(
            "sparse_programmatic: raw token ids cannot reach this layer in this setup (it selects positions from "
            "them); build the model from the GPT layer specs, which carry token ids from the embedding stage "
            "through the pipeline, or use sparse_learned / sparse_random"
        )
    return errors


def _validate_learned(shape, args):
    errors = _validate_common("sparse_learned", shape, args)
    topk, budget, L = args["topk"], args["budget"], shape.seq_length
    if topk is not None and (not isinstance(topk, int) or isinstance(topk, bool) or not 0 < topk <= L):
        errors.append(f"sparse_learned.topk: {topk!r}; use a number of positions in [1, seq_length {L}], "
                      f"or set budget (a fraction of the sequence) instead")
    if budget is not None and (not _is_number(budget) or not 0 < budget <= 1):
        errors.append(f"sparse_learned.budget: {budget!r} is outside (0, 1]; use a fraction of the positions "
                      f"such as 0.125")
    if topk is not None and budget is not None:
        errors.append(f"sparse_learned: both topk ({topk}) and budget ({budget}) are set; set one of them")
    if args["train_selection"] not in ("topk", "threshold"):
        errors.append(f"sparse_learned.train_selection: {args['train_selection']!r}; use 'topk' (top-k over the "
                      f"sequence, not causal) or 'threshold' (causal)")
    for key in ("noise_std", "aux_loss_coef"):
        v = args[key]
        if not _is_number(v) or v < 0 or not math.isfinite(v):
            errors.append(f"sparse_learned.{key}: {v!r}; use a non-negative number")
    mom = args["threshold_momentum"]
    if not _is_number(mom) or not 0 <= mom < 1:
        errors.append(f"sparse_learned.threshold_momentum: {mom!r}; use a number in [0, 1), e.g. 0.99")
    return errors


def _fraction(layer_type: str, args, L: int) -> float:
    """Expected fraction of selected query positions (programmatic: data-dependent, counted as 1)."""
    if layer_type == "sparse_random":
        return float(args["p"])
    if layer_type == "sparse_learned":
        return learned_k(L, args["topk"], args["budget"]) / L
    return 1.0


def _flops_for(layer_type: str):
    def f(shape, args):
        d, L = shape.hidden_size, shape.seq_length
        frac = _fraction(layer_type, args, L)
        total = flops.linear(d, 2 * d)  # K and V at every position
        total += frac * (2 * flops.linear(d, d) + flops.attention_core(d, L))  # Q, output, scores/values
        if layer_type == "sparse_learned":
            total += flops.linear(d, 1)
        return total

    return f


_GLOBALS = ("pos_emb", "rotary_pct", "rotary_emb_base", "attention_dropout")
_COMMON = {"pos_emb": "rotary", "rotary_pct": 1.0, "rotary_emb_base": 10000.0, "attention_dropout": 0.0,
           "block_size": 0}

register(
    MixerSpec(
        name="sparse_random",
        module=RandomSparseAttention,
        defaults={**_COMMON, "p": 0.125},
        inherits=_GLOBALS,
        tp_split="heads",
        flops=_flops_for("sparse_random"),
        validate=_validate_random,
        doc="causal attention at positions drawn with probability p (Zoology's random-selection control)",
    )
)

register(
    MixerSpec(
        name="sparse_programmatic",
        module=ProgrammaticSparseAttention,
        defaults={**_COMMON, "match": "token"},
        inherits=_GLOBALS,
        tp_split="heads",
        flops=_flops_for("sparse_programmatic"),
        validate=_validate_programmatic,
        needs_token_ids=True,
        doc="causal attention at positions whose token (or bigram) already occurred earlier (raw token ids)",
    )
)

register(
    MixerSpec(
        name="sparse_learned",
        module=LearnedSparseAttention,
        defaults={**_COMMON, "topk": None, "budget": None, "noise_std": 0.01, "aux_loss_coef": 1e-3,
                  "train_selection": "topk", "threshold_momentum": 0.99},
        inherits=_GLOBALS,
        tp_split="heads",
        flops=_flops_for("sparse_learned"),
        validate=_validate_learned,
        doc="causal attention at positions chosen by a sigmoid selector (top-k in training, threshold in "
            "evaluation) with an auxiliary sparsity loss",
    )
)
