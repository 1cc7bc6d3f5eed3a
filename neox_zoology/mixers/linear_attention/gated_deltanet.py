"""Gated DeltaNet: the delta rule with a scalar decay gate per head.

Per head (H heads, key dim K = d / H, value dim V = expand_v K):

    q, k, v = silu(conv(W_q u)), silu(conv(W_k u)), silu(conv(W_v u))      (depthwise causal, no bias)
    q, k = q / ||q||, k / ||k||     (||x|| = sqrt(sum x^2 + 1e-6)),   q = q / sqrt(K)
    beta_t = sigmoid(W_b u_t),   log a_t = -exp(A_log) softplus(W_a u_t + dt_bias)
    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t
    y = W_o [RMSNorm(o) * silu(W_g u)]        (RMSNorm per head over V, weight shared by the heads)

As the reference layer (zoology `GatedDeltaNet`): expand_v 2, conv size 4, A ~ U(0, 16),
dt = exp(U(log 1e-3, log 1e-1)) floored at 1e-4 and dt_bias = softplus^-1(dt), norm eps 1e-5.
Left out: the reference's unused `D` parameter and its cast of q, k, v, beta, g to bf16 before
the kernel. `conv_size` 0 drops the convolutions (then q, k, v = silu(W u), as the reference's branch).
Tensor parallelism: heads split (every projection column-parallel by heads, W_o row-parallel).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from neox_zoology import flops
from neox_zoology.mixers.base import Mixer, exclude_from_weight_decay, full_then_local
from neox_zoology.mixers.linear_attention.common import (HeadRMSNorm, ShortConv, check_bool, check_heads, check_int,
                                                          check_number, conv_prefill_state, conv_sequence, heads_first,
                                                          project_step, sequence_first)
from neox_zoology.mixers.linear_attention.kernels import (chunked_gated_delta_rule, compute_dtype,
                                                           gated_delta_rule_step)
from neox_zoology.parallel import ColumnLinear, RowLinear, mark_tp_param, tp_size, tp_slice
from neox_zoology.registry import STATE_BYTES, MixerSpec, register

L2_EPS = 1e-6


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2_EPS)


def inverse_softplus_dt(n: int, dt_min: float = 1e-3, dt_max: float = 1e-1, floor: float = 1e-4) -> torch.Tensor:
    """dt log-uniform in [dt_min, dt_max], floored; returns b with softplus(b) = dt (Mamba's dt bias init)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


class GatedDeltaNet(Mixer):
    def __init__(self, config, layer_number: int = 1, *, seq_length: int, num_heads: int = 0, expand_v: float = 2.0,
                 conv_size: int = 4, output_gate: bool = True, norm_eps: float = 1e-5, chunk_size: int = 32,
                 **stack_kwargs):
        super().__init__(config, layer_number, **stack_kwargs)
        d, dtype = config.hidden_size, config.params_dtype
        heads = num_heads or config.num_attention_heads
        K = d // heads
        V = int(K * expand_v)
        self.local_heads, self.head_k, self.head_v, self.chunk_size = heads // tp_size(), K, V, chunk_size
        lin = dict(config=config, init_method=config.init_method, bias=False, gather_output=False)
        self.q, self.k = ColumnLinear(d, heads * K, **lin), ColumnLinear(d, heads * K, **lin)
        self.v = ColumnLinear(d, heads * V, **lin)
        self.g = ColumnLinear(d, heads * V, **lin) if output_gate else None
        self.beta, self.alpha = ColumnLinear(d, heads, **lin), ColumnLinear(d, heads, **lin)
        local = tp_slice(heads)
        self.A_log = mark_tp_param(nn.Parameter(full_then_local(torch.empty(heads).uniform_(0, 16).log(), 0, local).to(dtype)))
        self.dt_bias = mark_tp_param(nn.Parameter(full_then_local(inverse_softplus_dt(heads), 0, local).to(dtype)))
        exclude_from_weight_decay(self.A_log), exclude_from_weight_decay(self.dt_bias)
        conv = (lambda c: ShortConv(c, conv_size, bias=False, activation=True, params_dtype=dtype)) \
            if conv_size else (lambda c: None)
        self.q_conv, self.k_conv, self.v_conv = conv(heads * K), conv(heads * K), conv(heads * V)
        self.norm = HeadRMSNorm(V, norm_eps, dtype)
        self.out = RowLinear(heads * V, d, config=config, init_method=config.output_layer_init_method, bias=False,
                             input_is_parallel=True, skip_bias_add=False)

    def _gates(self, u, dtype):
        beta = self.beta(u)[0].to(dtype).sigmoid()
        log_a = -self.A_log.to(dtype).exp() * F.softplus(self.alpha(u)[0].to(dtype) + self.dt_bias.to(dtype))
        return beta, log_a

    def _qkv(self, q, k, v):
        if self.q_conv is None:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        return l2_normalise(q) * self.head_k ** -0.5, l2_normalise(k), v

    def _sequence(self, hidden_states, keep_state: bool = False):
        """(output, state after the last position or None): forward and prefill in one pass."""
        H, dtype = self.local_heads, compute_dtype(hidden_states)
        raw = [proj(hidden_states)[0] for proj in (self.q, self.k, self.v)]
        q, k, v = (heads_first(conv_sequence(c, z), H).to(dtype)
                   for c, z in zip((self.q_conv, self.k_conv, self.v_conv), raw))
        q, k, v = self._qkv(q, k, v)
        beta, log_a = (x.permute(1, 2, 0) for x in self._gates(hidden_states, dtype))  # [b, H, s]
        o, S = chunked_gated_delta_rule(q, k, v, beta, log_a, self.chunk_size)
        gate = heads_first(self.g(hidden_states)[0], H) if self.g is not None else None
        y = self.out(sequence_first(self.norm(o, gate)).to(hidden_states.dtype))[0]
        if not keep_state:
            return y, None
        convs = [conv_prefill_state(c, z) for c, z in zip((self.q_conv, self.k_conv, self.v_conv), raw)]
        return y, {"conv": convs, "S": S}

    def forward(self, hidden_states, attention_mask=None, token_ids=None, **ignored):
        return self._sequence(hidden_states)[0], None

    def prefill(self, hidden_states):
        """x [s, b, d] -> (forward's output, its bias (None), the decoding state after position s - 1)."""
        y, state = self._sequence(hidden_states, keep_state=True)
        return y, None, state

    def initial_state(self, batch: int, dtype=torch.float32, device=None) -> dict:
        """Zero state: the conv buffers and S [b, H_local, K, V]."""
        convs = [c.initial_state(batch, dtype, device) if c is not None else None
                 for c in (self.q_conv, self.k_conv, self.v_conv)]
        S = torch.zeros(batch, self.local_heads, self.head_k, self.head_v, dtype=dtype, device=device)
        return {"conv": convs, "S": S}

    def step(self, x: torch.Tensor, state: dict):
        """One position: x [b, d] -> (y [b, d], new state); equal to forward over a sequence, token by token."""
        H, b, dtype = self.local_heads, x.shape[0], compute_dtype(x)
        parts, convs = project_step(x, H, (self.q, self.k, self.v), (self.q_conv, self.k_conv, self.v_conv),
                                    state["conv"])
        q, k, v = self._qkv(*(z.to(dtype) for z in parts))
        beta, log_a = self._gates(x, dtype)
        o, S = gated_delta_rule_step(state["S"], q, k, v, beta, log_a)
        gate = self.g(x)[0].view(b, H, -1) if self.g is not None else None
        return self.out(self.norm(o, gate).reshape(b, -1).to(x.dtype))[0], {"conv": convs, "S": S}


def _validate(shape, args):
    errors = []
    heads = args["num_heads"] or shape.num_attention_heads
    ok = check_int(errors, "gated_deltanet", args, "num_heads", 0,
                   "use a positive number of heads, or 0 for num_attention_heads")
    ok &= check_number(errors, "gated_deltanet", args, "expand_v", "use a positive ratio (value / key dim), e.g. 2")
    if ok:
        check_heads(errors, "gated_deltanet", shape, heads, {"hidden_size": shape.hidden_size})
        K = shape.hidden_size // heads
        if K * args["expand_v"] != int(K * args["expand_v"]):
            errors.append(f"gated_deltanet.expand_v: {args['expand_v']!r} times the key dim {K} is not an integer; "
                          f"use e.g. 2")
    check_int(errors, "gated_deltanet", args, "conv_size", 0, "use a kernel size (the reference's: 4) or 0 for none")
    check_bool(errors, "gated_deltanet", args, "output_gate")
    check_number(errors, "gated_deltanet", args, "norm_eps", "use a small positive number, e.g. 1e-5")
    check_int(errors, "gated_deltanet", args, "chunk_size", 1, "use a positive int, e.g. 32")
    return errors


def _flops(shape, args):
    d, H = shape.hidden_size, args["num_heads"] or shape.num_attention_heads
    C = min(args["chunk_size"], shape.seq_length)
    K = d // H
    V = int(K * args["expand_v"])
    f = 2 * flops.linear(d, H * K) + flops.linear(d, H * V) * (3 if args["output_gate"] else 2)
    f += 2 * flops.linear(d, H) + 2.0 * args["conv_size"] * H * (2 * K + V)
    # per head: k k^T, q k^T (C x K each), the two triangular solves (C x (K + V) / 2 each), the writes
    # W S, the intra-chunk values, the state read and write (K x V each)
    return f + H * (4.0 * C * K + C * (K + V) + 2.0 * C * V + 6.0 * K * V)


def _state_bytes(shape, args, seq_len):
    """S [H, K, V] per head, plus the short convs' last taps on q, k, v."""
    d, H = shape.hidden_size, args["num_heads"] or shape.num_attention_heads
    K = d // H
    V = int(K * args["expand_v"])
    return (H * K * V + max(args["conv_size"] - 1, 0) * H * (2 * K + V)) * STATE_BYTES


register(
    MixerSpec(
        name="gated_deltanet",
        module=GatedDeltaNet,
        defaults={"num_heads": 0, "expand_v": 2.0, "conv_size": 4, "output_gate": True, "norm_eps": 1e-5,
                  "chunk_size": 32},
        tp_split="heads",
        flops=_flops,
        validate=_validate,
        state_bytes=_state_bytes,
        doc="gated DeltaNet: delta rule with a scalar decay per head, short convs + SiLU on q/k/v, L2-normalised "
            "q/k, RMSNorm-swish output gate, chunked O(L)",
    )
)
