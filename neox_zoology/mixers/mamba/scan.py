"""The selective scan (S6) in plain PyTorch: chunked, checkpointed, any device.

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t,    y_t = C_t . h_t + D x_t

per channel e (state h_t[e] of N numbers, A [E, N] <= 0, B_t, C_t [N] shared by the channels).
Inside a chunk of C positions the pairs (exp(dt A), dt x B) are combined by an inclusive
Hillis-Steele scan (log2 C steps, products of decays only, so nothing overflows); chunks run in
order, each recomputed in backward (torch.utils.checkpoint), so what stays saved per chunk is its
inputs and one [b, E, N] state: O(L E) memory rather than O(L E N).
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _scan_chunk(h0, x, dt, A, B, C):
    """h0 [b, E, N]; x, dt [b, E, c]; B, C [b, N, c] -> (C.h without the skip [b, E, c], h at the end)."""
    a = torch.exp(dt[..., None] * A[:, None, :])  # [b, E, c, N]
    s = (dt * x)[..., None] * B.transpose(1, 2)[:, None]
    step = 1
    while step < x.shape[-1]:  # after this loop: a = decay from the chunk start, s = state from a zero start
        s = torch.cat([s[:, :, :step], s[:, :, step:] + a[:, :, step:] * s[:, :, :-step]], 2)
        a = torch.cat([a[:, :, :step], a[:, :, step:] * a[:, :, :-step]], 2)
        step *= 2
    h = s + a * h0[:, :, None]
    return (h * C.transpose(1, 2)[:, None]).sum(-1), h[:, :, -1]


def selective_scan(x, dt, A, B, C, D, chunk_size: int = 32, initial_state=None):
    """x, dt [b, E, L] (dt > 0), A [E, N], B, C [b, N, L], D [E] -> (y [b, E, L], h_L [b, E, N])."""
    b, E, L = x.shape
    h = x.new_zeros(b, E, A.shape[-1]) if initial_state is None else initial_state
    ys = []
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, B, C, h))
    for start in range(0, L, chunk_size):
        part = (h, *(t[..., start:start + chunk_size] for t in (x, dt)), A,
                *(t[..., start:start + chunk_size] for t in (B, C)))
        y, h = checkpoint(_scan_chunk, *part, use_reentrant=False) if grad else _scan_chunk(*part)
        ys.append(y)
    return torch.cat(ys, -1) + D[:, None] * x, h


def selective_scan_step(h, x, dt, A, B, C, D):
    """One position: h [b, E, N], x, dt [b, E], B, C [b, N] -> (y [b, E], h)."""
    h = torch.exp(dt[..., None] * A) * h + (dt * x)[..., None] * B[:, None]
    return (h * C[:, None]).sum(-1) + D * x, h
