"""Hyena (order 2), as in Zoology and safari:

    x1, x2, v = short_conv(in_proj(u))               in_proj: d -> 3d, depthwise causal conv of
                                                     `short_filter_order` taps on all 3d channels
    v = v * x1
    v = h * v + D * v                                h: implicit long filter, causal FFT convolution
    y = out_proj(v * x2)

The implicit filter has one value per (position t, channel c): trained positional features z_t
(`emb_dim` wide, odd) through a sine-activated MLP (one trainable frequency vector, shared) and an
exponential decay window, h = Linear(order, d)(MLP(z_t)) * exp(-t |delta_c|) (`modulate: false` drops
the window). The filter, z included, gets no weight decay and the model's learning rate. in_proj's 3d
outputs are laid out channel-major ([c, (x1, x2, v)]), not [x1 | x2 | v], so that a contiguous
tensor-parallel shard holds matching channels of all three streams.

Tensor parallelism: channels split. in_proj is column-parallel (interleaved layout above), the short
conv, D, the modulation deltas and the filter's last Linear hold this rank's channels, out_proj is
row-parallel. The filter's inner MLP (and z) is replicated; its input to the last Linear enters the TP
region through `copy_to_tp`, so its gradients are summed over all channels. The filter's formulas,
initialisation and the choices against the references: docs/layers.md, "Hyena".
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from neox_zoology import flops
from neox_zoology.mixers.base import (Mixer, column_linear_channels_first, exclude_from_weight_decay, full_then_local,
                                      row_linear_channels_first)
from neox_zoology.mixers.fftconv import causal_conv_step, fft_causal_conv
from neox_zoology.mixers.filters import FILTER_INITS, ShortFilter, filter_linear_init, positional_features
from neox_zoology.parallel import ColumnLinear, RowLinear, copy_to_tp, mark_tp_param, tp_size, tp_slice
from neox_zoology.registry import STATE_BYTES, MixerSpec, register


class Sin(nn.Module):
    """sin(freq * x) with a trainable per-feature frequency."""

    def __init__(self, dim: int, w: float):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(dim))

    def forward(self, x):
        return torch.sin(self.freq * x)


class HyenaFilter(nn.Module):
    """The implicit long filter h [d_local, L] (this rank's channels)."""

    def __init__(self, channels: int, seq_length: int, order: int, emb_dim: int, w: float, modulate: bool,
                 params_dtype=torch.float32, init: str = "normal", init_std: float = 0.02,
                 train_pos_emb: bool = True):
        super().__init__()
        local = tp_slice(channels)
        z = positional_features(seq_length, emb_dim)  # [L, emb], replicated over TP ranks
        if train_pos_emb:
            self.z = nn.Parameter(z)
        else:
            self.register_buffer("z", z, persistent=False)
        self.register_buffer("t", torch.linspace(0, 1, seq_length)[:, None], persistent=False)  # [L, 1]
        self.sin = Sin(order, w)
        self.inner = nn.ModuleList([nn.Linear(emb_dim, order), nn.Linear(order, order), nn.Linear(order, order)])
        with torch.no_grad():
            for linear in self.inner:
                weight, bias = filter_linear_init(linear.out_features, linear.in_features, init, init_std)
                linear.weight.copy_(weight)
                linear.bias.copy_(bias)
        full_w, _ = filter_linear_init(channels, order, init, init_std, bias=False)
        self.out_weight = mark_tp_param(nn.Parameter(full_then_local(full_w, 0, local).to(params_dtype)))
        fast, slow, target = 0.3, 1.5, 1e-2
        deltas = torch.linspace(math.log(target) / slow, math.log(target) / fast, channels)
        self.register_buffer("deltas", full_then_local(deltas, 0, local), persistent=False)
        self.modulate = modulate
        exclude_from_weight_decay(self)

    def forward(self, L: int) -> torch.Tensor:
        g = self.z[:L].to(self.out_weight.dtype)
        for linear in self.inner:
            g = self.sin(linear(g))
        # Replicated MLP -> this rank's channels: all-reduce the MLP's gradient over the TP group.
        h = F.linear(copy_to_tp(g), self.out_weight)  # [L, d_local]
        if self.modulate:
            h = h * torch.exp(-self.t[:L] * self.deltas.abs())
        return h.transpose(0, 1)


class Hyena(Mixer):
    def __init__(
        self,
        config,
        layer_number: int = 1,
        *,
        seq_length: int,
        filter_order: int = 64,
        short_filter_order: int = 3,
        emb_dim: int = 3,
        w: float = 1.0,
        modulate: bool = True,
        filter_init: str = "normal",
        train_pos_emb: bool = True,
        **stack_kwargs,
    ):
        super().__init__(config, layer_number, **stack_kwargs)
        d = config.hidden_size
        self.local_channels = d // tp_size()
        self.decode_limit = seq_length  # the implicit filter is defined for seq_length positions
        self.in_proj = ColumnLinear(d, 3 * d, config=config, init_method=config.init_method, bias=True,
                                    gather_output=False)
        self.short_filter = ShortFilter(3 * d, short_filter_order, config.params_dtype)
        self.filter = HyenaFilter(d, seq_length, filter_order, emb_dim, w, modulate, config.params_dtype,
                                  filter_init, config.init_method_std, train_pos_emb)
        self.D = mark_tp_param(nn.Parameter(full_then_local(torch.randn(d), 0, tp_slice(d)).to(config.params_dtype)))
        self.out_proj = RowLinear(d, d, config=config, init_method=config.output_layer_init_method, bias=True,
                                  input_is_parallel=True, skip_bias_add=False)

    def _sequence(self, hidden_states, keep_state: bool = False):
        """(output, state after the last position or None): forward and prefill in one pass."""
        s, b, _ = hidden_states.shape
        # channels-first from the projection on: the short conv, gating and FFT run on contiguous rows
        raw = column_linear_channels_first(hidden_states, self.in_proj)  # [b, 3 d_local, s], channel-major
        u = self.short_filter(raw)
        x1, x2, v = u.view(b, self.local_channels, 3, s).unbind(2)
        v = v * x1
        state = {"short": self.short_filter.prefill_state(raw), "v": v.contiguous()} if keep_state else None
        v = fft_causal_conv(v, self.filter(s), skip=self.D)  # h * v + D v
        return row_linear_channels_first(v * x2, self.out_proj), state

    def forward(self, hidden_states, attention_mask=None, token_ids=None, **ignored):
        return self._sequence(hidden_states)[0], None

    def prefill(self, hidden_states):
        """x [s, b, d] -> (forward's output, its bias (None), the decoding state after position s - 1)."""
        y, state = self._sequence(hidden_states, keep_state=True)
        return y, None, state

    # -- decoding: the short filter's last k - 1 inputs and the long filter's input history (O(L) per position,
    # at most seq_length positions)
    def initial_state(self, batch: int, dtype=torch.float32, device=None) -> dict:
        return {"short": self.short_filter.initial_state(batch, dtype, device),
                "v": torch.zeros(batch, self.local_channels, 0, dtype=dtype, device=device)}

    def step(self, x: torch.Tensor, state: dict):
        """One position: x [b, h] -> (y [b, h], new state); equal to forward's output at that position."""
        u, short = self.short_filter.step(self.in_proj(x)[0], state["short"])  # [b, 3 d_local], channel-major
        x1, x2, v = u.view(x.shape[0], self.local_channels, 3).unbind(-1)
        v, history = causal_conv_step(state["v"], v * x1, self.filter(state["v"].shape[-1] + 1), skip=self.D)
        y, _ = self.out_proj(v * x2)
        return y, {"short": short, "v": history}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate(shape, args):
    errors = []
    k = args["short_filter_order"]
    if not _is_int(k) or not 0 < k <= shape.seq_length:
        errors.append(f"hyena.short_filter_order: {k!r}; use a positive int <= seq_length ({shape.seq_length}), "
                      f"e.g. 3")
    order = args["filter_order"]
    if not _is_int(order) or order <= 0:
        errors.append(f"hyena.filter_order: {order!r}; use a positive int (the filter MLP width), e.g. 64")
    e = args["emb_dim"]
    if not _is_int(e) or e < 3 or e % 2 == 0:
        errors.append(f"hyena.emb_dim: {e!r}; use an odd int >= 3 (t plus cos/sin pairs), e.g. 3 or 33")
    if isinstance(args["w"], bool) or not isinstance(args["w"], (int, float)):
        errors.append(f"hyena.w: {args['w']!r}; use a number (the Sin frequency at init), e.g. 1 or 14")
    for key in ("modulate", "train_pos_emb"):
        if not isinstance(args[key], bool):
            errors.append(f"hyena.{key}: {args[key]!r}; use true or false")
    if args["filter_init"] not in FILTER_INITS:
        errors.append(f"hyena.filter_init: {args['filter_init']!r}; use {' or '.join(map(repr, FILTER_INITS))}")
    return errors


def _flops(shape, args):
    d, L, order = shape.hidden_size, shape.seq_length, args["filter_order"]
    f = flops.linear(d, 3 * d) + flops.short_conv(3 * d, args["short_filter_order"])
    f += flops.fft_conv(d, L) + flops.linear(d, d)
    # the filter MLP runs once per sequence position (not per batch element): one evaluation per token
    f += flops.linear(args["emb_dim"], order) + 2 * flops.linear(order, order) + flops.linear(order, d)
    return f


def _state_bytes(shape, args, seq_len):
    """The long filter's whole input history plus the short filter's last taps on the 3d projections."""
    d = shape.hidden_size
    return (seq_len * d + (args["short_filter_order"] - 1) * 3 * d) * STATE_BYTES


register(
    MixerSpec(
        name="hyena",
        module=Hyena,
        defaults={"filter_order": 64, "short_filter_order": 3, "emb_dim": 3, "w": 1.0, "modulate": True,
                  "filter_init": "normal", "train_pos_emb": True},
        tp_split="channels",
        flops=_flops,
        state_bytes=_state_bytes,
        validate=_validate,
        doc="Hyena order 2: in-projection to 3 streams, short conv (3), implicit filter (trained positional "
            "features → sine MLP → exponential decay), bias `D`, gating",
    )
)
