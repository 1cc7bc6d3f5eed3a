"""The LM head and its cross-entropy in chunks of tokens, so that the [tokens, vocab] logits never exist.

    nll_t = log sum_v exp(h_t . W_v) - h_t . W_{y_t}        (W: this TP rank's vocabulary shard [V/tp, h])

With `lm_head_chunk_tokens: N > 0` the last layer does not multiply by the head weight; it returns a
`HeadInput` (hidden states, weight, N) and `token_nll` / `lm_loss` in `model/gpt.py` finish the job here:

- forward, N tokens at a time: the chunk's logits [N, V/tp] (in fp32, as the unchunked path), their max,
  sum of exponentials and target logit, each all-reduced over the TP group exactly as megatron-core's
  `vocab_parallel_cross_entropy` does (its own helpers compute them). Kept for backward: the hidden
  states, the weight, the labels and two floats per token (max, sum-exp).
- backward, N tokens at a time: the chunk's logits are recomputed, turned in place into
  (softmax - one-hot) * dNLL, and give the chunk's rows of dL/dh and its share of dL/dW (accumulated in
  fp32). One chunk's logits exist at a time, for one extra [N, h] x [h, V/tp] matmul per chunk.

The weight travels as an autograd view of the parameter, so that the training engine's backward set-up
hook runs before the head weight's gradient is accumulated and scales that gradient too (why:
docs/performance.md, "The chunked head and the engine's backward hook").
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

from neox_zoology.parallel import copy_to_tp, tp_rank, tp_size


class HeadInput(NamedTuple):
    """What the last layer returns when the LM head is chunked (a tuple, so engines see its tensors)."""

    hidden: torch.Tensor
    """[s, b, h] final-norm output, already entered into the TP region (`copy_to_tp`)."""
    weight: torch.Tensor
    """[V/tp, h] this TP rank's shard of the head (or tied embedding) weight, as an autograd view."""
    chunk_tokens: int

    def logits(self) -> torch.Tensor:
        """The whole [b, s, V/tp] logits, for callers that want them (e.g. sampling); not used by the loss."""
        return F.linear(self.hidden, self.weight).transpose(0, 1).contiguous()


def head_input(hidden: torch.Tensor, weight: torch.Tensor, chunk_tokens: int) -> HeadInput:
    """hidden [s, b, h] and the head weight shard [V/tp, h] -> a `HeadInput` for `chunked_token_nll`."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    return HeadInput(copy_to_tp(hidden), weight.view_as(weight), int(chunk_tokens))


def chunked_token_nll(head: HeadInput, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [b, s] (labels [b, s], full-vocabulary ids), `head.chunk_tokens` at a time."""
    s, b, h = head.hidden.shape
    if labels.shape != (b, s):
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden states [s={s}, b={b}, h={h}]")
    nll = _ChunkedVocabParallelNLL.apply(
        head.hidden.reshape(s * b, h), head.weight, labels.t().reshape(-1), head.chunk_tokens
    )
    return nll.view(s, b).t().contiguous()


def _all_reduce(x: torch.Tensor, op) -> None:
    if tp_size() > 1:
        torch.distributed.all_reduce(x, op=op, group=parallel_state.get_tensor_model_parallel_group())


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[c, h] x [V/tp, h] -> [c, V/tp] logits in at least fp32 (float64 stays float64)."""
    logits = F.linear(hidden, weight)
    return logits if logits.dtype == torch.float64 else logits.float()


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(start + size, total)


class _ChunkedVocabParallelNLL(torch.autograd.Function):
    """hidden [T, h], weight [V/tp, h], labels [T] -> nll [T]; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens):
        total, part = hidden.shape[0], weight.shape[0]
        first = tp_rank() * part  # megatron-core's VocabUtility: rank r holds ids [r * V/tp, (r + 1) * V/tp)
        stat_dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
        nll = torch.empty(total, dtype=stat_dtype, device=hidden.device)
        logits_max = torch.empty_like(nll)
        sum_exp = torch.empty_like(nll)
        for a, b in _chunks(total, chunk_tokens):
            logits = _chunk_logits(hidden[a:b], weight)
            m = logits.max(dim=-1)[0]
            _all_reduce(m, torch.distributed.ReduceOp.MAX)
            # subtracts the max and exponentiates in place; target logits outside this shard count 0
            _, _, predicted, sum_exp_c, _ = VocabParallelCrossEntropy.calculate_predicted_logits(
                logits, labels[a:b], m, first, first + part
            )
            del logits
            both = torch.stack([predicted, sum_exp_c])
            _all_reduce(both, torch.distributed.ReduceOp.SUM)
            predicted, sum_exp_c = both
            nll[a:b] = torch.log(sum_exp_c) - predicted
            logits_max[a:b] = m
            sum_exp[a:b] = sum_exp_c
        ctx.save_for_backward(hidden, weight, labels, logits_max, sum_exp)
        ctx.chunk_tokens, ctx.first = chunk_tokens, first
        return nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_nll):
        hidden, weight, labels, logits_max, sum_exp = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        part, first = weight.shape[0], ctx.first
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
        for a, b in _chunks(hidden.shape[0], ctx.chunk_tokens):
            h = hidden[a:b]
            softmax = _chunk_logits(h, weight)
            softmax.sub_(logits_max[a:b].unsqueeze(-1)).exp_().div_(sum_exp[a:b].unsqueeze(-1))
            target = labels[a:b]
            target_mask = (target < first) | (target >= first + part)
            masked_target = (target - first).masked_fill_(target_mask, 0)
            grad_2d, arange, update, g = VocabParallelCrossEntropy.prepare_gradient_calculation_operands(
                softmax, target_mask
            )
            g = VocabParallelCrossEntropy.calculate_gradients(
                grad_2d, arange, masked_target, update.to(g.dtype), g, grad_nll[a:b].to(g.dtype)
            )  # (softmax - one-hot) * dNLL, in place: [c, V/tp]
            del softmax, grad_2d
            g = g.to(weight.dtype)
            if need_hidden:
                torch.mm(g, weight, out=grad_hidden[a:b])
            if need_weight:
                if g.dtype == acc_dtype:
                    grad_weight.addmm_(g.t(), h)
                else:
                    grad_weight += g.t() @ h
            del g
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None
