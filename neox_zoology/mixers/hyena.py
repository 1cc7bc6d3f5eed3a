"""Hyena (order 2), as in Zoology and safari:

    x1, x2, v = short_conv(in_proj(u))               in_proj: d -> 3d, depthwise causal conv of
                                                     `short_filter_order` taps on all 3d channels
    v = v * x1
    v = h * v + D * v                                h: implicit long filter, causal FFT convolution
    y = out_proj(v * x2)

Implicit filter, one value per (position t, channel c):

    z_t = [t, Re e^{-i f w_t}, Im e^{-i f w_t}]      positional features, emb_dim (odd) wide, frozen
    g   = Sin(Linear(emb_dim, order)(z)); g = Sin(Linear(order, order)(g)) twice
    h   = Linear(order, d, no bias)(g) * exp(-t |delta_c|)      (exponential modulation)

with Sin(x) = sin(freq * x), freq a trainable [order] vector initialised to `w`, and
delta = linspace(ln(1e-2)/1.5, ln(1e-2)/0.3, d) (slow .. fast decay to 1e-2). D ~ N(0, 1) per
channel. `modulate: false` drops the exponential window.

Deliberate choices against the references:
- One Sin module (one frequency vector) is shared by the three activations, as in the references
  (they append the same module object three times).
- The positional features are frozen (the references train them with lr 1e-5) and the filter uses
  the model's optimizer settings (the references give the filter MLP its own lr / weight decay).
- in_proj's 3d outputs are laid out channel-major, stream-minor ([c, (x1, x2, v)]) rather than
  [x1 | x2 | v], so that a contiguous tensor-parallel shard holds matching channels of all three
  streams. Initialisation is i.i.d., so this is only a relabelling of rows.

Tensor parallelism: channels split. in_proj is column-parallel (interleaved layout above), the short
conv, D, the modulation deltas and the filter's last Linear hold this rank's channels, out_proj is
row-parallel. The filter's inner MLP is replicated; its input to the last Linear enters the TP
region through `copy_to_tp`, so its gradients are summed over all channels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from neox_zoology import flops
from neox_zoology.mixers.base import Mixer, exclude_from_weight_decay, full_then_local
from neox_zoology.mixers.fftconv import fft_causal_conv
from neox_zoology.mixers.filters import ShortFilter, positional_features
from neox_zoology.parallel import ColumnLinear, RowLinear, copy_to_tp, mark_tp_param, tp_size, tp_slice
from neox_zoology.registry import MixerSpec, register


class Sin(nn.Module):
    """sin(freq * x) with a trainable per-feature frequency."""

    def __init__(self, dim: int, w: float):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(dim))

    def forward(self, x):
        return torch.sin(self.freq * x)


def _default_linear(d_in: int, d_out: int, bias: bool = True):
    """nn.Linear's default init (kaiming_uniform(a=sqrt(5)), bias U(+-1/sqrt(d_in))), drawn at full size."""
    w = torch.empty(d_out, d_in)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    b = torch.empty(d_out).uniform_(-1 / math.sqrt(d_in), 1 / math.sqrt(d_in)) if bias else None
    return w, b


class HyenaFilter(nn.Module):
    """The implicit long filter h [d_local, L] (this rank's channels)."""

    def __init__(self, channels: int, seq_length: int, order: int, emb_dim: int, w: float, modulate: bool,
                 params_dtype=torch.float32):
        super().__init__()
        local = tp_slice(channels)
        self.register_buffer("z", positional_features(seq_length, emb_dim), persistent=False)  # [L, emb]
        self.register_buffer("t", torch.linspace(0, 1, seq_length)[:, None], persistent=False)  # [L, 1]
        self.sin = Sin(order, w)
        self.inner = nn.ModuleList([nn.Linear(emb_dim, order), nn.Linear(order, order), nn.Linear(order, order)])
        full_w, _ = _default_linear(order, channels, bias=False)
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
        **stack_kwargs,
    ):
        super().__init__(config, layer_number, **stack_kwargs)
        d = config.hidden_size
        self.local_channels = d // tp_size()
        self.in_proj = ColumnLinear(d, 3 * d, config=config, init_method=config.init_method, bias=True,
                                    gather_output=False)
        self.short_filter = ShortFilter(3 * d, short_filter_order, config.params_dtype)
        self.filter = HyenaFilter(d, seq_length, filter_order, emb_dim, w, modulate, config.params_dtype)
        self.D = mark_tp_param(nn.Parameter(full_then_local(torch.randn(d), 0, tp_slice(d)).to(config.params_dtype)))
        self.out_proj = RowLinear(d, d, config=config, init_method=config.output_layer_init_method, bias=True,
                                  input_is_parallel=True, skip_bias_add=False)

    def forward(self, hidden_states, attention_mask=None, token_ids=None, **ignored):
        s, b, _ = hidden_states.shape
        u, _ = self.in_proj(hidden_states)  # [s, b, 3 d_local], channel-major
        u = self.short_filter(u.permute(1, 2, 0))  # [b, 3 d_local, s]
        x1, x2, v = u.view(b, self.local_channels, 3, s).unbind(2)
        v = v * x1
        v = fft_causal_conv(v, self.filter(s)) + self.D[:, None] * v
        y, _ = self.out_proj((v * x2).permute(2, 0, 1))
        return y, None


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
    if not isinstance(args["modulate"], bool):
        errors.append(f"hyena.modulate: {args['modulate']!r}; use true or false")
    return errors


def _flops(shape, args):
    d, L, order = shape.hidden_size, shape.seq_length, args["filter_order"]
    f = flops.linear(d, 3 * d) + flops.short_conv(3 * d, args["short_filter_order"])
    f += flops.fft_conv(d, L) + flops.linear(d, d)
    # the filter MLP runs once per sequence position (not per batch element): one evaluation per token
    f += flops.linear(args["emb_dim"], order) + 2 * flops.linear(order, order) + flops.linear(order, d)
    return f


register(
    MixerSpec(
        name="hyena",
        module=Hyena,
        defaults={"filter_order": 64, "short_filter_order": 3, "emb_dim": 3, "w": 1.0, "modulate": True},
        tp_split="channels",
        flops=_flops,
        validate=_validate,
        doc="Hyena order 2: y = out_proj(x2 * (h * (x1 v) + D x1 v)), implicit Sin-MLP filter with decay window",
    )
)
