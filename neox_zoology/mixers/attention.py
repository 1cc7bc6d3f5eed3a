"""Causal multi-head attention with rotary embeddings (the baseline every mixer is compared to).

Heads split over tensor parallelism: the QKV projection is column-parallel with a per-head [q|k|v]
layout (so a contiguous TP shard holds whole heads), the output projection row-parallel.
`window` > 0 restricts each query to the last `window` keys (sliding-window attention).

Grouped-query attention (`num_kv_heads` below the number of heads): query head i reads key/value head
i // (heads / num_kv_heads). The query projection is column-parallel over heads; the key/value projection
(per kv head [k|v]) is column-parallel when the kv heads divide over the TP ranks, and otherwise replicated
on every rank (each rank uses the one kv head its query heads read; the gradient of the replicated weight
is summed over the TP ranks).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from neox_zoology import flops
from neox_zoology.mixers.base import Mixer
from neox_zoology.parallel import ColumnLinear, RowLinear, copy_to_tp, tp_rank, tp_size
from neox_zoology.parallel.cpu_compat import tp_region_rng
from neox_zoology.registry import STATE_BYTES, MixerSpec, is_number, register


class Rotary(nn.Module):
    """GPT-NeoX rotary embedding on the first `dim` channels of each head (rotate-half layout)."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.register_buffer(
            "inv_freq", 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim), persistent=False
        )

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """x [b, heads, L, head_dim] -> same, positions start..start+L-1."""
        if self.dim == 0:
            return x
        L = x.shape[-2]
        t = torch.arange(start, start + L, device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(x.device))
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        r1, r2 = rot.chunk(2, dim=-1)
        rotated = rot * cos + torch.cat([-r2, r1], dim=-1) * sin
        return torch.cat([rotated, rest], dim=-1)


def causal_mask(L: int, window: int, device) -> torch.Tensor | None:
    """Boolean [L, L] mask (True = may attend) for a sliding window; None for full causal."""
    if window <= 0 or window >= L:
        return None
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    return (j <= i) & (j > i - window)


class CausalSelfAttention(Mixer):
    def __init__(
        self,
        config,
        layer_number: int = 1,
        *,
        seq_length: int,
        pos_emb: str = "rotary",
        rotary_pct: float = 1.0,
        rotary_emb_base: float = 10000.0,
        window: int = 0,
        num_kv_heads: int | None = None,
        sliding_window_width: int | None = None,
        **stack_kwargs,
    ):
        super().__init__(config, layer_number, **stack_kwargs)
        h, heads = config.hidden_size, config.num_attention_heads
        kv = num_kv_heads or heads
        tp = tp_size()
        self.head_dim = hd = h // heads
        self.local_heads = heads // tp
        self.window = effective_window({"window": window, "sliding_window_width": sliding_window_width})
        self.dropout = config.attention_dropout
        self.num_kv_heads = kv
        bias = config.add_bias_linear
        col = dict(config=config, init_method=config.init_method, bias=bias, gather_output=False)
        if kv == heads:
            self.qkv = ColumnLinear(h, 3 * h, **col)
        else:
            self.q = ColumnLinear(h, h, **col)
            self.replicated_kv = kv % tp != 0
            if not self.replicated_kv:
                self.kv = ColumnLinear(h, 2 * kv * hd, **col)
                self.local_kv_heads = kv // tp
            else:  # tp % kv == 0: every rank's query heads read one kv head
                # same parameter names (kv.weight, kv.bias) as the column-parallel form, full size on each rank
                self.kv = nn.Module()
                self.kv.weight = nn.Parameter(torch.empty(2 * kv * hd, h, dtype=config.params_dtype))
                self.kv.bias = nn.Parameter(torch.zeros(2 * kv * hd, dtype=config.params_dtype)) if bias else None
                if config.perform_initialization:
                    config.init_method(self.kv.weight)
                self.local_kv_heads = 1
                self.kv_index = tp_rank() * self.local_heads // (heads // kv)
        self.out = RowLinear(
            h, h, config=config, init_method=config.output_layer_init_method, bias=config.add_bias_linear,
            input_is_parallel=True, skip_bias_add=False,
        )
        rot_dim = int(self.head_dim * rotary_pct) // 2 * 2 if pos_emb == "rotary" else 0
        self.rotary = Rotary(rot_dim, rotary_emb_base)

    def _grouped_qkv(self, x):
        """q [b, heads, s, hd] and k, v [b, kv heads, s, hd] of this rank."""
        s, b, _ = x.shape
        q, _ = self.q(x)
        q = q.view(s, b, self.local_heads, self.head_dim).permute(1, 2, 0, 3)
        if self.replicated_kv:
            rows = slice(2 * self.head_dim * self.kv_index, 2 * self.head_dim * (self.kv_index + 1))
            weight = copy_to_tp(self.kv.weight)[rows]  # all-reduce of the weight's gradient over TP ranks
            bias = copy_to_tp(self.kv.bias)[rows] if self.kv.bias is not None else None
            kv = F.linear(copy_to_tp(x), weight, bias)
        else:
            kv, _ = self.kv(x)
        k, v = kv.view(s, b, self.local_kv_heads, 2, self.head_dim).permute(3, 1, 2, 0, 4).unbind(0)
        return q, k, v

    def forward(self, hidden_states, attention_mask=None, token_ids=None, **ignored):
        s, b, _ = hidden_states.shape
        if self.num_kv_heads == self.local_heads * tp_size():
            qkv, _ = self.qkv(hidden_states)
            q, k, v = qkv.view(s, b, self.local_heads, 3, self.head_dim).permute(3, 1, 2, 0, 4).unbind(0)
        else:
            q, k, v = self._grouped_qkv(hidden_states)
            group = self.local_heads // self.local_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        q, k = self.rotary(q), self.rotary(k)  # [b, heads, s, head_dim]
        mask = causal_mask(s, self.window, q.device)
        p = self.dropout if self.training else 0.0
        with tp_region_rng(p > 0):  # heads differ per TP rank, so does their dropout
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None)
        o = o.permute(2, 0, 1, 3).reshape(s, b, self.local_heads * self.head_dim)
        y, _ = self.out(o)
        return y, None

    # -- decoding: a KV cache (the last `window` positions only, as a ring buffer, for sliding windows)
    def initial_state(self, batch: int, dtype=torch.float32, device=None) -> dict:
        """Empty cache: k, v [b, kv heads, 0, head_dim] (kept whole) or [b, kv heads, window, head_dim] (ring)."""
        kv = self.local_heads if self.num_kv_heads == self.local_heads * tp_size() else self.local_kv_heads
        size = self.window if self.window > 0 else 0
        z = torch.zeros(batch, kv, size, self.head_dim, dtype=dtype, device=device)
        return {"k": z, "v": z.clone(), "pos": 0}

    def _qkv_seq(self, x):
        """x [s, b, h] -> q [b, heads, s, hd], k, v [b, kv heads, s, hd] (unrotated)."""
        s, b, _ = x.shape
        if self.num_kv_heads == self.local_heads * tp_size():
            qkv, _ = self.qkv(x)
            return qkv.view(s, b, self.local_heads, 3, self.head_dim).permute(3, 1, 2, 0, 4).unbind(0)
        return self._grouped_qkv(x)

    def step(self, x: torch.Tensor, state: dict):
        """One position: x [b, h] -> (y [b, h], new state); equal to forward's output at that position."""
        t = state["pos"]
        q, k, v = self._qkv_seq(x[None])
        q, k = self.rotary(q, t), self.rotary(k, t)
        if self.window > 0:  # ring buffer: slot t mod window holds position t
            K, V = state["k"].clone(), state["v"].clone()
            K[:, :, t % self.window], V[:, :, t % self.window] = k[:, :, 0], v[:, :, 0]
            valid = torch.arange(self.window, device=x.device) <= t
            mask = valid[None, None, None, :]
        else:
            K, V, mask = torch.cat([state["k"], k], 2), torch.cat([state["v"], v], 2), None
        group = self.local_heads // K.shape[1]
        Ke, Ve = (K, V) if group == 1 else (K.repeat_interleave(group, 1), V.repeat_interleave(group, 1))
        o = F.scaled_dot_product_attention(q, Ke, Ve, attn_mask=mask)  # [b, heads, 1, hd]
        y, _ = self.out(o[:, :, 0].reshape(x.shape[0], self.local_heads * self.head_dim))
        return y, {"k": K, "v": V, "pos": t + 1}

    def prefill_state(self, x: torch.Tensor, token_ids=None) -> dict:
        """The state after the positions of x [s, b, h]: their rotated keys and values, in one pass."""
        s = x.shape[0]
        _, k, v = self._qkv_seq(x)
        k = self.rotary(k)
        if self.window <= 0:
            return {"k": k, "v": v, "pos": s}
        state = self.initial_state(x.shape[1], k.dtype, x.device)
        keep = torch.arange(max(0, s - self.window), s, device=x.device)
        state["k"][:, :, keep % self.window] = k[:, :, keep]
        state["v"][:, :, keep % self.window] = v[:, :, keep]
        state["pos"] = s
        return state


def effective_window(args) -> int:
    """`window`, or GPT-NeoX's sliding_window_width w as flash-attn's window_size (w, 0): the current position
    and the w before it."""
    w = args.get("sliding_window_width")
    return w + 1 if w else args["window"]


def _flops(shape, args):
    d, heads = shape.hidden_size, shape.num_attention_heads
    kv_width = 2 * (args.get("num_kv_heads") or heads) * (d // heads)
    return (flops.linear(d, d + kv_width) + flops.linear(d, d)
            + flops.attention_core(d, shape.seq_length, effective_window(args)))


def validate_attention(shape, args, need_window=False):
    errors = []
    w = args["window"]
    if not isinstance(w, int) or isinstance(w, bool) or w < 0 or (need_window and w == 0):
        errors.append(f"window: {w!r}; use a positive number of positions (e.g. 256)")
    if args["pos_emb"] not in ("rotary", "learned", "none"):
        errors.append(f"pos_emb: {args['pos_emb']!r}; use rotary, learned or none")
    sw = args.get("sliding_window_width")
    if sw is not None and (not isinstance(sw, int) or isinstance(sw, bool) or sw <= 0):
        errors.append(f"sliding_window_width: {sw!r}; use a positive number of positions (or null)")
    kv = args.get("num_kv_heads")
    if kv is not None and (not isinstance(kv, int) or isinstance(kv, bool) or kv <= 0
                           or shape.num_attention_heads % kv):
        errors.append(f"num_kv_heads: {kv!r}; use a divisor of num_attention_heads {shape.num_attention_heads}")
    pct, base = args["rotary_pct"], args["rotary_emb_base"]
    if not (is_number(pct) and math.isfinite(pct)) or not 0.0 <= pct <= 1.0:
        errors.append(f"rotary_pct: {pct!r}; use a fraction in [0, 1]")
    if not (is_number(base) and math.isfinite(base)) or not base > 0:
        errors.append(f"rotary_emb_base: {base!r}; use a positive number, e.g. 10000")
    return errors


_GLOBALS = ("pos_emb", "rotary_pct", "rotary_emb_base", "num_kv_heads", "sliding_window_width")
_DEFAULTS = {"pos_emb": "rotary", "rotary_pct": 1.0, "rotary_emb_base": 10000.0, "num_kv_heads": None,
             "sliding_window_width": None}

def _state_bytes(shape, args, seq_len):
    """The KV cache: keys and values of the last min(L, window) positions (all of them without a window)."""
    window = args.get("window") or args.get("sliding_window_width") or seq_len
    kv = (args.get("num_kv_heads") or shape.num_attention_heads) / shape.num_attention_heads
    return 2.0 * min(seq_len, window) * shape.hidden_size * kv * STATE_BYTES


register(
    MixerSpec(
        name="attention",
        module=CausalSelfAttention,
        defaults={**_DEFAULTS, "window": 0},
        inherits=_GLOBALS,
        aliases=("global", "flash"),
        tp_split="heads",
        flops=_flops,
        validate=validate_attention,
        state_bytes=_state_bytes,
        doc="causal multi-head attention, SDPA, rotary per `pos_emb`/`rotary_pct`",
    )
)

register(
    MixerSpec(
        name="sliding_window",
        module=CausalSelfAttention,
        defaults={**_DEFAULTS, "window": 256},
        inherits=_GLOBALS,
        tp_split="heads",
        flops=_flops,
        validate=lambda shape, args: validate_attention(shape, args, need_window=True),
        state_bytes=_state_bytes,
        doc="causal attention over the last `window` positions",
    )
)
