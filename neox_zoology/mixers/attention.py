"""Causal multi-head attention with rotary embeddings (the baseline every mixer is compared to).

Heads split over tensor parallelism: the QKV projection is column-parallel with a per-head [q|k|v]
layout (so a contiguous TP shard holds whole heads), the output projection row-parallel.
`window` > 0 restricts each query to the last `window` keys (sliding-window attention).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neox_zoology import flops
from neox_zoology.mixers.base import Mixer
from neox_zoology.parallel import ColumnLinear, RowLinear, tp_size
from neox_zoology.parallel.cpu_compat import tp_region_rng
from neox_zoology.registry import MixerSpec, register


class Rotary(nn.Module):
    """GPT-NeoX rotary embedding on the first `dim` channels of each head (rotate-half layout)."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.register_buffer(
            "inv_freq", 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, heads, L, head_dim] -> same, positions 0..L-1."""
        if self.dim == 0:
            return x
        L = x.shape[-2]
        t = torch.arange(L, device=x.device, dtype=torch.float32)
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
        **stack_kwargs,
    ):
        super().__init__(config, layer_number, **stack_kwargs)
        h, heads = config.hidden_size, config.num_attention_heads
        self.head_dim = h // heads
        self.local_heads = heads // tp_size()
        self.window = window
        self.dropout = config.attention_dropout
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

    def forward(self, hidden_states, attention_mask=None, token_ids=None, **ignored):
        s, b, _ = hidden_states.shape
        qkv, _ = self.qkv(hidden_states)
        q, k, v = qkv.view(s, b, self.local_heads, 3, self.head_dim).permute(3, 1, 2, 0, 4).unbind(0)
        q, k = self.rotary(q), self.rotary(k)  # [b, heads, s, head_dim]
        mask = causal_mask(s, self.window, q.device)
        p = self.dropout if self.training else 0.0
        with tp_region_rng(p > 0):  # heads differ per TP rank, so does their dropout
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None)
        o = o.permute(2, 0, 1, 3).reshape(s, b, self.local_heads * self.head_dim)
        y, _ = self.out(o)
        return y, None


def _flops(shape, args):
    d = shape.hidden_size
    return flops.linear(d, 3 * d) + flops.linear(d, d) + flops.attention_core(d, shape.seq_length, args["window"])


def _validate(shape, args, need_window=False):
    errors = []
    w = args["window"]
    if not isinstance(w, int) or isinstance(w, bool) or w < 0 or (need_window and w == 0):
        errors.append(f"window: {w!r}; use a positive number of positions (e.g. 256)")
    if args["pos_emb"] not in ("rotary", "learned", "none"):
        errors.append(f"pos_emb: {args['pos_emb']!r}; use rotary, learned or none")
    pct, base = args["rotary_pct"], args["rotary_emb_base"]
    if not _is_number(pct) or not 0.0 <= pct <= 1.0:
        errors.append(f"rotary_pct: {pct!r}; use a fraction in [0, 1]")
    if not _is_number(base) or not base > 0:
        errors.append(f"rotary_emb_base: {base!r}; use a positive number, e.g. 10000")
    return errors


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


_GLOBALS = ("pos_emb", "rotary_pct", "rotary_emb_base")
_DEFAULTS = {"pos_emb": "rotary", "rotary_pct": 1.0, "rotary_emb_base": 10000.0}

register(
    MixerSpec(
        name="attention",
        module=CausalSelfAttention,
        defaults={**_DEFAULTS, "window": 0},
        inherits=_GLOBALS,
        aliases=("global", "flash"),
        tp_split="heads",
        flops=_flops,
        validate=_validate,
        doc="causal multi-head attention (SDPA) with rotary embeddings",
    )
)

register(
    MixerSpec(
        name="sliding_window",
        module=CausalSelfAttention,
        defaults={**_DEFAULTS, "window": 256},
        inherits=_GLOBALS,
        aliases=("local",),
        tp_split="heads",
        flops=_flops,
        validate=lambda shape, args: _validate(shape, args, need_window=True),
        doc="causal attention over the last `window` positions",
    )
)
