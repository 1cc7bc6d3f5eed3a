"""Gated linear attention (GLA): linear attention with a data-dependent decay per key channel.

Per head (H heads of key dim K = expand_k d / H and value dim V = expand_v d / H):

    q, k, v = W_q u, W_k u, W_v u            (optionally through a short causal conv + SiLU each)
    g_t = logsigmoid(W_up W_down u_t + b_up) / gate_logit_normalizer          (<= 0, per key channel)
    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t / sqrt(K)
    y = W_o [RMSNorm(o) * silu(W_g u)]        (RMSNorm per head over V, weight shared by the heads)

As the reference layer (fla `GatedLinearAttention`, which zoology registers): projections without bias
except b_up, low-rank gate of rank 16, normaliser 16, 4 heads, expand_k 0.5, expand_v 1, short conv
off (`conv_size` 0; 4 when on), output gate with the fused RMSNorm-swish, norm eps 1e-5. The
reference's `clamp_min` (off by default) and grouped key/value heads are not offered.
Tensor parallelism: heads split; the rank-16 gate projection is replicated, its up-projection split.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neox_zoology import flops
from neox_zoology.mixers.base import Mixer
from neox_zoology.mixers.linear_attention.common import (HeadRMSNorm, ShortConv, check_bool, check_heads, check_int,
                                                          check_number, conv_prefill_state, conv_sequence, heads_first,
                                                          project_step, sequence_first)
from neox_zoology.mixers.linear_attention.kernels import (chunked_linear_attention, compute_dtype,
                                                           linear_attention_step)
from neox_zoology.parallel import ColumnLinear, RowLinear, tp_size
from neox_zoology.registry import STATE_BYTES, MixerSpec, register


class GLA(Mixer):
    def __init__(self, config, layer_number: int = 1, *, seq_length: int, num_heads: int = 4, expand_k: float = 0.5,
                 expand_v: float = 1.0, conv_size: int = 0, gate_low_rank_dim: int = 16,
                 gate_logit_normalizer: float = 16.0, output_gate: bool = True, norm_eps: float = 1e-5,
                 chunk_size: int = 8, **stack_kwargs):
        super().__init__(config, layer_number, **stack_kwargs)
        d, dtype = config.hidden_size, config.params_dtype
        key_dim, value_dim = int(d * expand_k), int(d * expand_v)
        self.local_heads, self.head_k = num_heads // tp_size(), key_dim // num_heads
        self.normalizer, self.chunk_size = gate_logit_normalizer, chunk_size
        lin = dict(config=config, init_method=config.init_method, bias=False, gather_output=False)
        self.q, self.k = ColumnLinear(d, key_dim, **lin), ColumnLinear(d, key_dim, **lin)
        self.v = ColumnLinear(d, value_dim, **lin)
        self.g = ColumnLinear(d, value_dim, **lin) if output_gate else None
        w = torch.empty(gate_low_rank_dim, d)
        config.init_method(w)
        self.gate_down = nn.Parameter(w.to(dtype))  # replicated on every TP rank
        self.gate_up = ColumnLinear(gate_low_rank_dim, key_dim, **{**lin, "bias": True})
        conv = (lambda c: ShortConv(c, conv_size, bias=False, activation=True, params_dtype=dtype)) \
            if conv_size else (lambda c: None)
        self.q_conv, self.k_conv, self.v_conv = conv(key_dim), conv(key_dim), conv(value_dim)
        self.norm = HeadRMSNorm(value_dim // num_heads, norm_eps, dtype)
        self.out = RowLinear(value_dim, d, config=config, init_method=config.output_layer_init_method, bias=False,
                             input_is_parallel=True, skip_bias_add=False)

    def _log_decay(self, u):
        return F.logsigmoid(self.gate_up(F.linear(u, self.gate_down))[0].to(compute_dtype(u))) / self.normalizer

    def _sequence(self, hidden_states, keep_state: bool = False):
        """(output, state after the last position or None): forward and prefill in one pass."""
        H, dtype = self.local_heads, compute_dtype(hidden_states)
        raw = [proj(hidden_states)[0] for proj in (self.q, self.k, self.v)]
        q, k, v = (heads_first(conv_sequence(c, z), H).to(dtype)
                   for c, z in zip((self.q_conv, self.k_conv, self.v_conv), raw))
        g = heads_first(self._log_decay(hidden_states), H)
        o, S = chunked_linear_attention(q * self.head_k ** -0.5, k, v, g, self.chunk_size)
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
        V = self.v.weight.shape[0] // self.local_heads
        convs = [c.initial_state(batch, dtype, device) if c is not None else None
                 for c in (self.q_conv, self.k_conv, self.v_conv)]
        return {"conv": convs, "S": torch.zeros(batch, self.local_heads, self.head_k, V, dtype=dtype, device=device)}

    def step(self, x: torch.Tensor, state: dict):
        """One position: x [b, d] -> (y [b, d], new state); equal to forward over a sequence, token by token."""
        H, b = self.local_heads, x.shape[0]
        (q, k, v), convs = project_step(x, H, (self.q, self.k, self.v), (self.q_conv, self.k_conv, self.v_conv),
                                        state["conv"])
        o, S = linear_attention_step(state["S"], q * self.head_k ** -0.5, k, v, self._log_decay(x).view(b, H, -1))
        gate = self.g(x)[0].view(b, H, -1) if self.g is not None else None
        return self.out(self.norm(o, gate).reshape(b, -1))[0], {"conv": convs, "S": S}


def _validate(shape, args):
    errors = []
    d = shape.hidden_size
    ok = check_int(errors, "gla", args, "num_heads", 1, "use a positive number of heads (the reference's: 4)")
    ok &= check_number(errors, "gla", args, "expand_k", "use a positive ratio (key dim / hidden_size), e.g. 0.5")
    ok &= check_number(errors, "gla", args, "expand_v", "use a positive ratio (value dim / hidden_size), e.g. 1.0")
    if ok:
        check_heads(errors, "gla", shape, args["num_heads"],
                    {"key dim": d * args["expand_k"], "value dim": d * args["expand_v"]})
    check_int(errors, "gla", args, "conv_size", 0, "use 0 (no short conv, the reference's default) or a kernel size, "
                                                   "e.g. 4")
    check_int(errors, "gla", args, "gate_low_rank_dim", 1, "use a positive int, e.g. 16")
    check_number(errors, "gla", args, "gate_logit_normalizer", "use a positive number, e.g. 16")
    check_bool(errors, "gla", args, "output_gate")
    check_number(errors, "gla", args, "norm_eps", "use a small positive number, e.g. 1e-5")
    check_int(errors, "gla", args, "chunk_size", 1, "use a positive int, e.g. 8")
    return errors


def _flops(shape, args):
    d, H, C = shape.hidden_size, args["num_heads"], min(args["chunk_size"], shape.seq_length)
    kd, vd, r = int(d * args["expand_k"]), int(d * args["expand_v"]), args["gate_low_rank_dim"]
    K, V = kd // H, vd // H
    f = 2 * flops.linear(d, kd) + flops.linear(d, vd) * (3 if args["output_gate"] else 2)
    f += flops.linear(d, r) + flops.linear(r, kd) + 2.0 * args["conv_size"] * (2 * kd + vd)
    # per head: decayed intra-chunk scores (C x K), values (C x V), state read and write (K x V each)
    return f + H * (2.0 * C * (2 * K + V) + 4.0 * K * V)


def _state_bytes(shape, args, seq_len):
    """S [H, K, V] per head, plus the short convs' last taps on q, k, v."""
    d, H = shape.hidden_size, args["num_heads"]
    kd, vd = int(d * args["expand_k"]), int(d * args["expand_v"])
    conv = max(args["conv_size"] - 1, 0) * (2 * kd + vd)
    return (H * (kd // H) * (vd // H) + conv) * STATE_BYTES


register(
    MixerSpec(
        name="gla",
        module=GLA,
        defaults={"num_heads": 4, "expand_k": 0.5, "expand_v": 1.0, "conv_size": 0, "gate_low_rank_dim": 16,
                  "gate_logit_normalizer": 16.0, "output_gate": True, "norm_eps": 1e-5, "chunk_size": 8},
        tp_split="heads",
        flops=_flops,
        validate=_validate,
        state_bytes=_state_bytes,
        doc="gated linear attention: low-rank data-dependent decay per key channel (`logsigmoid / 16`), "
            "RMSNorm-swish output gate, chunked O(L)",
    )
)
