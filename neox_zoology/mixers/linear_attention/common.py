"""What the linear-attention mixers share: short convolutions, the per-head output norm, head layout,
and the checks of their YAML keys."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from neox_zoology.mixers.base import full_then_local
from neox_zoology.mixers.linear_attention.kernels import compute_dtype
from neox_zoology.parallel import copy_to_tp, mark_tp_param, tp_slice
from neox_zoology.registry import is_number


def heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[s, b, heads * dim] -> [b, heads, s, dim]."""
    s, b, _ = x.shape
    return x.view(s, b, heads, -1).permute(1, 2, 0, 3)


def sequence_first(x: torch.Tensor) -> torch.Tensor:
    """[b, heads, s, dim] -> [s, b, heads * dim]."""
    b, h, s, d = x.shape
    return x.permute(2, 0, 1, 3).reshape(s, b, h * d)


def conv_sequence(conv, x: torch.Tensor) -> torch.Tensor:
    """A ShortConv applied to sequence-first x [s, b, c] (None: x unchanged)."""
    if conv is None:
        return x
    return conv(x.permute(1, 2, 0)).permute(2, 0, 1)


def conv_prefill_state(conv, x: torch.Tensor):
    """A ShortConv's decoding state after sequence-first x [s, b, c] (None without a conv)."""
    return None if conv is None else conv.prefill_state(x.permute(1, 2, 0))


def project_step(x: torch.Tensor, heads: int, projections, convs, buffers):
    """One position through projections and their optional ShortConvs (None: none), e.g. q, k, v:
    x [b, d] -> ([b, heads, dim] per projection, the new conv buffers in the same order)."""
    parts, new = [], []
    for proj, conv, buf in zip(projections, convs, buffers):
        z = proj(x)[0]
        if conv is not None:
            z, buf = conv.step(z, buf)
        parts.append(z.view(x.shape[0], heads, -1))
        new.append(buf)
    return parts, new


def check_int(errors, name, args, key, low, fix):
    v = args[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        errors.append(f"{name}.{key}: {v!r}; {fix}")
        return False
    return True


def check_number(errors, name, args, key, fix, positive=True):
    v = args[key]
    if not is_number(v) or v != v or abs(v) == float("inf") or (positive and v <= 0):
        errors.append(f"{name}.{key}: {v!r}; {fix}")
        return False
    return True


def check_bool(errors, name, args, key):
    if not isinstance(args[key], bool):
        errors.append(f"{name}.{key}: {args[key]!r}; use true or false")


def check_heads(errors, name, shape, heads, dims):
    """heads split over TP, and each of `dims` ({label: width}) divides into heads."""
    if shape.tp > 1 and heads % shape.tp:
        errors.append(f"{name}.num_heads: {heads} heads do not split over model_parallel_size {shape.tp}; "
                      f"use a multiple of {shape.tp}")
    for label, width in dims.items():
        if width <= 0 or width != int(width) or int(width) % heads:
            errors.append(f"{name}.num_heads: {heads} does not divide the {label} {width} (hidden_size "
                          f"{shape.hidden_size}); choose num_heads so that it does")


class ShortConv(nn.Module):
    """Depthwise causal conv of `kernel_size` taps over this rank's share of `channels`, optional SiLU.

    nn.Conv1d's default init (uniform +-1/sqrt(kernel_size)), drawn at full size and sliced, so the
    weights do not depend on the TP size. Input and output channels-first [b, c_local, L].
    `split=False`: every rank holds all channels (replicated weights, not marked as TP-split).
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = False, activation: bool = True,
                 params_dtype=torch.float32, split: bool = True):
        super().__init__()
        local, bound = tp_slice(channels) if split else slice(0, channels), 1.0 / math.sqrt(kernel_size)
        mark = mark_tp_param if split else (lambda p: p)
        w = torch.empty(channels, 1, kernel_size).uniform_(-bound, bound)
        self.kernel_size, self.activation = kernel_size, activation
        self.weight = mark(nn.Parameter(full_then_local(w, 0, local).to(params_dtype)))
        if bias:
            b = torch.empty(channels).uniform_(-bound, bound)
            self.bias = mark(nn.Parameter(full_then_local(b, 0, local).to(params_dtype)))
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv1d(F.pad(x, (self.kernel_size - 1, 0)), self.weight, self.bias, groups=x.shape[1])
        return F.silu(y) if self.activation else y

    def initial_state(self, batch: int, dtype, device) -> torch.Tensor:
        """The last kernel_size - 1 inputs, zeros before the sequence starts: [b, c_local, k - 1]."""
        return torch.zeros(batch, self.weight.shape[0], self.kernel_size - 1, dtype=dtype, device=device)

    def prefill_state(self, x: torch.Tensor) -> torch.Tensor:
        """The state after the positions of channels-first x [b, c_local, s] (zeros before the sequence)."""
        k = self.kernel_size - 1
        padded = F.pad(x, (k, 0))
        return padded[..., padded.shape[-1] - k:].contiguous()

    def step(self, x: torch.Tensor, state: torch.Tensor):
        """x [b, c_local] -> (y [b, c_local], new state)."""
        window = torch.cat([state, x[..., None]], -1)
        y = (window * self.weight[:, 0]).sum(-1)
        if self.bias is not None:
            y = y + self.bias
        return (F.silu(y) if self.activation else y), window[..., 1:]


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last dim (one head's values), weight shared by all heads, optional SiLU gate.

    y = x / sqrt(mean(x^2) + eps) * w [* g * sigmoid(g)]. The heads of a rank are a share of all heads,
    so the shared weight's gradient is summed over TP ranks (copy_to_tp on the weight).
    """

    def __init__(self, dim: int, eps: float, params_dtype=torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=params_dtype))

    def forward(self, x, gate=None):
        dtype = x.dtype
        x = x.to(compute_dtype(x))
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * copy_to_tp(self.weight).to(x.dtype)
        if gate is not None:
            y = y * F.silu(gate.to(y.dtype))
        return y.to(dtype)
