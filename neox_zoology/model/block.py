"""A layer: pre-norm residual block around a registered mixer and an MLP.

    x = x + mixer(norm1(x));  x = x + mlp(norm2(x))        (or, with gpt_j_residual,
    x = x + mixer(norm1(x)) + mlp(norm2(x)))

Activations are sequence-first [s, b, h] as in megatron-core. Pipeline layers pass the tuple
(hidden, token_ids): token ids ride along so that mixers which select positions from raw tokens can
use them on any pipeline stage.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neox_zoology import registry
from neox_zoology.parallel import ColumnLinear, RowLinear


def build_norm(args) -> nn.Module:
    if args.norm == "rmsnorm":
        return nn.RMSNorm(args.hidden_size, eps=args.rms_norm_epsilon)
    return nn.LayerNorm(args.hidden_size, eps=args.layernorm_epsilon)


class MLP(nn.Module):
    """GELU MLP or SwiGLU (gate and up projections kept separate so TP shards stay aligned)."""

    def __init__(self, config, ffn: int, gated: bool, bias: bool):
        super().__init__()
        h = config.hidden_size
        col = dict(config=config, init_method=config.init_method, bias=bias, gather_output=False)
        self.gated = gated
        self.up = ColumnLinear(h, ffn, **col)
        self.gate = ColumnLinear(h, ffn, **col) if gated else None
        self.down = RowLinear(
            ffn, h, config=config, init_method=config.output_layer_init_method, bias=bias, input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, x):
        up, _ = self.up(x)
        if self.gated:
            g, _ = self.gate(x)
            up = F.silu(g) * up
        else:
            up = F.gelu(up)
        y, _ = self.down(up)
        return y


def activation_checkpoint(function, *inputs):
    """megatron-core's `tensor_parallel.checkpoint`: keeps the inputs, recomputes `function` in backward
    with the CPU, CUDA and model-parallel RNG states of the first pass (dropout and random selections
    draw the same numbers twice)."""
    from megatron.core import tensor_parallel

    return tensor_parallel.checkpoint(function, False, *inputs)


class ZooBlock(nn.Module):
    """One layer. The class name is what `pipe_partition_method: type:ZooBlock` balances over."""

    def __init__(self, args, config, layer_number: int, layer_type: str, occurrence: int):
        super().__init__()
        spec = registry.get(layer_type)
        self.layer_type = spec.name
        self.needs_token_ids = spec.needs_token_ids
        self.parallel_residual = args.gpt_j_residual
        self.input_norm = build_norm(args)
        self.mixer = spec.module(
            config, layer_number, seq_length=args.seq_length,
            **spec.per_layer(args.mixer_args(layer_type), occurrence),
        )
        self.post_norm = build_norm(args)
        if spec.mlp is not None:
            self.mlp = spec.mlp(config, layer_number)
        else:
            self.mlp = MLP(config, args.ffn_hidden_size, args.gated_mlp, args.mlp_bias)
        self.dropout = nn.Dropout(args.hidden_dropout)
        self.recompute = False
        """Activation checkpointing of this block alone (set by the pipeline engine's builder)."""

    def forward(self, inputs):
        if self.recompute and self.training and torch.is_grad_enabled():
            return activation_checkpoint(self._body, *inputs)
        return self._body(*inputs)

    def _body(self, x, token_ids):
        m, bias = self.mixer(self.input_norm(x), token_ids=token_ids if self.needs_token_ids else None)
        if bias is not None:
            m = m + bias
        if self.parallel_residual:
            x = x + self.dropout(m) + self.dropout(self.mlp(self.post_norm(x)))
        else:
            x = x + self.dropout(m)
            x = x + self.dropout(self.mlp(self.post_norm(x)))
        return x, token_ids
