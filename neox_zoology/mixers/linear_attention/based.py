"""Based's linear attention: normalised linear attention with the 2nd-order Taylor feature map.

Per head (H heads, feature dim F per head for q and k, value dim P = d / H):

    phi(x) = [1, x / F^(1/4), vec(x x^T) / (sqrt(2) sqrt(F))]          (1 + F + F^2 features)
    y_t = sum_{s<=t} (phi(q_t).phi(k_s)) v_s / (sum_{s<=t} phi(q_t).phi(k_s) + eps)
    out = W_o y

so phi(q).phi(k) = 1 + q.k / sqrt(F) + (q.k)^2 / (2F), the Taylor expansion of exp(q.k / sqrt(F)).
As the reference (HazyResearch/based `LinearAttention`, zoology `Based`): q, k, v, W_o without bias,
eps 1e-12, no output norm. `conv_size` > 0 adds a depthwise causal conv (no bias, no activation) on
the q, k and v projections; the reference leaves it out of this layer (its short convolutions are the
gated-convolution layers of the hybrid), so the default is 0.
Tensor parallelism: heads split (q, k, v column-parallel, W_o row-parallel).
"""
from __future__ import annotations

import math

import torch

from neox_zoology import flops
from neox_zoology.mixers.base import Mixer
from neox_zoology.mixers.linear_attention.common import (ShortConv, check_heads, check_int,
                                                          check_number, conv_prefill_state, conv_sequence, heads_first,
                                                          project_step, sequence_first)
from neox_zoology.mixers.linear_attention.kernels import (chunked_linear_attention, compute_dtype,
                                                           linear_attention_step)
from neox_zoology.parallel import ColumnLinear, RowLinear, tp_size
from neox_zoology.registry import STATE_BYTES, MixerSpec, register


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """[..., F] -> [..., 1 + F + F^2]: phi(x) of the module docstring."""
    F_ = x.shape[-1]
    x2 = (x[..., :, None] * x[..., None, :]).flatten(-2) / (math.sqrt(2) * math.sqrt(F_))
    return torch.cat([torch.ones_like(x[..., :1]), x / F_ ** 0.25, x2], -1)


class Based(Mixer):
    def __init__(self, config, layer_number: int = 1, *, seq_length: int, feature_dim: int = 16, num_heads: int = 0,
                 eps: float = 1e-12, conv_size: int = 0, chunk_size: int = 128, **stack_kwargs):
        super().__init__(config, layer_number, **stack_kwargs)
        d = config.hidden_size
        heads = num_heads or config.num_attention_heads
        self.local_heads, self.eps, self.chunk_size = heads // tp_size(), eps, chunk_size
        self.feature_dim, self.head_dim = feature_dim, d // heads
        lin = dict(config=config, init_method=config.init_method, bias=False, gather_output=False)
        self.q = ColumnLinear(d, heads * feature_dim, **lin)
        self.k = ColumnLinear(d, heads * feature_dim, **lin)
        self.v = ColumnLinear(d, d, **lin)
        self.out = RowLinear(d, d, config=config, init_method=config.output_layer_init_method, bias=False,
                             input_is_parallel=True, skip_bias_add=False)
        conv = (lambda c: ShortConv(c, conv_size, bias=False, activation=False, params_dtype=config.params_dtype)) \
            if conv_size else (lambda c: None)
        self.q_conv, self.k_conv, self.v_conv = conv(heads * feature_dim), conv(heads * feature_dim), conv(d)

    def _normalise(self, o: torch.Tensor) -> torch.Tensor:
        return o[..., :-1] / (o[..., -1:] + self.eps)

    def _sequence(self, hidden_states, keep_state: bool = False):
        """(output, state after the last position or None): forward and prefill in one pass."""
        H, dtype = self.local_heads, compute_dtype(hidden_states)
        raw = [proj(hidden_states)[0] for proj in (self.q, self.k, self.v)]
        q, k, v = (conv_sequence(c, z) for c, z in zip((self.q_conv, self.k_conv, self.v_conv), raw))
        v = heads_first(v, H).to(dtype)
        fq, fk = taylor_features(heads_first(q, H).to(dtype)), taylor_features(heads_first(k, H).to(dtype))
        # a column of ones makes the last output channel the normaliser sum_s phi(q_t).phi(k_s)
        o, S = chunked_linear_attention(fq, fk, torch.cat([v, torch.ones_like(v[..., :1])], -1), None, self.chunk_size)
        y = self.out(sequence_first(self._normalise(o)).to(hidden_states.dtype))[0]
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
        """Zero state: the conv buffers and S [b, H_local, 1 + F + F^2, P + 1] (values and normaliser)."""
        feat, P = 1 + self.feature_dim + self.feature_dim ** 2, self.head_dim
        convs = [c.initial_state(batch, dtype, device) if c is not None else None
                 for c in (self.q_conv, self.k_conv, self.v_conv)]
        return {"conv": convs, "S": torch.zeros(batch, self.local_heads, feat, P + 1, dtype=dtype, device=device)}

    def step(self, x: torch.Tensor, state: dict):
        """One position: x [b, d] -> (y [b, d], new state); equal to forward over a sequence, token by token."""
        H, b = self.local_heads, x.shape[0]
        (q, k, v), convs = project_step(x, H, (self.q, self.k, self.v), (self.q_conv, self.k_conv, self.v_conv),
                                        state["conv"])
        o, S = linear_attention_step(state["S"], taylor_features(q), taylor_features(k),
                                     torch.cat([v, torch.ones_like(v[..., :1])], -1))
        return self.out(self._normalise(o).reshape(b, -1))[0], {"conv": convs, "S": S}


def _validate(shape, args):
    errors = []
    heads = args["num_heads"] or shape.num_attention_heads
    if check_int(errors, "based", args, "num_heads", 0, "use a positive number of heads, or 0 for num_attention_heads"):
        check_heads(errors, "based", shape, heads, {"hidden_size": shape.hidden_size})
    check_int(errors, "based", args, "feature_dim", 1, "use a positive int (the reference's: 16)")
    check_int(errors, "based", args, "conv_size", 0, "use 0 (no short conv, the reference) or a kernel size, e.g. 3")
    check_int(errors, "based", args, "chunk_size", 1, "use a positive int, e.g. 128")
    check_number(errors, "based", args, "eps", "use a small positive number, e.g. 1e-12")
    return errors


def _flops(shape, args):
    d, heads, Fd, C = shape.hidden_size, args["num_heads"] or shape.num_attention_heads, args["feature_dim"], \
        args["chunk_size"]
    D, P = 1 + Fd + Fd * Fd, d // heads + 1
    f = 2 * flops.linear(d, heads * Fd) + 2 * flops.linear(d, d) + 2.0 * args["conv_size"] * (2 * heads * Fd + d)
    # per head: intra-chunk scores and values (C x D, C x P), the state read and the state write (D x P each)
    return f + heads * (2.0 * min(C, shape.seq_length) * (D + P) + 4.0 * D * P)


def _state_bytes(shape, args, seq_len):
    """S [H, 1 + F + F^2, P + 1] per head (values and normaliser), plus the short convs' last taps."""
    d, H, Fd = shape.hidden_size, args["num_heads"] or shape.num_attention_heads, args["feature_dim"]
    conv = max(args["conv_size"] - 1, 0) * (2 * H * Fd + d)
    return (H * (1 + Fd + Fd * Fd) * (d // H + 1) + conv) * STATE_BYTES


register(
    MixerSpec(
        name="based",
        module=Based,
        defaults={"feature_dim": 16, "num_heads": 0, "eps": 1e-12, "conv_size": 0, "chunk_size": 128},
        tp_split="heads",
        flops=_flops,
        validate=_validate,
        state_bytes=_state_bytes,
        doc="Based linear attention: 2nd-order Taylor feature map (16 per head), normalised, chunked O(L); optional"
            " short conv on q/k/v",
    )
)
