"""Optional CUDA fast path: flash-linear-attention's Triton kernels (`fla-core`) for the chunked forms.

Used by `kernels.chunked_linear_attention`, `kernels.chunked_gated_delta_rule` and Mamba-2's
`chunked_ssd` (as one-gate-per-head linear attention, see `ssd`) when `fla` imports, the
inputs are CUDA tensors in fp32 / bf16 / fp16 without gradients on an initial state, and the head sizes are
ones the kernels take (K, V <= MAX_HEAD_DIM; fla's chunk kernels tile a head's key dimension in one block).
Everything else, CPU and fp64 included, runs the portable PyTorch kernels. The kernels compute the same
recurrences (o_t = S_t^T q_t, scale 1, decays in natural log), in this module's layout [b, h, L, K] moved to
fla's [b, L, h, K]; tests/test_fast_paths.py compares both paths on CUDA. `ENABLED = False` (or the
environment variable NEOX_ZOOLOGY_PORTABLE_KERNELS=1) forces the portable kernels.
"""
from __future__ import annotations

import os

import torch

try:  # optional CUDA fast path
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as _fla_gated_delta_rule  # type: ignore
    from fla.ops.gla import chunk_gla as _fla_gla  # type: ignore
    from fla.ops.simple_gla import chunk_simple_gla as _fla_simple_gla  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _fla_gla = _fla_simple_gla = _fla_gated_delta_rule = None

ENABLED = os.environ.get("NEOX_ZOOLOGY_PORTABLE_KERNELS", "") not in ("1", "true")
MAX_HEAD_DIM = 256
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DELTA_RULE_CHUNKS = (16, 32, 64)


def available() -> bool:
    """Whether the fla kernels imported (whatever the inputs)."""
    return _fla_gla is not None


def usable(q: torch.Tensor, v: torch.Tensor, initial_state) -> bool:
    """Whether these inputs take the fla kernels."""
    return (ENABLED and available() and q.is_cuda and q.dtype in _DTYPES and q.shape[-1] <= MAX_HEAD_DIM
            and v.shape[-1] <= MAX_HEAD_DIM
            and (initial_state is None or not initial_state.requires_grad))


def _blhk(*xs):
    return [x.transpose(1, 2) for x in xs]


def _state(initial_state):
    return None if initial_state is None else initial_state.float()


def linear_attention(q, k, v, log_decay=None, initial_state=None):
    """`kernels.chunked_linear_attention` through fla: chunk_simple_gla (no decay / one gate per head) or
    chunk_gla (one gate per key channel). Returns (o [b, h, L, V] in q's dtype, S_L [b, h, K, V] fp32)."""
    qt, kt, vt = _blhk(q, k, v)
    if log_decay is not None and log_decay.dim() == 4:
        o, S = _fla_gla(qt, kt, vt, log_decay.transpose(1, 2), scale=1.0, initial_state=_state(initial_state),
                        output_final_state=True)
    else:
        g = None if log_decay is None else log_decay.transpose(1, 2)
        o, S = _fla_simple_gla(qt, kt, vt, g=g, scale=1.0, initial_state=_state(initial_state),
                               output_final_state=True)
    return o.transpose(1, 2).to(q.dtype), S


def gated_delta_rule(q, k, v, beta, log_alpha, chunk_size: int = 64, initial_state=None):
    """`kernels.chunked_gated_delta_rule` through fla's chunk_gated_delta_rule (q, k already normalised by
    the caller). Returns (o [b, h, L, V] in q's dtype, S_L [b, h, K, V] fp32)."""
    qt, kt, vt = _blhk(q, k, v)
    chunk = chunk_size if chunk_size in DELTA_RULE_CHUNKS else 64
    o, S = _fla_gated_delta_rule(qt, kt, vt, log_alpha.transpose(1, 2), beta.transpose(1, 2), scale=1.0,
                                 initial_state=_state(initial_state), output_final_state=True, chunk_size=chunk)
    return o.transpose(1, 2).to(q.dtype), S


def ssd(x, dt, A, B, C, initial_state=None):
    """Mamba-2's `chunked_ssd` through fla's chunk_simple_gla. SSD is linear attention with one gate per head:
    q = C, k = B (each head reads its group's), v = dt x, log decay dt A, and the SSD state h [P, N] is the
    transposed linear-attention state S [N, P]. x [b, H, L, P], dt [b, H, L], A [H], B, C [b, G, L, N];
    returns (y [b, H, L, P] in x's dtype, h_L [b, H, P, N] fp32)."""
    hg = x.shape[1] // B.shape[1]
    q, k = C.repeat_interleave(hg, 1), B.repeat_interleave(hg, 1)
    S0 = None if initial_state is None else initial_state.transpose(-1, -2)
    o, S = linear_attention(q, k, x * dt[..., None], dt * A[:, None], S0)
    return o.to(x.dtype), S.transpose(-1, -2)
