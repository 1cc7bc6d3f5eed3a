"""Chunked and recurrent forms of the linear-attention recurrences, in plain PyTorch (any device).

Layout: q, k [b, h, L, K], v [b, h, L, V], a state S [b, h, K, V]; the output at t is o_t = S_t^T q_t,
where S_t already holds position t. The chunked forms cut L into chunks of C positions: inside a chunk
a masked C x C product, across chunks the state carried forward; memory is O(L) in the sequence length
(the per-key-channel decay adds a C x C x K factor per chunk). Every decay is exp of a non-positive
number, so nothing overflows in fp32. Derivations: docs/recall-mixers.md. On CUDA, when flash-linear-attention
is installed, the chunked forms run its Triton kernels instead (fla_path.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from neox_zoology.mixers.linear_attention import fla_path


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64; everything else accumulates in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _split(x: torch.Tensor, C: int, n: int) -> torch.Tensor:
    """[b, h, L, ...] -> [b, h, n, C, ...], zero-padded at the end."""
    pad = n * C - x.shape[2]
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.reshape(*x.shape[:2], n, C, *x.shape[3:])


def _decay_matrix(cum: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(cum_t - cum_s) where mask[t, s], else 0; cum [..., C] -> [..., C, C]."""
    return (cum[..., :, None] - cum[..., None, :]).masked_fill(~mask, float("-inf")).exp()


def chunked_linear_attention(q, k, v, log_decay=None, chunk_size: int = 64, initial_state=None):
    """S_t = diag(exp(log_decay_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t; returns (o [b, h, L, V], S_L).

    log_decay: None (no decay), [b, h, L] (one gate per head) or [b, h, L, K] (one per key channel),
    all entries <= 0. Equal to `linear_attention_step` applied token by token.
    """
    if fla_path.usable(q, v, initial_state):
        return fla_path.linear_attention(q, k, v, log_decay, initial_state)
    b, h, L, K = q.shape
    V = v.shape[-1]
    C = max(1, min(chunk_size, L))
    n = -(-L // C)
    qc, kc, vc = _split(q, C, n), _split(k, C, n), _split(v, C, n)
    S = q.new_zeros(b, h, K, V) if initial_state is None else initial_state
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if log_decay is None:
        intra = ((qc @ kc.transpose(-1, -2)) * causal) @ vc
        kv = (kc.transpose(-1, -2) @ vc).cumsum(2)  # state after each chunk, minus the initial one
        before = S[:, :, None] + F.pad(kv[:, :, :-1], (0, 0, 0, 0, 1, 0))
        o = intra + qc @ before
        final = S + kv[:, :, -1]
    else:
        cum = _split(log_decay, C, n).cumsum(3)  # inclusive log decay from the chunk start
        if log_decay.dim() == 3:  # one gate per head: [b, h, n, C]
            A = (qc @ kc.transpose(-1, -2)) * _decay_matrix(cum, causal)
            last = cum[..., -1:]
            q_in, k_out = qc * cum.exp()[..., None], kc * (last - cum).exp()[..., None]
            carry = last.exp()[..., None]  # [b, h, n, 1, 1]
        else:  # one gate per key channel: [b, h, n, C, K]
            diff = (cum[..., :, None, :] - cum[..., None, :, :]).masked_fill(~causal[..., None], float("-inf"))
            A = torch.einsum("...tk,...sk,...tsk->...ts", qc, kc, diff.exp())
            last = cum[..., -1:, :]
            q_in, k_out = qc * cum.exp(), kc * (last - cum).exp()
            carry = last.transpose(-1, -2).exp()  # [b, h, n, K, 1]
        intra = A @ vc
        kv = k_out.transpose(-1, -2) @ vc  # [b, h, n, K, V]
        carried = []  # unbind once: indexing chunk c in the loop would cost a full-size zero fill per chunk in backward
        for q_c, carry_c, kv_c in zip(q_in.unbind(2), carry.unbind(2), kv.unbind(2)):
            carried.append(q_c @ S)
            S = carry_c * S + kv_c
        o = intra + torch.stack(carried, 2)
        final = S
    return o.reshape(b, h, n * C, V)[:, :, :L], final


def linear_attention_step(S, q, k, v, log_decay=None):
    """One position of `chunked_linear_attention`: q, k [b, h, K], v [b, h, V]; returns (o [b, h, V], S)."""
    if log_decay is not None:
        S = S * (log_decay.exp()[..., None] if log_decay.dim() == 3 else log_decay.exp()[..., None, None])
    S = S + k[..., :, None] * v[..., None, :]
    return (q[..., :, None] * S).sum(-2), S


def chunked_gated_delta_rule(q, k, v, beta, log_alpha, chunk_size: int = 64, initial_state=None):
    """S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, o_t = S_t^T q_t; returns (o, S_L).

    beta, log_alpha [b, h, L] (log_alpha <= 0, a_t = exp(log_alpha_t)). Inside a chunk the writes
    d_t = b_t (v_t - a_t S_{t-1}^T k_t) solve one unit lower-triangular C x C system (docs/recall-mixers.md).
    """
    if fla_path.usable(q, v, initial_state):
        return fla_path.gated_delta_rule(q, k, v, beta, log_alpha, chunk_size, initial_state)
    b, h, L, K = q.shape
    V = v.shape[-1]
    C = max(1, min(chunk_size, L))
    n = -(-L // C)
    qc, kc, vc = _split(q, C, n), _split(k, C, n), _split(v, C, n)
    bc, cum = _split(beta, C, n), _split(log_alpha, C, n).cumsum(3)
    S = q.new_zeros(b, h, K, V) if initial_state is None else initial_state
    ones = torch.ones(C, C, dtype=torch.bool, device=q.device)
    M = bc[..., None] * (kc @ kc.transpose(-1, -2)) * _decay_matrix(cum, ones.tril(-1))
    system = M + torch.eye(C, dtype=M.dtype, device=M.device)
    U = torch.linalg.solve_triangular(system, bc[..., None] * vc, upper=False, unitriangular=True)
    W = torch.linalg.solve_triangular(system, (bc * cum.exp())[..., None] * kc, upper=False, unitriangular=True)
    A = (qc @ kc.transpose(-1, -2)) * _decay_matrix(cum, ones.tril())
    last = cum[..., -1:]
    q_in, k_out, carry = qc * cum.exp()[..., None], kc * (last - cum).exp()[..., None], last.exp()[..., None]
    outs = []  # chunks unbound once, as in chunked_linear_attention
    for U_c, W_c, q_c, A_c, carry_c, k_c in zip(*(t.unbind(2) for t in (U, W, q_in, A, carry, k_out))):
        delta = U_c - W_c @ S
        outs.append(q_c @ S + A_c @ delta)
        S = carry_c * S + k_c.transpose(-1, -2) @ delta
    return torch.stack(outs, 2).reshape(b, h, n * C, V)[:, :, :L], S


def gated_delta_rule_step(S, q, k, v, beta, log_alpha):
    """One position of `chunked_gated_delta_rule`: q, k [b, h, K], v [b, h, V], beta, log_alpha [b, h]."""
    S = S * log_alpha.exp()[..., None, None]
    delta = beta[..., None] * (v - (k[..., :, None] * S).sum(-2))
    S = S + k[..., :, None] * delta[..., None, :]
    return (q[..., :, None] * S).sum(-2), S
