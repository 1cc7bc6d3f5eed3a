"""RWKV-4: the time mix as the sequence mixer, the channel mix as the block's MLP.

Time mix, per channel c and position t (x_{-1} = 0; xk, xv, xr: token-shift mixes of x_t and x_{t-1}):

    k = W_k xk,  v = W_v xv,  r = W_r xr
    wkv_t = (sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t)
          / (sum_{i<t} e^{-(t-1-i) w + k_i}     + e^{u + k_t})
    y = W_o (sigmoid(r) * wkv),      w = exp(time_decay) > 0,  u = time_first

Channel mix (ChannelMix, registered as this type's `mlp`): y = sigmoid(W_r xr) * (W_v relu(W_k xk)^2).

WKV is computed exactly, with no CUDA kernel and no length limit (see `wkv`): chunks of `wkv_chunk`
positions, each one masked [T, T+1] product whose exponents are shifted by their row maximum, and the
state entering a chunk carried as (a, p) with value a e^p, so nothing overflows for any k or w; fp32
throughout (fp64 for fp64 inputs); channel blocks are checkpointed. Projections have no bias.

Tensor parallelism: channels split. Time mix: W_k, W_v, W_r column-parallel, time_decay / time_first
hold this rank's channels, W_o row-parallel. Channel mix: W_k column-parallel, W_v row-parallel, W_r
replicated. Initialisation, the WKV derivation and its measurements, and the choices against the
references: docs/layers.md, "RWKV-4".
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from neox_zoology import flops
from neox_zoology.mixers.base import Mixer, check_projection_init, full_then_local, torch_linear_default
from neox_zoology.parallel import ColumnLinear, RowLinear, mark_tp_param, tp_slice
from neox_zoology.registry import STATE_BYTES, MixerSpec, not_in_configs, register

EMPTY = -1e30
"""Log-scale of an empty sum: finite, so that differences of scales never become inf - inf."""


def _decayed_sums(q: torch.Tensor, x: torch.Tensor, lam: torch.Tensor, chunk: int, bonus=None):
    """S_t = sum_{i<t} exp(-(t-1-i) lam + q_i) x_i  [+ exp(bonus + q_t) x_t with `bonus`], for every t.

    q [B, C, n] log-magnitudes, x [B, C, n, m] values sharing them, lam [C] decay per step (> 0),
    bonus [C] or None. Returns (a [B, C, n, m], p [B, C, n]) with S = a * e^p. Scales (row maxima)
    carry no gradient: the represented value does not depend on them.
    """
    B, C, n = q.shape
    m = x.shape[-1]
    T = min(chunk, n)
    nc = -(-n // T)
    if nc * T != n:  # pad the end; padded positions add nothing (q = -inf, x = 0) and are dropped
        q = F.pad(q, (0, nc * T - n), value=-math.inf)
        x = F.pad(x, (0, 0, 0, nc * T - n))
    q, x = q.view(B, C, nc, T), x.view(B, C, nc, T, m)
    pos = torch.arange(T, device=q.device, dtype=q.dtype)
    if nc > 1:
        # what each chunk leaves for the next, sum_i exp(-(T-1-i) lam + q_i) x_i, then the state entering
        # each chunk: the same decayed sum over chunk summaries, one chunk being T steps of decay
        g = q - (T - 1 - pos) * lam.view(C, 1, 1)
        g_max = g.detach().amax(-1).clamp(min=EMPTY)  # [B, C, nc]
        summary = (torch.exp(g - g_max[..., None])[..., None, :] @ x).squeeze(-2)  # [B, C, nc, m]
        a_in, p_in = _decayed_sums(g_max, summary, lam * T, chunk)
    else:
        a_in, p_in = x.new_zeros(B, C, 1, m), q.new_full((B, C, 1), EMPTY)
    # One [T, T+1] exponent matrix per chunk, E[t, i] = q_i - G[t, i]: columns i < T are the chunk's own
    # positions (G = (t-1-i) lam for i < t, -bonus at i = t, +inf after), column T the entering state
    # (q = its scale, G = t lam). Each row is shifted by its own maximum before exp.
    gap = pos[:, None] - 1 - pos[None, :]
    G = (gap * lam.view(C, 1, 1)).masked_fill(gap < 0, math.inf)
    if bonus is not None:
        G = torch.where(gap == -1, -bonus.view(C, 1, 1), G)
    G = torch.cat([G, (pos * lam.view(C, 1))[..., None]], dim=-1).view(C, 1, T, T + 1)
    E = torch.cat([q, p_in[..., None]], dim=-1)[..., None, :] - G  # [B, C, nc, T, T+1]
    p = E.detach().amax(-1).clamp(min=EMPTY)
    a = torch.exp(E - p[..., None]) @ torch.cat([x, a_in[..., None, :]], dim=-2)
    return a.reshape(B, C, nc * T, m)[:, :, :n], p.reshape(B, C, nc * T)[:, :, :n]


def _wkv(time_decay, time_first, k, v, chunk):
    w = time_decay.exp().clamp(max=1e30)  # e^{-w} is already 0 in fp32 long before the clamp
    x = torch.stack([v, torch.ones_like(v)], dim=-1)  # numerator and denominator share exponents
    a, _ = _decayed_sums(k, x, w, chunk, bonus=time_first)
    return a[..., 0] / a[..., 1]  # common scale cancels; the scaled denominator is >= 1


BLOCK_ELEMENTS = 1 << 20
"""Channels are processed in blocks of about this many [B, C_block, L] elements, each block checkpointed
on its own, so the [.., T, T+1] temporaries (recomputed in backward) exist for one block at a time."""


def wkv(time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        chunk: int = 4) -> torch.Tensor:
    """RWKV-4 WKV for k, v [B, C, L] and per-channel time_decay, time_first [C]; fp32 inside (fp64 for fp64 k)."""
    B, C, L = k.shape
    real = torch.float64 if k.dtype == torch.float64 else torch.float32
    step = max(1, min(C, BLOCK_ELEMENTS // max(B * L, 1)))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (time_decay, time_first, k, v))
    outs = []
    for c0 in range(0, C, step):
        blk = slice(c0, c0 + step)
        args = (time_decay[blk].to(real), time_first[blk].to(real), k[:, blk].to(real).contiguous(),
                v[:, blk].to(real).contiguous(), chunk)
        outs.append(checkpoint(_wkv, *args, use_reentrant=False) if grad else _wkv(*args))
    return torch.cat(outs, dim=1).to(v.dtype) if len(outs) > 1 else outs[0].to(v.dtype)


def token_shift(x: torch.Tensor) -> torch.Tensor:
    """x [s, b, h] -> x_{t-1} (zeros at t = 0)."""
    return F.pad(x, (0, 0, 0, 0, 1, 0))[:-1]


def _layer_ratios(config, layer_number: int) -> tuple[float, float]:
    """RWKV-4's r0 (0 -> 1 over the layers) and r1 (1 -> ~0)."""
    n, i = max(config.num_layers, 1), min(max(layer_number - 1, 0), max(config.num_layers - 1, 0))
    return (i / (n - 1) if n > 1 else 0.0), 1.0 - i / n


def _position_ramp(d: int) -> torch.Tensor:
    return torch.arange(d, dtype=torch.float32) / d


class RWKVTimeMix(Mixer):
    def __init__(self, config, layer_number: int = 1, *, seq_length: int, wkv_chunk: int = 4,
                 projection_init: str = "kaiming_uniform", **stack_kwargs):
        super().__init__(config, layer_number, **stack_kwargs)
        d, dtype = config.hidden_size, config.params_dtype
        r0, r1 = _layer_ratios(config, layer_number)
        self.chunk = wkv_chunk
        ramp = _position_ramp(d)
        self.time_mix_k = nn.Parameter(ramp.pow(r1).to(dtype))
        self.time_mix_v = nn.Parameter((ramp.pow(r1) + 0.3 * r0).to(dtype))
        self.time_mix_r = nn.Parameter(ramp.pow(0.5 * r1).to(dtype))
        c = torch.arange(d, dtype=torch.float32)
        decay = -5 + 8 * (c / max(d - 1, 1)).pow(0.7 + 1.3 * r0)
        first = math.log(0.3) + 0.5 * ((c + 1) % 3 - 1)
        local = tp_slice(d)
        self.time_decay = mark_tp_param(nn.Parameter(full_then_local(decay, 0, local).to(dtype)))
        self.time_first = mark_tp_param(nn.Parameter(full_then_local(first, 0, local).to(dtype)))
        if projection_init == "kaiming_uniform":
            inner = outer = torch_linear_default
        else:
            inner, outer = config.init_method, config.output_layer_init_method
        col = dict(config=config, init_method=inner, bias=False, gather_output=False)
        self.key = ColumnLinear(d, d, **col)
        self.value = ColumnLinear(d, d, **col)
        self.receptance = ColumnLinear(d, d, **col)
        self.output = RowLinear(d, d, config=config, init_method=outer, bias=False,
                                input_is_parallel=True, skip_bias_add=False)

    def _sequence(self, hidden_states, keep_state: bool = False):
        """(output, state after the last position or None): forward and prefill in one pass."""
        x = hidden_states  # [s, b, h]
        prev = token_shift(x)
        k, _ = self.key(prev + self.time_mix_k * (x - prev))
        v, _ = self.value(prev + self.time_mix_v * (x - prev))
        r, _ = self.receptance(prev + self.time_mix_r * (x - prev))
        k, v = k.permute(1, 2, 0), v.permute(1, 2, 0)  # [b, c, s]
        mixed = wkv(self.time_decay, self.time_first, k, v, self.chunk)
        y, _ = self.output(torch.sigmoid(r) * mixed.permute(2, 0, 1))
        return y, ({"prev": x[-1].clone(), **self._wkv_state(k, v)} if keep_state else None)

    def forward(self, hidden_states, attention_mask=None, token_ids=None, **ignored):
        return self._sequence(hidden_states)[0], None

    def prefill(self, hidden_states):
        """x [s, b, d] -> (forward's output, its bias (None), the decoding state after position s - 1)."""
        y, state = self._sequence(hidden_states, keep_state=True)
        return y, None, state

    def _wkv_state(self, k: torch.Tensor, v: torch.Tensor) -> dict:
        """The WKV sums after k, v [b, c, s]: sum_{i<s} e^{-(s-1-i) w + k_i} (v_i, 1) as (a, b) e^p, read off
        `_decayed_sums` at one position past the end (an empty position: k = -inf, v = 0)."""
        real = torch.float64 if self.time_decay.dtype == torch.float64 else torch.float32
        w = self.time_decay.to(real).exp().clamp(max=1e30)
        k = F.pad(k.to(real), (0, 1), value=-math.inf)
        x = F.pad(torch.stack([v.to(real), torch.ones_like(v, dtype=real)], -1), (0, 0, 0, 1))
        a, p = _decayed_sums(k, x, w, self.chunk)
        return {"a": a[:, :, -1, 0].contiguous(), "b": a[:, :, -1, 1].contiguous(), "p": p[:, :, -1].contiguous()}

    # -- decoding: the previous input (token shift) and the WKV sums (a, b) = (sum e^{..} v, sum e^{..}) kept
    # as a e^p, b e^p with their scale p (RWKV-4's recurrent form), in fp32 (fp64 for fp64 parameters)
    def initial_state(self, batch: int, dtype=torch.float32, device=None) -> dict:
        d, c = self.time_mix_k.shape[0], self.time_decay.shape[0]
        real = torch.float64 if dtype == torch.float64 else torch.float32
        z = torch.zeros(batch, c, dtype=real, device=device)
        return {"prev": torch.zeros(batch, d, dtype=dtype, device=device), "a": z, "b": z.clone(),
                "p": torch.full_like(z, EMPTY)}

    def step(self, x: torch.Tensor, state: dict):
        """One position: x [b, h] -> (y [b, h], new state); equal to forward's output at that position."""
        prev = state["prev"]
        k, _ = self.key(prev + self.time_mix_k * (x - prev))
        v, _ = self.value(prev + self.time_mix_v * (x - prev))
        r, _ = self.receptance(prev + self.time_mix_r * (x - prev))
        real = state["a"].dtype
        k, v = k.to(real), v.to(real)
        a, b, p = state["a"], state["b"], state["p"]
        w, u = self.time_decay.to(real).exp().clamp(max=1e30), self.time_first.to(real)
        q = torch.maximum(p, u + k)  # output: the state plus the bonus-weighted current position
        e1, e2 = torch.exp(p - q), torch.exp(u + k - q)
        wkv = (e1 * a + e2 * v) / (e1 * b + e2)
        q = torch.maximum(p - w, k)  # new state: decay by e^{-w}, add the current position
        e1, e2 = torch.exp(p - w - q), torch.exp(k - q)
        y, _ = self.output(torch.sigmoid(r) * wkv.to(x.dtype))
        return y, {"prev": x, "a": e1 * a + e2 * v, "b": e1 * b + e2, "p": q}


class ChannelMix(nn.Module):
    """RWKV-4 channel mix, the MLP of an rwkv block: [s, b, h] -> [s, b, h]."""

    def __init__(self, config, layer_number: int = 1):
        super().__init__()
        d, ffn, dtype = config.hidden_size, config.ffn_hidden_size, config.params_dtype
        _, r1 = _layer_ratios(config, layer_number)
        ramp = _position_ramp(d)
        self.time_mix_k = nn.Parameter(ramp.pow(r1).to(dtype))
        self.time_mix_r = nn.Parameter(ramp.pow(r1).to(dtype))
        self.key = ColumnLinear(d, ffn, config=config, init_method=config.init_method, bias=False,
                                gather_output=False)
        self.value = RowLinear(ffn, d, config=config, init_method=config.output_layer_init_method, bias=False,
                               input_is_parallel=True, skip_bias_add=False)
        receptance = torch.empty(d, d)
        config.init_method(receptance)
        self.receptance = nn.Parameter(receptance.to(dtype))  # replicated over TP ranks

    def forward(self, x):
        prev = token_shift(x)
        k, _ = self.key(prev + self.time_mix_k * (x - prev))
        kv, _ = self.value(torch.relu(k).square())
        return torch.sigmoid(F.linear(prev + self.time_mix_r * (x - prev), self.receptance)) * kv

    # -- decoding: the previous input (token shift)
    def initial_state(self, batch: int, dtype=torch.float32, device=None) -> torch.Tensor:
        return torch.zeros(batch, self.time_mix_k.shape[0], dtype=dtype, device=device)

    def prefill_state(self, x: torch.Tensor) -> torch.Tensor:
        return x[-1].clone()

    def step(self, x: torch.Tensor, prev: torch.Tensor):
        """One position: x [b, h] -> (y [b, h], x as the next position's previous input)."""
        k, _ = self.key(prev + self.time_mix_k * (x - prev))
        kv, _ = self.value(torch.relu(k).square())
        return torch.sigmoid(F.linear(prev + self.time_mix_r * (x - prev), self.receptance)) * kv, x

    @staticmethod
    def flops(d: int, ffn: int) -> float:
        """Forward FLOPs per token (to replace the configured MLP's count)."""
        return flops.linear(d, ffn) + flops.linear(ffn, d) + flops.linear(d, d)


def _validate(shape, args):
    errors = []
    c = args["wkv_chunk"]
    if not isinstance(c, int) or isinstance(c, bool) or c < 2:
        errors.append(f"rwkv.wkv_chunk: {c!r}; use an int >= 2 (positions per WKV chunk), e.g. 4")
    check_projection_init(errors, "rwkv", args)
    return errors


def _flops(shape, args):
    d = shape.hidden_size
    # k, v, r, o projections; WKV's per-chunk [T, T+1] @ [T+1, 2] products (numerator and denominator)
    return 4 * flops.linear(d, d) + 4.0 * (args["wkv_chunk"] + 1) * d


def _state_bytes(shape, args, seq_len):
    """Time mix: numerator, denominator and running maximum per channel, plus the previous input (token shift)."""
    return 4.0 * shape.hidden_size * STATE_BYTES


register(
    MixerSpec(
        name="rwkv",
        module=RWKVTimeMix,
        aliases=("rwkv4",),
        defaults={"wkv_chunk": 4, "projection_init": "kaiming_uniform"},
        tp_split="channels",
        flops=_flops,
        state_bytes=_state_bytes,
        validate=_validate,
        mlp=ChannelMix,
        doc="RWKV-4 time mix (token shift, exact chunked WKV in fp32, any length) with its channel mix as the "
            "block's MLP (width `intermediate_size`)",
    )
)
not_in_configs("rwkv", "GPT-NeoX's rwkv is RWKV-v6, which is not implemented here; this stack's RWKV is RWKV-4: "
                       "write rwkv4 to train that one")
