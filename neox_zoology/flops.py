"""Forward FLOPs per token, per component. Training FLOPs = 3 x forward (backward = 2 x forward).

Conventions (stated so that MFU figures can be compared):
- a matmul of [*, m] x [m, n] costs 2*m*n per token; element-wise ops are not counted;
- attention's score and value products count the full L x L square (PaLM / Megatron convention),
  4*L*d per token, even though causal kernels skip the upper triangle;
- a real FFT of size n costs 2.5*n*log2(n); the causal FFT convolution of one channel is an rfft of
  the input, a complex product over n/2+1 bins (6 flops each) and an irfft; the filter's FFT is
  taken once per batch and is not counted per token.
"""
from __future__ import annotations

import math



def linear(d_in: int, d_out: int) -> float:
    return 2.0 * d_in * d_out


def attention_core(d: int, L: int, window: int = 0) -> float:
    span = min(window, L) if window and window > 0 else L
    return 4.0 * span * d


def fft_conv(channels: int, L: int, kernel_len: int | None = None) -> float:
    """Causal FFT convolution of `channels` sequences of length L with filters of `kernel_len` taps (default L)."""
    from neox_zoology.mixers.fftconv import fast_fft_size

    n = fast_fft_size(L + (L if kernel_len is None else kernel_len))
    per_channel_seq = 2 * 2.5 * n * math.log2(n) + 6 * (n // 2 + 1)
    return channels * per_channel_seq / L


def short_conv(channels: int, k: int) -> float:
    return 2.0 * channels * k


def mlp(d: int, ffn: int, gated: bool) -> float:
    return (3 if gated else 2) * linear(d, ffn)


def model_forward_per_token(args) -> float:
    """Forward FLOPs per token of the whole model described by a config (`neox_zoology.config.Args`)."""
    from neox_zoology import registry

    shape = args.shape()
    total = 0.0
    for occurrence, layer_type in args.layer_occurrences():
        spec = registry.get(layer_type)
        mixer_args = spec.per_layer(args.mixer_args(layer_type), occurrence)
        total += spec.flops(shape, mixer_args)
        if not spec.has_mlp(args.mixer_args(layer_type)):
            continue
        if spec.mlp is not None:  # a mixer-specific MLP (RWKV's channel mix) states its own cost
            total += spec.mlp.flops(args.hidden_size, args.ffn_hidden_size)
        else:
            total += mlp(args.hidden_size, args.mlp_width, args.gated_mlp)
    total += linear(args.hidden_size, args.padded_vocab_size)  # LM head
    return total
