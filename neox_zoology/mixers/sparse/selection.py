"""Which query positions a sparse layer attends from: the selection rules and the layer's random stream."""
from __future__ import annotations

import math

import torch
from megatron.core import parallel_state


def programmatic_selection(token_ids: torch.Tensor, match: str = "token") -> torch.Tensor:
    """Token ids [B, L] -> bool [B, L]: the token at t (`token`), or the bigram (t-1, t) (`bigram`),
    already occurred earlier in the same row. Depends on ids[: t + 1] only (causal).

    A stable sort groups equal keys with their earliest occurrence first; every other member of a
    group is a repeat.
    """
    ids = token_ids.long()
    B, L = ids.shape
    out = torch.zeros(B, L, dtype=torch.bool, device=ids.device)
    if match == "token":
        keys, first = ids, 0
    elif match == "bigram":
        if L < 2:
            return out
        keys, first = (ids[:, :-1] << 32) | ids[:, 1:], 1  # ids < 2^31
    else:
        raise ValueError(f"match: {match!r}; use 'token' or 'bigram'")
    sorted_keys, order = keys.sort(dim=1, stable=True)
    repeat = torch.zeros_like(sorted_keys, dtype=torch.bool)
    repeat[:, 1:] = sorted_keys[:, 1:] == sorted_keys[:, :-1]
    out[:, first:] = torch.zeros_like(repeat).scatter_(1, order, repeat)
    return out


def topk_selection(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool [B, L] marking the k highest scores of each row (over the whole row: not causal)."""
    idx = scores.topk(k, dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def selected_positions(mask: torch.Tensor) -> torch.Tensor:
    """bool [B, L] -> the selected positions of each row, ascending, [B, kmax] (kmax = the largest count,
    at least 1); rows with fewer selected positions are left-padded with -1."""
    B, L = mask.shape
    kmax = max(int(mask.sum(1).max()), 1) if mask.numel() else 1
    ar = torch.arange(L, device=mask.device).expand(B, L)
    return torch.where(mask, ar, -1).sort(dim=1).values[:, L - kmax:]


def learned_k(L: int, topk: int | None, budget: float | None) -> int:
    """Positions per sequence for learned selection: topk, else ceil(budget * L), else ceil(sqrt(L))."""
    if topk is not None:
        k = topk
    elif budget is not None:
        k = math.ceil(budget * L - 1e-9)
    else:
        k = math.ceil(math.sqrt(L))
    return max(1, min(L, int(k)))


def mix_seed(seed: int, counter: int, stream: int) -> int:
    """A 63-bit generator seed from (layer seed, draw counter, stream) (splitmix64-style mixing)."""
    z = (seed + 0x9E3779B97F4A7C15 * (counter + 1) + 0xBF58476D1CE4E5B9 * (stream + 1)) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


def distributed() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and parallel_state.model_parallel_is_initialized())


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank() if distributed() else 0


def dp_mean(t: torch.Tensor) -> torch.Tensor:
    if not distributed():
        return t
    group = parallel_state.get_data_parallel_group()
    n = torch.distributed.get_world_size(group)
    if n == 1:
        return t
    t = t.clone()
    torch.distributed.all_reduce(t, group=group)
    return t / n
