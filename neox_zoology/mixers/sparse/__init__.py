"""Selection-based sparse attention (Zoology section 5, Table 2): attention only at selected queries.

    y_t = g_t * W_o softmax_{j <= t}(q_t . k_j / sqrt(d_h)) v_j   if t is selected,   y_t = 0 otherwise

`sparse_random` selects each position with probability p; `sparse_programmatic` the positions whose
token (or bigram) already occurred earlier; `sparse_learned` the top-k (training) or thresholded
(evaluation) scores of a sigmoid selector, with g_t = s_t and an auxiliary sparsity loss. The rules are
in `selection`, the flash-style kernel in `kernel`, the layers and statistics in `layers`; the
derivations (aux-loss scaling under accumulation, pipeline and DP; the random stream under TP and
activation checkpointing) are in docs/sparse.md.
"""
from __future__ import annotations

import math

from neox_zoology import flops
from neox_zoology.mixers.attention import validate_attention
from neox_zoology.mixers.sparse.layers import (LearnedSparseAttention, ProgrammaticSparseAttention,
                                               RandomSparseAttention, SparseAttention, collect_stats,
                                               set_aux_loss_scale, sparse_layers)
from neox_zoology.mixers.sparse.selection import learned_k, programmatic_selection, selected_positions, topk_selection
from neox_zoology.registry import STATE_BYTES, MixerSpec, is_number, register

__all__ = ["SparseAttention", "RandomSparseAttention", "ProgrammaticSparseAttention", "LearnedSparseAttention",
           "collect_stats", "set_aux_loss_scale", "sparse_layers", "programmatic_selection", "selected_positions",
           "topk_selection", "learned_k"]


def _validate_common(name: str, shape, args) -> list[str]:
    errors = [f"{name}.{e}" for e in validate_attention(shape, {**args, "window": 0})]
    drop = args["attention_dropout"]
    if not is_number(drop) or drop != 0:
        errors.append(f"{name}: attention_dropout {drop!r} is not supported by sparse attention layers; "
                      f"set attention_dropout: 0")
    bs = args["block_size"]
    if not isinstance(bs, int) or isinstance(bs, bool) or bs < 0:
        errors.append(f"{name}.block_size: {bs!r}; use a positive number of key positions per block, or 0 for the "
                      f"default (256)")
    return errors


def _validate_random(shape, args):
    errors = _validate_common("sparse_random", shape, args)
    p = args["p"]
    if not is_number(p) or not 0 < p <= 1:
        errors.append(f"sparse_random.p: {p!r} is outside (0, 1]; use a selection probability such as 0.125")
    return errors


def _validate_programmatic(shape, args):
    errors = _validate_common("sparse_programmatic", shape, args)
    if args["match"] not in ("token", "bigram"):
        errors.append(f"sparse_programmatic.match: {args['match']!r}; use 'token' (the paper's rule) or 'bigram'")
    if not getattr(shape, "token_ids", True):
        errors.append(
            "sparse_programmatic: raw token ids cannot reach this layer in this setup (it selects positions from "
            "them); build the model from the GPT layer specs, which carry token ids from the embedding stage "
            "through the pipeline, or use sparse_learned / sparse_random"
        )
    return errors


def _validate_learned(shape, args):
    errors = _validate_common("sparse_learned", shape, args)
    topk, budget, L = args["topk"], args["budget"], shape.seq_length
    if topk is not None and (not isinstance(topk, int) or isinstance(topk, bool) or not 0 < topk <= L):
        errors.append(f"sparse_learned.topk: {topk!r}; use a number of positions in [1, seq_length {L}], "
                      f"or set budget (a fraction of the sequence) instead")
    if budget is not None and (not is_number(budget) or not 0 < budget <= 1):
        errors.append(f"sparse_learned.budget: {budget!r} is outside (0, 1]; use a fraction of the positions "
                      f"such as 0.125")
    if topk is not None and budget is not None:
        errors.append(f"sparse_learned: both topk ({topk}) and budget ({budget}) are set; set one of them")
    if args["train_selection"] not in ("topk", "threshold"):
        errors.append(f"sparse_learned.train_selection: {args['train_selection']!r}; use 'topk' (top-k over the "
                      f"sequence, not causal) or 'threshold' (causal)")
    for key in ("noise_std", "aux_loss_coef"):
        v = args[key]
        if not is_number(v) or v < 0 or not math.isfinite(v):
            errors.append(f"sparse_learned.{key}: {v!r}; use a non-negative number")
    mom = args["threshold_momentum"]
    if not is_number(mom) or not 0 <= mom < 1:
        errors.append(f"sparse_learned.threshold_momentum: {mom!r}; use a number in [0, 1), e.g. 0.99")
    return errors


def _fraction(layer_type: str, args, L: int) -> float:
    """Expected fraction of selected query positions (programmatic: data-dependent, counted as 1)."""
    if layer_type == "sparse_random":
        return float(args["p"])
    if layer_type == "sparse_learned":
        return learned_k(L, args["topk"], args["budget"]) / L
    return 1.0


def _flops_for(layer_type: str):
    def f(shape, args):
        d, L = shape.hidden_size, shape.seq_length
        frac = _fraction(layer_type, args, L)
        total = flops.linear(d, 2 * d)  # K and V at every position
        total += frac * (2 * flops.linear(d, d) + flops.attention_core(d, L))  # Q, output, scores/values
        if layer_type == "sparse_learned":
            total += flops.linear(d, 1)
        return total

    return f


def _state_bytes(shape, args, seq_len):
    """Worst case: any past position may be selected later, so keys and values of all of them are kept."""
    return 2.0 * seq_len * shape.hidden_size * STATE_BYTES


_GLOBALS = ("pos_emb", "rotary_pct", "rotary_emb_base", "attention_dropout")
_COMMON = {"pos_emb": "rotary", "rotary_pct": 1.0, "rotary_emb_base": 10000.0, "attention_dropout": 0.0,
           "block_size": 0}

register(
    MixerSpec(
        name="sparse_random",
        module=RandomSparseAttention,
        defaults={**_COMMON, "p": 0.125},
        inherits=_GLOBALS,
        tp_split="heads",
        flops=_flops_for("sparse_random"),
        validate=_validate_random,
        before_step=set_aux_loss_scale,
        stats=collect_stats,
        state_bytes=_state_bytes,
        doc="causal attention at positions drawn with probability `p` (Zoology's random-selection control)",
    )
)

register(
    MixerSpec(
        name="sparse_programmatic",
        module=ProgrammaticSparseAttention,
        defaults={**_COMMON, "match": "token"},
        inherits=_GLOBALS,
        tp_split="heads",
        flops=_flops_for("sparse_programmatic"),
        validate=_validate_programmatic,
        needs_token_ids=True,
        before_step=set_aux_loss_scale,
        stats=collect_stats,
        state_bytes=_state_bytes,
        memory_note="worst case: every position selected",
        doc="causal attention at positions whose token (or bigram) occurred earlier",
    )
)

register(
    MixerSpec(
        name="sparse_learned",
        module=LearnedSparseAttention,
        defaults={**_COMMON, "topk": None, "budget": None, "noise_std": 0.01, "aux_loss_coef": 1e-3,
                  "train_selection": "topk", "threshold_momentum": 0.99},
        inherits=_GLOBALS,
        tp_split="heads",
        flops=_flops_for("sparse_learned"),
        validate=_validate_learned,
        before_step=set_aux_loss_scale,
        stats=collect_stats,
        state_bytes=_state_bytes,
        doc="causal attention at the top-k of learned sigmoid scores (threshold in eval), auxiliary sparsity loss",
    )
)
