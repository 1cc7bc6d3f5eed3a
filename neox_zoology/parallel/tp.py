"""Tensor-parallel primitives that also work with no process group at all.

megatron-core's mappings assert an initialised TP group. Mixers built through the single-process
door (`neox_zoology.build_mixer`, notebooks, MQAR sweeps, unit tests) run with none, so every
primitive here degrades to the identity / plain `F.linear` when model parallelism is not set up.
Parameters and initialisation are megatron-core's in both cases, so a state dict moves freely
between the two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes


_FP32_REDUCE = False


def set_fp32_allreduce(enabled: bool) -> None:
    """Tensor-parallel all-reduces of bf16/fp16 tensors run in fp32 and are cast back (GPT-NeoX's
    fp32_allreduce), process-wide: megatron-core's `_reduce` (behind the copy/reduce mappings) is wrapped once,
    and column-parallel layers route their input-gradient all-reduce through that mapping."""
    global _FP32_REDUCE
    from megatron.core.tensor_parallel import mappings

    _FP32_REDUCE = bool(enabled)
    if enabled and not getattr(mappings._reduce, "fp32_aware", False):
        original = mappings._reduce

        def _reduce(input_, group):
            if _FP32_REDUCE and input_.dtype in (torch.bfloat16, torch.float16) and group.size() > 1:
                wide = input_.float()
                torch.distributed.all_reduce(wide, group=group)
                return wide.to(input_.dtype)
            return original(input_, group)

        _reduce.fp32_aware = True
        mappings._reduce = _reduce


def fp32_allreduce() -> bool:
    return _FP32_REDUCE


def _active() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and parallel_state.model_parallel_is_initialized()
    )


def _group():
    return parallel_state.get_tensor_model_parallel_group() if _active() else None


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size() if _active() else 1


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank() if _active() else 0


def tp_slice(n: int) -> slice:
    """This rank's contiguous share of `n` channels (n must divide by the TP size)."""
    size = tp_size()
    if n % size:
        raise ValueError(f"{n} channels do not split over tensor-parallel size {size}")
    per = n // size
    return slice(tp_rank() * per, (tp_rank() + 1) * per)


class _ContiguousGrad(torch.autograd.Function):
    """Identity forward; backward hands on a contiguous gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def copy_to_tp(x):
    """Identity forward, all-reduce backward: enter a region computed per TP shard.

    megatron-core's all-reduce reduces `x.contiguous()` and returns `x`, so a non-contiguous tensor
    would come back unreduced: the gradient reaching it is made contiguous first (consumers may take
    permuted views of the output). The collective stays inside megatron-core, which torch.compile
    leaves untraced under TP (see model/block.py).
    """
    if tp_size() == 1:
        return x
    return _ContiguousGrad.apply(tensor_parallel.copy_to_tensor_model_parallel_region(x, group=_group()))


def reduce_from_tp(x):
    """All-reduce forward, identity backward: sum the partial products of a row-parallel layer (any layout)."""
    if tp_size() == 1:
        return x
    return tensor_parallel.reduce_from_tensor_model_parallel_region(x.contiguous(), group=_group())


def gather_from_tp(x):
    """All-gather the last dim forward, split backward: leave a region of channel shards."""
    return tensor_parallel.gather_from_tensor_model_parallel_region(x, group=_group()) if tp_size() > 1 else x


def mark_tp_param(param: torch.nn.Parameter, dim: int = 0) -> torch.nn.Parameter:
    """Mark a parameter as split over TP along `dim` (for grad-norm and checkpoint tooling)."""
    if tp_size() > 1:
        set_tensor_model_parallel_attributes(param, True, dim, 1)
    return param


class ColumnLinear(tensor_parallel.ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear; plain `F.linear` when no TP group exists."""

    def forward(self, x, weight=None, runtime_gather_output=None):
        if self.tp_group is None:
            bias = None if self.skip_bias_add else self.bias
            out = F.linear(x, self.weight if weight is None else weight, bias)
            return out, (self.bias if self.skip_bias_add else None)
        if _FP32_REDUCE and self.allreduce_dgrad:
            self.allreduce_dgrad = False  # the input gradient's all-reduce then goes through mappings._reduce
        return super().forward(x, weight=weight, runtime_gather_output=runtime_gather_output)


class RowLinear(tensor_parallel.RowParallelLinear):
    """megatron-core's RowParallelLinear; plain `F.linear` when no TP group exists."""

    def forward(self, x):
        if self.tp_group is None:
            bias = None if self.skip_bias_add else self.bias
            out = F.linear(x, self.weight, bias)
            return out, (self.bias if self.skip_bias_add else None)
        return super().forward(x)


class VocabEmbedding(tensor_parallel.VocabParallelEmbedding):
    """megatron-core's VocabParallelEmbedding; plain `F.embedding` when no TP group exists."""

    def forward(self, tokens):
        if self.tp_group is None:
            return F.embedding(tokens, self.weight)
        return super().forward(tokens)
