"""Long-convolution filters shared by the gated-convolution mixers.

Each filter module returns this rank's channels of a causal filter, shape [d_local, L]. Channels split
over tensor parallelism; everything a filter computes from positions alone is replicated.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from neox_zoology.mixers.base import exclude_from_weight_decay, full_then_local
from neox_zoology.mixers.fftconv import fft_causal_conv
from neox_zoology.parallel import ColumnLinear, mark_tp_param, tp_slice


def positional_features(seq_length: int, emb_dim: int) -> torch.Tensor:
    """Hyena/Zoology positional features z [L, emb_dim] = [t, Re e^{-i f w}, Im e^{-i f w}] (frozen).

    t = linspace(0, 1, L); w = 2*pi*j/L for positions j; f = linspace(1e-4, bands-1, bands) with
    bands = (emb_dim - 1) // 2 frequencies.
    """
    if emb_dim < 3 or emb_dim % 2 == 0:
        raise ValueError(f"emb_dim must be odd and >= 3, got {emb_dim}")
    bands = (emb_dim - 1) // 2
    t = torch.linspace(0, 1, seq_length)[:, None]
    w = 2 * math.pi * torch.arange(seq_length, dtype=torch.float32)[:, None] / seq_length
    f = torch.linspace(1e-4, bands - 1, bands)[None, :]
    angle = f * w
    return torch.cat([t, torch.cos(angle), -torch.sin(angle)], dim=-1)


SHIFT_ADD_MAX_TAPS = 16


class ShortFilter(nn.Module):
    """Depthwise causal Conv1d filter of `kernel_size` taps (nn.Conv1d's default init)."""

    def __init__(self, channels: int, kernel_size: int, params_dtype=torch.float32):
        super().__init__()
        local = tp_slice(channels)
        bound = 1.0 / math.sqrt(kernel_size)  # kaiming_uniform(a=sqrt(5)) with fan_in = k
        w = torch.empty(channels, 1, kernel_size).uniform_(-bound, bound)
        b = torch.empty(channels).uniform_(-bound, bound)
        self.kernel_size = kernel_size
        self.weight = mark_tp_param(nn.Parameter(full_then_local(w, 0, local).to(params_dtype)))
        self.bias = mark_tp_param(nn.Parameter(full_then_local(b, 0, local).to(params_dtype)))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u [b, d_local, L] -> causal depthwise conv, same shape (nn.Conv1d's cross-correlation taps)."""
        k, L = self.kernel_size, u.shape[-1]
        taps = self.weight[:, 0, :].flip(-1)[:, : min(k, L)]  # causal order: tap j acts on u[t - j]
        if k > SHIFT_ADD_MAX_TAPS:
            return fft_causal_conv(u, taps) + self.bias[:, None]
        return _ShiftAddConv.apply(u, taps.to(u.dtype), self.bias.to(u.dtype))

    # -- decoding: the last kernel_size - 1 inputs
    def initial_state(self, batch: int, dtype=torch.float32, device=None) -> torch.Tensor:
        return torch.zeros(batch, self.weight.shape[0], self.kernel_size - 1, dtype=dtype, device=device)

    def prefill_state(self, u: torch.Tensor) -> torch.Tensor:
        """The state after the positions of u [b, c, s] (zeros before the sequence)."""
        k = self.kernel_size - 1
        padded = torch.nn.functional.pad(u, (k, 0))
        return padded[..., padded.shape[-1] - k:].contiguous()

    def step(self, u: torch.Tensor, state: torch.Tensor):
        """u [b, c] -> (y [b, c], new state): the forward's output at the next position."""
        window = torch.cat([state, u[..., None]], -1)
        y = (window * self.weight[:, 0].to(u.dtype)).sum(-1) + self.bias.to(u.dtype)
        return y, window[..., 1:]


class _ShiftAddConv(torch.autograd.Function):
    """y[..., c, t] = bias_c + sum_j taps[c, j] u[..., c, t - j], as in-place shifted multiply-adds.

    On CPU, depthwise `conv1d`'s backward costs ~6x its forward (0.65 s vs 0.11 s measured at
    B4 x 2304 channels x L2048), and autograd through shifted slices zero-fills a padded gradient per
    tap; here forward and backward are k fused multiply-adds each, plus k reductions for the taps.
    """

    @staticmethod
    def forward(ctx, u, taps, bias):
        L = u.shape[-1]
        y = u * taps[:, :1]
        for j in range(1, taps.shape[-1]):
            y[..., j:].addcmul_(u[..., : L - j], taps[:, j : j + 1])
        y += bias[:, None]
        ctx.save_for_backward(u, taps)
        return y

    @staticmethod
    def backward(ctx, grad):
        u, taps = ctx.saved_tensors
        L, k = u.shape[-1], taps.shape[-1]
        reduce = tuple(range(u.dim() - 2)) + (u.dim() - 1,)  # everything but the channel dim
        grad_u = grad_taps = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_u = grad * taps[:, :1]
            for j in range(1, k):
                grad_u[..., : L - j].addcmul_(grad[..., j:], taps[:, j : j + 1])
        if ctx.needs_input_grad[1]:
            grad_taps = torch.stack([(grad[..., j:] * u[..., : L - j]).sum(reduce) for j in range(k)], dim=-1)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(reduce)
        return grad_u, grad_taps, grad_bias


class ExplicitLongFilter(nn.Module):
    """A learned filter per channel, k [d, L] ~ N(0, 1) * init_scale (Zoology's explicit long conv)."""

    def __init__(self, channels: int, seq_length: int, init_scale: float = 1.0, params_dtype=torch.float32):
        super().__init__()
        full = torch.randn(channels, seq_length) * init_scale
        self.weight = mark_tp_param(nn.Parameter(full_then_local(full, 0, tp_slice(channels)).to(params_dtype)))
        exclude_from_weight_decay(self)

    def forward(self, L: int) -> torch.Tensor:
        return self.weight[:, :L]


FILTER_INITS = ("normal", "kaiming_uniform")
"""How the Linear layers of an implicit filter's MLP start:

- `normal`: weights N(0, init_method_std), biases 0 -- what zoology's and safari's language models do
  (their `_init_weights` re-initialises every nn.Linear of the model, the filter MLPs included), so
  the filter starts small (std ~1.5e-3 for BaseConv's, ~2e-5 for Hyena's at d 64);
- `kaiming_uniform`: nn.Linear's own default (weights U(+-1/sqrt(fan_in)), biases likewise), the
  init the filter modules would have on their own; filters start 2-3 orders of magnitude larger.
"""


def filter_linear_init(d_out: int, d_in: int, init: str, std: float, bias: bool = True):
    """Full-size (weight [d_out, d_in], bias [d_out] or None) for one Linear of a filter MLP (see FILTER_INITS)."""
    w = torch.empty(d_out, d_in)
    if init == "normal":
        w.normal_(0.0, std)
        b = torch.zeros(d_out) if bias else None
    elif init == "kaiming_uniform":
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        b = torch.empty(d_out).uniform_(-1 / math.sqrt(d_in), 1 / math.sqrt(d_in)) if bias else None
    else:
        raise ValueError(f"filter init {init!r}; use one of {', '.join(FILTER_INITS)}")
    return w, b


class ImplicitLongFilter(nn.Module):
    """Zoology BaseConv's implicit filter: z -> Linear(emb, hidden) -> ReLU -> Linear(hidden, d), as [d, L].

    The positional features z are frozen (as in the reference). `init` is one of FILTER_INITS.
    """

    def __init__(self, channels: int, seq_length: int, config, emb_dim: int = 3, hidden: int = 16,
                 init: str = "normal"):
        super().__init__()
        self.register_buffer("z", positional_features(seq_length, emb_dim)[:, None, :], persistent=False)
        self.inner = nn.Linear(emb_dim, hidden)
        self.outer = ColumnLinear(
            hidden, channels, config=config, init_method=nn.init.xavier_uniform_, bias=True,
            gather_output=False,
        )
        std = config.init_method_std
        with torch.no_grad():  # drawn at full size, so the filter does not depend on the TP size
            w, b = filter_linear_init(hidden, emb_dim, init, std)
            self.inner.weight.copy_(w)
            self.inner.bias.copy_(b)
            full_w, full_b = filter_linear_init(channels, hidden, init, std)
            local = tp_slice(channels)
            self.outer.weight.copy_(full_then_local(full_w, 0, local))
            self.outer.bias.copy_(full_then_local(full_b, 0, local))
        exclude_from_weight_decay(self)

    def forward(self, L: int) -> torch.Tensor:
        h = torch.relu(self.inner(self.z[:L].to(self.inner.weight.dtype)))
        k, _ = self.outer(h)  # [L, 1, d_local]
        return k[:, 0, :].transpose(0, 1)
